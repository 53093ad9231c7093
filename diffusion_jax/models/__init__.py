"""Denoising networks: the DDPM/ADM UNet and the DiT, built from a config.

    model = models.create(models.default_config("unet"))
    variables = model.init(key, x, t)                     # x [B,H,W,C], t int32 [B]
    out = model.apply(variables, x, t, cond, train=True, rngs={"dropout": key})
    out = model.apply(variables, x, t, cond, h=h)          # with interval_input: h = t - r [B]

`cond` is None, int32 labels [B] in [0, num_classes] (num_classes = the null
label), or float [B, cond_dim] text embeddings (zeros = null). The output has
C channels, or 2C with learn_sigma (prediction first, variance interpolation
second, as in Nichol & Dhariwal 2021).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import ml_collections

from diffusion_jax.models import guidance
from diffusion_jax.models.dit import DIT_SIZES, DiT
from diffusion_jax.models.embeddings import COND_COMBINES, null_cond, timestep_embedding
from diffusion_jax.models.layers import DTYPES
from diffusion_jax.models.unet import UNet

NAMES = ("unet", "dit")


def _common(name: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = name  # one of NAMES: "unet" | "dit"
    c.image_size = 28  # pixels, square images; UNet: divisible by 2**(len(ch_mult)-1), DiT: by patch_size
    c.in_channels = 1  # image channels C (1 grey, 3 RGB); output has C, or 2C with learn_sigma
    c.num_classes = 0  # class-conditional with labels in [0, num_classes); label num_classes = null; 0 = no labels
    c.cond_dim = 0  # width of precomputed text embeddings [B, cond_dim]; zeros = null; 0 = none
    c.cond_combine = "add"  # how the condition meets the time embedding: "add" | "concat" (concat then Dense back)
    c.label_init_std = 0.02  # std of the label table's normal init (DiT: 0.02; ADM / torch nn.Embedding: 1)
    c.learn_sigma = False  # bool; True doubles the output channels (learned variance, hybrid loss)
    c.dropout = 0.1  # probability in [0, 1), active only with train=True
    c.dtype = "float32"  # compute dtype "float32" | "bfloat16"; parameters always float32
    # bool; True: a second time input h = t - r (an interval [r, t]: MeanFlow, shortcut models;
    # diffusion_jax.flow_maps), `apply(..., h=...)`, with its own sinusoidal embedding added to t's
    c.interval_input = False
    return c


def default_config(name: str = "unet", size: str | None = None) -> ml_collections.ConfigDict:
    """The default model config for `name` ("unet" or "dit"), MNIST-sized (28x28x1).

    UNet: ch 64, ch_mult (1, 2, 2) (28 -> 14 -> 7), 2 res blocks, attention at 7x7:
    6.47M parameters. DiT: hidden 256, depth 6, 4 heads, patch 2 (196 tokens):
    a small DiT for 28x28; `size="S"` or `"B"` (or "L", "XL") gives the paper's
    widths (Peebles & Xie 2023, Table 1).
    """
    if name not in NAMES:
        raise ValueError(f"model name must be one of {NAMES}, got {name!r}")
    c = _common(name)
    if name == "unet":
        if size is not None:
            raise ValueError("size applies to name='dit' only")
        c.ch = 64  # base width (channels at the first level); time embedding width is 4 * ch
        c.ch_mult = (1, 2, 2)  # width multiplier per level; len(ch_mult) - 1 downsamplings by 2
        c.num_res_blocks = 2  # residual blocks per level on the way down (one more on the way up), >= 1
        c.attn_resolutions = (7,)  # feature-map sizes (pixels) with self-attention, e.g. (16,) for 32x32
        c.num_heads = 1  # attention heads (used when head_channels <= 0)
        c.head_channels = -1  # channels per head; > 0 overrides num_heads (ADM uses 64)
        c.resblock_updown = False  # True: resample inside residual blocks (ADM); False: conv resampling (DDPM)
        c.use_scale_shift_norm = False  # True: embedding as GroupNorm scale-shift (ADM); False: added (DDPM)
        c.norm_groups = 32  # max GroupNorm groups; fewer are used when they do not divide the channels
    else:
        c.patch_size = 2  # pixels per patch side; image_size must be divisible by it (2 or 4 for 28x28)
        c.hidden_size = 256  # token width D, divisible by num_heads and by 4
        c.depth = 6  # number of adaLN-Zero transformer blocks, >= 1
        c.num_heads = 4  # attention heads
        c.mlp_ratio = 4.0  # MLP hidden width = mlp_ratio * hidden_size
        c.freq_dim = 256  # width of the sinusoidal timestep embedding fed to the time MLP
        c.dropout = 0.0  # DiT trains without dropout
        c.long_skip = False  # bool; U-ViT long skips: block i's output joins block depth-1-i (Bao et al. 2023)
        c.conv_head = False  # bool; a 3x3 conv on the unpatchified output (U-ViT's final conv)
        c.conv_stem = 0  # channels of a full-resolution conv stem and head (a ResBlock each, skip between); 0: off
        if size is not None:
            if size not in DIT_SIZES:
                raise ValueError(f"DiT size must be one of {tuple(DIT_SIZES)}, got {size!r}")
            c.hidden_size, c.depth, c.num_heads = DIT_SIZES[size]
    return c


def ddpm_cifar10_config() -> ml_collections.ConfigDict:
    """DDPM's CIFAR-10 network (Ho et al. 2020, Appendix B): 35.7M parameters."""
    c = default_config("unet")
    c.image_size, c.in_channels = 32, 3
    c.ch, c.ch_mult, c.num_res_blocks = 128, (1, 2, 2, 2), 2
    c.attn_resolutions, c.dropout = (16,), 0.1
    return c


def _err(field: str, msg: str) -> ValueError:
    return ValueError(f"model config field {field!r}: {msg}")


def _as_dict(config: Any) -> dict:
    if isinstance(config, ml_collections.ConfigDict):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"create expects an ml_collections.ConfigDict or a mapping, got {type(config)}")
    config = dict(config)
    if "name" not in config and isinstance(config.get("model"), Mapping):
        config = dict(config["model"])  # a full experiment config: use its .model
    return config


def validate(config: Any) -> dict:
    """Fills missing fields from `default_config(name)` and checks every field.

    Returns the complete field dict; raises ValueError naming the bad field and
    what is allowed.
    """
    given = _as_dict(config)
    name = given.get("name")
    if name not in NAMES:
        raise _err("name", f"must be one of {NAMES}, got {name!r}")
    defaults = default_config(name).to_dict()
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise _err(unknown[0], f"unknown for model {name!r}; known fields: {sorted(defaults)}")
    c = {**defaults, **given}

    def pos_int(field, minimum=1):
        v = c[field]
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise _err(field, f"must be an integer >= {minimum}, got {v!r}")

    for f in ("image_size", "in_channels"):
        pos_int(f)
    for f in ("num_classes", "cond_dim"):
        pos_int(f, 0)
    if c["num_classes"] > 0 and c["cond_dim"] > 0:
        raise _err("cond_dim", "set either num_classes (labels) or cond_dim (text vectors), not both")
    if c["cond_combine"] not in COND_COMBINES:
        raise _err("cond_combine", f"must be one of {COND_COMBINES}, got {c['cond_combine']!r}")
    v = c["label_init_std"]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
        raise _err("label_init_std", f"must be a number >= 0, got {v!r}")
    if c["dtype"] not in DTYPES:
        raise _err("dtype", f"must be one of {tuple(DTYPES)}, got {c['dtype']!r}")
    for f in ("learn_sigma", "interval_input"):
        if not isinstance(c[f], bool):
            raise _err(f, f"must be True or False, got {c[f]!r}")
    if not 0.0 <= float(c["dropout"]) < 1.0:
        raise _err("dropout", f"must be in [0, 1), got {c['dropout']!r}")

    if name == "unet":
        for f in ("ch", "num_res_blocks", "norm_groups"):
            pos_int(f)
        c["ch_mult"] = tuple(c["ch_mult"])
        c["attn_resolutions"] = tuple(c["attn_resolutions"])
        if not c["ch_mult"] or any(not isinstance(m, int) or m < 1 for m in c["ch_mult"]):
            raise _err("ch_mult", f"must be a non-empty tuple of positive integers, got {c['ch_mult']!r}")
        factor = 2 ** (len(c["ch_mult"]) - 1)
        if c["image_size"] % factor:
            raise _err(
                "image_size",
                f"{c['image_size']} is not divisible by 2**(len(ch_mult)-1) = {factor} "
                f"(ch_mult={c['ch_mult']}); use a shorter ch_mult or another image_size",
            )
        reachable = tuple(c["image_size"] // 2**i for i in range(len(c["ch_mult"])))
        bad = [r for r in c["attn_resolutions"] if r not in reachable]
        if bad:
            raise _err("attn_resolutions", f"{bad} never occur; the feature-map sizes are {reachable}")
        widths = {c["ch"] * c["ch_mult"][reachable.index(r)] for r in c["attn_resolutions"]}
        widths.add(c["ch"] * c["ch_mult"][-1])  # the middle block always has attention
        for w in sorted(widths):
            if c["head_channels"] > 0 and w % c["head_channels"]:
                raise _err("head_channels", f"{c['head_channels']} does not divide attention width {w}")
            if c["head_channels"] <= 0 and (c["num_heads"] < 1 or w % c["num_heads"]):
                raise _err("num_heads", f"{c['num_heads']} must be >= 1 and divide attention width {w}")
    else:
        for f in ("patch_size", "hidden_size", "depth", "num_heads", "freq_dim"):
            pos_int(f)
        if c["image_size"] % c["patch_size"]:
            raise _err(
                "patch_size",
                f"image_size {c['image_size']} is not divisible by patch_size {c['patch_size']}",
            )
        if c["hidden_size"] % c["num_heads"] or c["hidden_size"] % 4:
            raise _err(
                "hidden_size",
                f"{c['hidden_size']} must be divisible by num_heads={c['num_heads']} and by 4",
            )
        for f in ("long_skip", "conv_head"):
            if not isinstance(c[f], bool):
                raise _err(f, f"must be True or False, got {c[f]!r}")
        pos_int("conv_stem", 0)
        if c["conv_stem"] and c["conv_head"]:
            raise _err("conv_head", "must be False when conv_stem > 0 (the stem's head ends in its own conv)")
        if float(c["mlp_ratio"]) <= 0:
            raise _err("mlp_ratio", f"must be > 0, got {c['mlp_ratio']!r}")
    return c


def create(config: Any) -> nn.Module:
    """Builds the UNet or DiT that `config.name` names from a (model) ConfigDict.

    Accepts the model ConfigDict itself, a plain dict, or an experiment config
    with a `.model` field. Missing fields take `default_config(name)`'s values.
    """
    c = validate(config)
    name = c.pop("name")
    return {"unet": UNet, "dit": DiT}[name](**c)


__all__ = [
    "NAMES",
    "DIT_SIZES",
    "DiT",
    "UNet",
    "create",
    "ddpm_cifar10_config",
    "default_config",
    "guidance",
    "null_cond",
    "timestep_embedding",
    "validate",
]
