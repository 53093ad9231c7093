"""Exact denoisers of Gaussian-mixture data, for checking samplers against math.

For data x0 ~ sum_k w_k N(mu_k, c_k^2) (per dimension) and any process x_t = a x0 + s eps,
each component gives x_t | k ~ N(a mu_k, a^2 c_k^2 + s^2) and, by Gaussian conditioning,

    E[x0 | x_t, k] = mu_k + a c_k^2 / (a^2 c_k^2 + s^2) (x_t - a mu_k),
    E[x0 | x_t]    = sum_k r_k(x_t) E[x0 | x_t, k],  r_k proportional to w_k N(x_t; a mu_k, a^2 c_k^2 + s^2).

This is the exact data prediction of a perfectly trained network, also at a = 0 (pure
noise) and s = 0. The probability-flow ODE of a one-dimensional law is monotone, so it
carries the prior's p-quantile to the data's p-quantile: `quantiles` gives the latter and
`transport_error` the W2 distance between a sampler's outputs and the data law.
"""

from __future__ import annotations

from typing import NamedTuple

import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers import Prediction

__all__ = ["GaussianMixture", "diffusers_grid", "gaussian", "prior_quantile_points", "transport_error"]


class GaussianMixture(NamedTuple):
    """Per-dimension mixture: weights (sum 1), means and standard deviations, tuples of floats."""

    weights: tuple
    means: tuple
    stds: tuple

    def x0(self, process, x, t):
        """E[x0 | x_t = x] under `process` at time t (scalar or [B]). The fields may be
        arrays (also traced ones), so one compiled sampler serves many data laws."""
        a, s = process.alpha_sigma(t)
        a = jnp.reshape(a, jnp.shape(a) + (1,) * (x.ndim - jnp.ndim(a)))[None]
        s = jnp.reshape(s, jnp.shape(s) + (1,) * (x.ndim - jnp.ndim(s)))[None]
        k = (-1,) + (1,) * x.ndim
        w, mu, c = (jnp.reshape(jnp.asarray(v, jnp.float32), k) for v in self)
        var = a * a * c * c + s * s
        logits = jnp.log(w) - 0.5 * jnp.log(var) - 0.5 * (x[None] - a * mu) ** 2 / var
        means = mu + a * c * c / var * (x[None] - a * mu)
        return jnp.sum(jax.nn.softmax(logits, axis=0) * means, axis=0)

    def eps(self, process, x, t):
        """The exact noise prediction (x - a E[x0 | x]) / s at time t (scalar or [B]): an
        eps-model output, for `samplers.sample`."""
        a, s = process.alpha_sigma(jnp.asarray(t))
        a, s = (jnp.reshape(v, jnp.shape(v) + (1,) * (x.ndim - jnp.ndim(v))) for v in (a, s))
        return (x - a * self.x0(process, x, t)) / s

    def denoiser(self, process):
        """denoise(x, t) -> Prediction of the exact model, for the samplers."""

        def denoise(x, t):
            x0 = self.x0(process, x, t)
            return Prediction(x0, self.eps(process, x, t), x0)

        return denoise

    def cdf(self, x):
        x = np.asarray(x, np.float64)
        return sum(w * _ndtr((x - mu) / c) for w, mu, c in zip(self.weights, self.means, self.stds))

    def quantiles(self, p: np.ndarray) -> np.ndarray:
        """F^-1(p), float64, by bisection (the cdf is increasing)."""
        p = np.asarray(p, np.float64)
        lo = np.full(p.shape, min(m - 40 * c for m, c in zip(self.means, self.stds)))
        hi = np.full(p.shape, max(m + 40 * c for m, c in zip(self.means, self.stds)))
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            below = self.cdf(mid) < p
            lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
        return 0.5 * (lo + hi)


_ndtr = np.vectorize(lambda z: 0.5 * math.erfc(-z / math.sqrt(2.0)), otypes=[np.float64])


def gaussian(mean: float, std: float) -> GaussianMixture:
    return GaussianMixture((1.0,), (float(mean),), (float(std),))


def prior_quantile_points(n: int) -> np.ndarray:
    """Probabilities (i + 1/2) / n and the N(0, 1) quantiles at them, float64."""
    p = (np.arange(n) + 0.5) / n
    return p, gaussian(0.0, 1.0).quantiles(p)


def diffusers_grid(method: str, num_timesteps: int, n: int) -> np.ndarray:
    """The peer's default time grid on a DDPM process of T = num_timesteps, then t = -1 (clean
    data), int32 [n + 1]: diffusers' DDIMScheduler ("leading", set_alpha_to_one) for
    method "ddim", its DPMSolverMultistepScheduler ("linspace" over n + 1 points without
    t = 0, final sigma 0) for "dpm_solver_pp"; what the default grids are held to."""
    T = num_timesteps
    if method == "ddim":
        ts = (np.arange(n) * (T // n))[::-1]
    elif method == "dpm_solver_pp":
        ts = np.round(np.linspace(0, T - 1, n + 1))[::-1][:-1]
    else:
        raise ValueError(f"diffusers_grid: method must be 'ddim' or 'dpm_solver_pp', got {method!r}")
    return np.concatenate([ts, [-1]]).astype(np.int32)


def transport_error(outputs, data: GaussianMixture, p: np.ndarray) -> float:
    """W2 distance between the empirical law of `outputs` (one value per probability p,
    in any order) and the data law: sqrt(mean (sort(outputs) - F^-1(p))^2)."""
    out = np.sort(np.asarray(outputs, np.float64).ravel())
    return float(np.sqrt(np.mean((out - data.quantiles(p)) ** 2)))
