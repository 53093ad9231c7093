"""Denoise functions from trained parameters, training sample grids and `--mode sample`.

`make_denoise_fn(config, params, cond, guidance_scale)` is what the samplers
and the evaluation take: `denoise_fn(x_t, t) -> model output`, with
classifier-free guidance (1 + w) eps(x_t, c) - w eps(x_t, null) when w > 0
(Ho & Salimans 2022), in one batched forward pass (`models.guidance`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import models, samplers, schedules


def make_schedule(config: Any):
    """The experiment's noise schedule (`config.diffusion`)."""
    d = config.diffusion
    return schedules.make(d.schedule, num_timesteps=d.num_timesteps, **d.schedule_kwargs.to_dict())


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


def _clip(config: Any) -> float | None:
    return float(config.sample.clip_x0) if config.sample.clip_x0 > 0 else None


def make_sample_fn(config: Any, num_images: int, *, out_sharding: Any = None) -> Callable:
    """jit-compiled fn(params, labels, key) -> images float32 [N, H, W, C] in [-1, 1]
    drawn with config.sample's method, steps, eta, guidance and clipping.
    `labels` is int32 [N] (conditional models) or None."""
    schedule = make_schedule(config)
    mc, s = config.model, config.sample
    shape = (num_images, mc.image_size, mc.image_size, mc.in_channels)

    def sample_fn(params, labels, key):
        denoise_fn = make_denoise_fn(config, params, labels, float(s.guidance_scale))
        x = samplers.sample(
            denoise_fn, schedule, shape, key,
            method=s.method, num_steps=int(s.num_steps), prediction=config.diffusion.prediction,
            variance=config.diffusion.variance, eta=float(s.eta), clip_x0=_clip(config),
        )
        return jnp.clip(x, -1.0, 1.0)

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
    from diffusion_jax.train import checkpoints, logging as train_logging

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
        train_logging.save_image_grid(base + ".png", images, ncol)
        np.savez(base + ".npz", images=train_logging.to_uint8(images),
                 labels=np.asarray([] if labels is None else labels, np.int32))
    return {"png": base + ".png", "npz": base + ".npz"}
