"""Test-set negative log-likelihood in bits per dimension through the variational bound.

    L = L_T + sum_{t=2}^{T} L_{t-1} + L_0          (Ho et al. 2020, eq. 5)

with L_T the prior KL, L_{t-1} the Gaussian KLs and L_0 the discretised-Gaussian
decoder over the 256 pixel levels, each divided by (num_dims * ln 2) -- the number
Ho et al. 2020 (table 2) and Nichol & Dhariwal 2021 (table 1) report. The per-image
terms come from `diffusion_jax.diffusion.bits_per_dim`: all T terms, or the unbiased
estimate T * mean_k L_{t_k} from K uniformly sampled timesteps.

The reported standard error is std(per-image bound) / sqrt(N): the per-image
estimates are independent (independent images, independent timestep draws), so it
covers both the spread over test images and the Monte-Carlo noise of sampling
timesteps, i.e. it is the error of the mean as an estimate of E_x[bound(x)].
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np

from diffusion_jax import diffusion

BPD_KEYS = ("total_bpd", "prior_bpd", "vb_bpd", "decoder_bpd")


def uint8_to_model(images) -> np.ndarray:
    """uint8 [N,H,W,C] -> float32 in [-1, 1] on the pixel-centre grid k/127.5 - 1."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 pixel levels 0..255 for a discrete likelihood, got {images.dtype}")
    return images.astype(np.float32) / 127.5 - 1.0


def dataset_bits_per_dim(denoise_fn: Callable, schedule, images, key, *, params=None, batch_size: int = 250,
                          num_timesteps: int | None = None, prediction: str = "eps",
                          variance: str = "small", log: Callable[[str], None] | None = None) -> dict:
    """Mean bits/dim of uint8 `images` [N,H,W,C] under the model's variational bound.

    `denoise_fn(x_t, t)`, or `denoise_fn(params, x_t, t)` when `params` is given (then
    the parameters are arguments of the compiled function, not constants baked into it).
    It sees batches of exactly `batch_size` (so it may close over a fixed-size condition,
    e.g. the null label); the last batch is padded and the padding dropped. `num_timesteps=None` evaluates all T terms (T forward passes per image); an
    int K gives the unbiased K-timestep estimate (K forward passes per image).

    Returns a dict of floats: mean of each of BPD_KEYS, "total_bpd_stderr", "num_images",
    "num_timesteps" (K, or T for the full bound) and "seconds".
    """
    x_all = uint8_to_model(images)
    n = x_all.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 images for a standard error, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_timesteps is not None:
        num_timesteps = int(num_timesteps)
    if num_timesteps is not None and not 1 <= num_timesteps <= schedule.num_timesteps:
        raise ValueError(f"num_timesteps must be None (all T terms) or in [1, {schedule.num_timesteps}], "
                         f"got {num_timesteps}")

    @jax.jit
    def batch_bpd(p, x, k):
        fn = denoise_fn if params is None else (lambda x_t, t: denoise_fn(p, x_t, t))
        out = diffusion.bits_per_dim(fn, schedule, x, k, prediction=prediction,
                                     variance=variance, num_timesteps=num_timesteps)
        return {name: out[name] for name in BPD_KEYS}

    start = time.time()
    per_image = {name: [] for name in BPD_KEYS}
    for i, lo in enumerate(range(0, n, batch_size)):
        chunk = x_all[lo:lo + batch_size]
        valid = chunk.shape[0]
        if valid < batch_size:
            chunk = np.concatenate([chunk, x_all[:batch_size - valid]])
        out = jax.device_get(batch_bpd(params, chunk, jax.random.fold_in(key, i)))
        for name in BPD_KEYS:
            per_image[name].append(np.asarray(out[name], np.float64)[:valid])
        if log:
            log(f"bits/dim: {lo + valid}/{n} images, running mean "
                f"{np.concatenate(per_image['total_bpd']).mean():.4f} ({time.time() - start:.0f}s)")
    result = {name: float(np.concatenate(v).mean()) for name, v in per_image.items()}
    total = np.concatenate(per_image["total_bpd"])
    result.update(total_bpd_stderr=float(total.std(ddof=1) / np.sqrt(n)), num_images=int(n),
                  num_timesteps=int(num_timesteps or schedule.num_timesteps),
                  seconds=round(time.time() - start, 1))
    return result
