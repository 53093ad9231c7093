"""The experiment's process, network functions and samplers; training grids and `--mode sample`.

`make_denoise_fn(config, params, cond, guidance_scale)` is the network as the samplers
and the evaluation take it: `denoise_fn(x_in, c_noise) -> model output` on the process's
network inputs (for ddpm simply (x_t, t)), with classifier-free guidance
(1 + w) out(x, c) - w out(x, null) when w > 0 (Ho & Salimans 2022), in one batched
forward pass (`models.guidance`). `make_denoiser` wraps it with the process's conversions
into the `samplers.denoiser` every sampler calls.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import models, processes, samplers


def make_process(config: Any):
    """The experiment's forward process (`config.diffusion`, `processes.make`)."""
    return processes.make(config.diffusion)


def make_schedule(config: Any):
    """The discrete schedule of a ddpm experiment (`config.diffusion`)."""
    return processes.make(config.diffusion.to_dict() | {"process": "ddpm"}).schedule


def make_sampler(config: Any) -> samplers.Sampler:
    """The sampler of `config.sample` (method and its settings)."""
    return samplers.from_config(config.sample)


def clip_bound(config: Any) -> float | None:
    """config.sample.clip_x0 as the samplers take it (None: no clipping)."""
    return float(config.sample.clip_x0) if config.sample.clip_x0 > 0 else None


def make_denoiser(config: Any, params: Any, cond: Any = None, guidance_scale: Any = 0.0,
                  process: Any = None) -> Callable:
    """`samplers.denoiser` of the experiment's network: (x_t, t, r=None) -> Prediction(x0, eps, out).

    With config.sample.guidance_interval = (lo, hi) the guidance scale is w where the noise
    level sigma(t) = s(t) / a(t) lies in (lo, hi] and 0 elsewhere (Kynkaenniemi et al. 2024)."""
    process = make_process(config) if process is None else process
    prediction, clip = processes.own_objective(process, config.diffusion.prediction)[0], clip_bound(config)
    interval = tuple(config.sample.get("guidance_interval", ()))
    plain = isinstance(guidance_scale, (int, float)) and guidance_scale == 0
    if not interval or plain or cond is None:
        return samplers.denoiser(make_denoise_fn(config, params, cond, guidance_scale), process,
                                 prediction, clip)
    lo, hi = (float(v) for v in interval)

    def denoise(x, t, r=None):
        a, s = process.alpha_sigma(jnp.asarray(t))
        w = jnp.where((s / a > lo) & (s / a <= hi), jnp.asarray(guidance_scale, jnp.float32), 0.0)
        return samplers.denoiser(make_denoise_fn(config, params, cond, w), process, prediction, clip)(x, t, r)

    return denoise


def make_denoise_fn(config: Any, params: Any, cond: Any = None,
                    guidance_scale: float = 0.0) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """denoise_fn(x_t, t) for the experiment `config`'s model with `params`.

    cond: int32 labels [B] (or a scalar label) for a class-conditional model,
    None for an unconditional one. guidance_scale w >= 0 (0 = conditional
    model alone). Traceable: `params` and `cond` may be traced values.
    """
    model = models.create(config.model)
    return models.guidance.guided_denoise_fn(
        model.apply, params, cond, guidance_scale, config=config.model)


def grid_labels(config: Any) -> tuple[np.ndarray | None, int]:
    """(labels, ncol) of a training grid: one row of `grid_per_class` images
    per class for a conditional model; grid_per_class**2 images otherwise."""
    k, n = int(config.model.num_classes), int(config.sample.grid_per_class)
    if k > 0:
        return np.repeat(np.arange(k, dtype=np.int32), n), n
    return None, n


def make_sample_fn(config: Any, num_images: int, *, out_sharding: Any = None) -> Callable:
    """jit-compiled fn(params, labels, key) -> images float32 [N, H, W, C] in [-1, 1]
    drawn with config.sample's sampler, its settings, guidance and clipping.
    `labels` is int32 [N] (conditional models) or None."""
    process, sampler = make_process(config), make_sampler(config)
    mc, s = config.model, config.sample
    shape = (num_images, mc.image_size, mc.image_size, mc.in_channels)

    def sample_fn(params, labels, key):
        denoise = make_denoiser(config, params, labels, float(s.guidance_scale), process)
        return jnp.clip(samplers.draw(sampler, denoise, process, shape, key), -1.0, 1.0)

    return jax.jit(sample_fn, out_shardings=out_sharding)


def parse_labels(config: Any, num_images: int) -> np.ndarray | None:
    """config.sample.labels ("3,3,7", cycled to num_images) or 0..K-1 cycled; None if unconditional.
    ValueError (one line naming the field) unless they are integers in [0, K)."""
    k = int(config.model.num_classes)
    if k == 0:
        return None
    text = str(config.sample.labels).strip()
    if text:
        try:
            base = np.asarray([int(v) for v in text.split(",")], np.int64)
        except ValueError:
            base = None
        if base is None or base.min() < 0 or base.max() >= k:
            raise ValueError(f"config.sample.labels must be comma-separated integers in [0, {k}) "
                             f"(model.num_classes={k}), got {text!r}")
        base = base.astype(np.int32)
    else:
        base = np.arange(k, dtype=np.int32)
    return np.resize(base, num_images).astype(np.int32)


def sample_images(config: Any, params: Any, num_images: int, labels: np.ndarray | None,
                  key: jax.Array) -> np.ndarray:
    """num_images images (float32 numpy in [-1, 1]) in chunks of config.sample.batch_size."""
    chunk = min(int(config.sample.batch_size), num_images)
    fn = make_sample_fn(config, chunk)
    out = []
    for i, start in enumerate(range(0, num_images, chunk)):
        n = min(chunk, num_images - start)
        lab = None
        if labels is not None:
            lab = jnp.asarray(np.resize(labels[start:start + n], chunk))  # pad the last chunk
        out.append(np.asarray(fn(params, lab, jax.random.fold_in(key, i)))[:n])
    return np.concatenate(out, axis=0)


def run_sample_mode(config: Any, workdir: str, *, allow_config_change: bool = False) -> dict[str, str]:
    """`--mode sample`: the EMA params of the newest checkpoint that restores draw
    config.sample.num_images images; writes samples/<name>.png (grid) and
    samples/<name>.npz (uint8 images, labels). Only the EMA parameters are read.
    ValueError, and nothing written, when a sampled value is not finite."""
    from diffusion_jax import images as image_lib
    from diffusion_jax.train import checkpoints, writers

    s = config.sample
    num = int(s.num_images)
    labels = parse_labels(config, num)  # before any restore
    step, params = checkpoints.restore_ema(config, workdir, allow_config_change=allow_config_change)
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1_000_003)
    images = sample_images(config, params, num, labels, key)
    bad = ~np.isfinite(images).reshape(num, -1).all(axis=1)
    if bad.any():
        raise ValueError(
            f"sampling from checkpoint {step} gave non-finite values in {int(bad.sum())} of {num} images "
            f"(config.sample: method={s.method!r}, num_steps={s.num_steps}, guidance_scale={s.guidance_scale}, "
            f"clip_x0={s.clip_x0}); nothing written; try another sampler setting or checkpoint")
    name = f"sample_step{step}_{s.method}{s.num_steps}_w{s.guidance_scale:g}"
    base = os.path.join(workdir, "samples", name)
    ncol = int(np.ceil(np.sqrt(num)))
    if jax.process_index() == 0:
        writers.save_image_grid(base + ".png", images, ncol)
        np.savez(base + ".npz", images=image_lib.to_uint8(images),
                 labels=np.asarray([] if labels is None else labels, np.int32))
    return {"png": base + ".png", "npz": base + ".npz"}
