"""Time and condition embeddings shared by the UNet and the DiT.

The seed's PositionEmbedding is `timestep_embedding` followed by an MLP; its
TextEmbedding is `ConditionEmbedding` (class labels or precomputed text
vectors); the two are combined by "add" or "concat" (`Embedding`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import dense, to_dtype

COND_COMBINES = ("add", "concat")


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (integer or real) timesteps, float32 [B, dim].

    With half = dim // 2 and frequencies f_i = max_period^(-i / half),
    i = 0 .. half-1 (the Transformer's geometric ladder, Vaswani et al. 2017;
    used for timesteps by DDPM, Ho et al. 2020):

        emb[:, i]        = sin(t * f_i)      (first half: sine)
        emb[:, half + i] = cos(t * f_i)      (second half: cosine)

    An odd `dim` gets one trailing zero column. A scalar `t` is treated as [1].
    """
    t = jnp.atleast_1d(jnp.asarray(t)).astype(jnp.float32)
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepMLP(nn.Module):
    """timestep_embedding(t, freq_dim) -> Dense(features) -> SiLU -> Dense(features)."""

    features: int
    freq_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        h = timestep_embedding(t, self.freq_dim)
        h = dense(self.features, self.dtype, name="dense_0")(h)
        h = nn.silu(h)
        return dense(self.features, self.dtype, name="dense_1")(h)


class ConditionEmbedding(nn.Module):
    """Embeds a condition to [B, features].

    * Class labels (num_classes > 0): int [B] in [0, num_classes]; a table of
      num_classes + 1 rows, the last row (index num_classes) being the learned
      "null" label used for classifier-free guidance (Ho & Salimans 2022), drawn
      from N(0, label_init_std^2).
    * Text vectors (cond_dim > 0): float [B, cond_dim] -> Dense(features). The
      null condition is the all-zeros vector (so its embedding is the
      projection's bias alone).
    """

    features: int
    num_classes: int = 0
    cond_dim: int = 0
    dtype: Any = jnp.float32
    label_init_std: float = 0.02

    @nn.compact
    def __call__(self, cond: jax.Array) -> jax.Array:
        if self.num_classes > 0:
            table = nn.Embed(
                self.num_classes + 1,
                self.features,
                embedding_init=nn.initializers.normal(self.label_init_std),
                param_dtype=jnp.float32,
                name="label_table",
            )
            return table(jnp.asarray(cond).astype(jnp.int32)).astype(to_dtype(self.dtype))
        return dense(self.features, self.dtype, name="text_proj")(
            jnp.asarray(cond, jnp.float32)
        )


def _field(config: Any, name: str, default: Any = 0) -> Any:
    if isinstance(config, Mapping):
        if "name" not in config and isinstance(config.get("model"), Mapping):
            config = config["model"]
        return config.get(name, default)
    if not hasattr(config, name) and hasattr(config, "model"):
        config = config.model
    return getattr(config, name, default)


def null_cond(config: Any, batch: int) -> jax.Array | None:
    """Null condition for `batch` examples of the model that `config` describes.

    Labels: int32 [batch] filled with num_classes. Text vectors: float32 zeros
    [batch, cond_dim]. Unconditional model: None. `config` is the model config
    (or an experiment config with `.model`, or a dict with those two fields).
    The one definition of the null condition; `diffusion_jax.models.null_cond`
    is its public name.
    """
    num_classes, cond_dim = int(_field(config, "num_classes")), int(_field(config, "cond_dim"))
    if num_classes > 0:
        return jnp.full((batch,), num_classes, jnp.int32)
    if cond_dim > 0:
        return jnp.zeros((batch, cond_dim), jnp.float32)
    return None


class Embedding(nn.Module):
    """Time embedding combined with the condition embedding, [B, features].

    cond_combine "add": emb = time_emb + cond_emb.
    cond_combine "concat": emb = Dense(features)([time_emb, cond_emb]), a
    projection of the concatenation back to the embedding width.
    Unconditional models (num_classes == cond_dim == 0) return time_emb.
    A conditional model called with cond=None embeds the null condition.

    interval_input: the network also takes the length h = t - r of a time interval [r, t]
    (MeanFlow's t - r, Geng et al. 2025; the shortcut step d, Frans et al. 2024), embedded by
    its own `TimestepMLP` and added to t's: time_emb = MLP_t(t) + MLP_h(h). h = None means
    h = 0 (the instantaneous velocity). Off: no such parameters, the tree is as before, and h is
    ignored (such a model's average velocity over any interval is its velocity: Euler's step).
    """

    features: int
    freq_dim: int
    num_classes: int = 0
    cond_dim: int = 0
    cond_combine: str = "add"
    dtype: Any = jnp.float32
    label_init_std: float = 0.02
    interval_input: bool = False

    @nn.compact
    def __call__(self, t: jax.Array, cond: jax.Array | None, h: jax.Array | None = None) -> jax.Array:
        temb = TimestepMLP(self.features, self.freq_dim, self.dtype, name="time")(t)
        if self.interval_input:
            h = jnp.zeros_like(t) if h is None else jnp.broadcast_to(jnp.asarray(h), jnp.shape(t))
            temb = temb + TimestepMLP(self.features, self.freq_dim, self.dtype, name="interval")(h)
        if self.num_classes == 0 and self.cond_dim == 0:
            if cond is not None:
                raise ValueError(
                    "cond was given to an unconditional model; set num_classes (labels) "
                    "or cond_dim (text embeddings) in the model config, or pass cond=None"
                )
            return temb
        if cond is None:
            cond = null_cond({"num_classes": self.num_classes, "cond_dim": self.cond_dim}, temb.shape[0])
        cemb = ConditionEmbedding(
            self.features, self.num_classes, self.cond_dim, self.dtype, self.label_init_std, name="cond"
        )(cond)
        if self.cond_combine == "add":
            return temb + cemb
        if self.cond_combine == "concat":
            return dense(self.features, self.dtype, name="combine")(
                jnp.concatenate([temb, cemb], axis=-1)
            )
        raise ValueError(f"cond_combine must be one of {COND_COMBINES}, got {self.cond_combine!r}")
