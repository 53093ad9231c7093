"""Noise schedules of the discrete-time forward process.

Index convention (used everywhere in diffusion_jax): an integer timestep ``t`` in
``[0, T)`` addresses step ``t + 1`` of the seed's 1-based notation, as in DDPM
(Ho et al. 2020), improved-diffusion and diffusers. So ``betas[0]`` is the seed's
beta_1, ``alphas_cumprod[t]`` is abar_{t+1}, and ``x_t`` in code is the seed's
x_{t+1}; ``t = -1`` (used by samplers) means clean data, abar = 1.

Forward process (seed, Ho et al. 2020 eq. 2 and 4):
    x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z,  z ~ N(0, I)
    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I),  abar_t = prod_{s<=t} (1 - beta_s).
Posterior (Ho et al. 2020 eq. 6-7):
    q(x_{t-1} | x_t, x_0) = N(coef1_t x_0 + coef2_t x_t, beta_t (1 - abar_{t-1}) / (1 - abar_t)).

Every table is computed in float64 numpy and cast once to float32. A `Schedule`
is an immutable NamedTuple, hence a JAX pytree: pass it through `jax.jit`,
close over it, or `vmap` over functions that index it.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Schedule",
    "linear",
    "cosine",
    "scaled_linear",
    "sigmoid",
    "from_betas",
    "make",
    "NAMES",
]


class Schedule(NamedTuple):
    """Float32 [T] tables of a discrete forward process (names follow the seed and DDPM).

    Fields:
      betas: beta_t, variance of the one-step forward noise.
      alphas: alpha_t = 1 - beta_t.
      alphas_cumprod: abar_t = prod_{s<=t} alpha_s.
      alphas_cumprod_prev: abar_{t-1}, with abar_{-1} = 1.
      sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod: sqrt(abar_t), sqrt(1 - abar_t).
      reciprocal_sqrt_alphas: 1 / sqrt(alpha_t).
      posterior_variance: beta_t (1 - abar_{t-1}) / (1 - abar_t) (0 at t = 0).
      posterior_log_variance_clipped: its log with entry 0 replaced by entry 1
        (Ho et al. 2020 code), finite everywhere.
      posterior_mean_coef1: sqrt(abar_{t-1}) beta_t / (1 - abar_t), multiplies x_0.
      posterior_mean_coef2: sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t), multiplies x_t.
      sigma: sqrt(posterior_variance), the reverse-step noise scale ("small" variance).
    """

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    reciprocal_sqrt_alphas: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    sigma: jax.Array

    @property
    def num_timesteps(self) -> int:
        """T, the number of diffusion steps (static, also under jit)."""
        return int(self.betas.shape[0])


def _check_num_timesteps(num_timesteps) -> int:
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)):
        raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps}")
    return int(num_timesteps)


def _check_open_unit(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie in the open interval (0, 1), got {value}")
    return value


def from_betas(betas) -> Schedule:
    """Builds every table from a 1-D sequence of betas, each in the open interval (0, 1)."""
    b = np.asarray(betas, dtype=np.float64)
    if b.ndim != 1 or b.shape[0] < 1:
        raise ValueError(
            f"betas must be a 1-D sequence of length num_timesteps >= 1, got shape {b.shape}"
        )
    if not np.all(np.isfinite(b)) or np.any(b <= 0.0) or np.any(b >= 1.0):
        raise ValueError(
            "betas must lie in the open interval (0, 1); got values in "
            f"[{np.nanmin(b)!r}, {np.nanmax(b)!r}]"
        )
    alphas = 1.0 - b
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    one_minus_abar = -np.expm1(np.cumsum(np.log1p(-b)))  # 1 - abar_t without cancellation
    one_minus_abar_prev = np.concatenate([[0.0], one_minus_abar[:-1]])
    post_var = b * one_minus_abar_prev / one_minus_abar
    if b.shape[0] > 1:
        post_log_var = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
    else:  # T = 1 has no posterior entry 1; fall back to the forward variance.
        post_log_var = np.log(b)
    tables = dict(
        betas=b,
        alphas=alphas,
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        sqrt_alphas_cumprod=np.sqrt(abar),
        sqrt_one_minus_alphas_cumprod=np.sqrt(one_minus_abar),
        reciprocal_sqrt_alphas=1.0 / np.sqrt(alphas),
        posterior_variance=post_var,
        posterior_log_variance_clipped=post_log_var,
        posterior_mean_coef1=np.sqrt(abar_prev) * b / one_minus_abar,
        posterior_mean_coef2=np.sqrt(alphas) * one_minus_abar_prev / one_minus_abar,
        sigma=np.sqrt(post_var),
    )
    return Schedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in tables.items()})


def linear(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """The seed's / DDPM's schedule: betas linear from beta_start to beta_end (Ho et al. 2020)."""
    n = _check_num_timesteps(num_timesteps)
    lo = _check_open_unit("beta_start", beta_start)
    hi = _check_open_unit("beta_end", beta_end)
    return from_betas(np.linspace(lo, hi, n, dtype=np.float64))


def scaled_linear(
    num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Schedule:
    """Linear in sqrt(beta), as used by latent / Stable Diffusion (Rombach et al. 2022)."""
    n = _check_num_timesteps(num_timesteps)
    lo = _check_open_unit("beta_start", beta_start)
    hi = _check_open_unit("beta_end", beta_end)
    return from_betas(np.linspace(math.sqrt(lo), math.sqrt(hi), n, dtype=np.float64) ** 2)


def _betas_from_alpha_bar(alpha_bar: Callable[[np.ndarray], np.ndarray], n: int, max_beta: float):
    """beta_t = min(1 - abar(t+1/T) / abar(t/T), max_beta) (Nichol & Dhariwal 2021, sec. 3.2)."""
    grid = np.arange(n + 1, dtype=np.float64) / n
    ab = alpha_bar(grid)
    betas = 1.0 - ab[1:] / ab[:-1]
    return np.clip(betas, 1e-12, max_beta)


def cosine(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17).

    abar(u) = f(u) / f(0), f(u) = cos^2(pi/2 (u + s) / (1 + s)), u = t / T; betas clipped
    at max_beta to avoid the singularity at u = 1.
    """
    n = _check_num_timesteps(num_timesteps)
    if not float(s) >= 0.0:
        raise ValueError(f"s must be >= 0, got {s}")
    max_beta = _check_open_unit("max_beta", max_beta)
    s = float(s)

    def alpha_bar(u):
        f = np.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2
        return f / math.cos(s / (1.0 + s) * math.pi / 2.0) ** 2

    return from_betas(_betas_from_alpha_bar(alpha_bar, n, max_beta))


def sigmoid(
    num_timesteps: int = 1000,
    start: float = -3.0,
    end: float = 3.0,
    tau: float = 1.0,
    max_beta: float = 0.999,
) -> Schedule:
    """Sigmoid schedule of Jabri et al. 2023 ("Scalable Adaptive Computation for
    Iterative Generation", the continuous-time gamma(u) of their schedule appendix).

    abar(u) = (sig(end / tau) - sig((u (end - start) + start) / tau)) / (sig(end / tau) - sig(start / tau)),
    u = t / T, betas derived and clipped as for `cosine`.
    """
    n = _check_num_timesteps(num_timesteps)
    if not float(end) > float(start):
        raise ValueError(f"end must be > start, got start={start}, end={end}")
    if not float(tau) > 0.0:
        raise ValueError(f"tau must be > 0, got {tau}")
    max_beta = _check_open_unit("max_beta", max_beta)
    start, end, tau = float(start), float(end), float(tau)

    def sig(z):
        return 1.0 / (1.0 + np.exp(-z))

    v_start, v_end = sig(start / tau), sig(end / tau)

    def alpha_bar(u):
        return (v_end - sig((u * (end - start) + start) / tau)) / (v_end - v_start)

    return from_betas(_betas_from_alpha_bar(alpha_bar, n, max_beta))


_CONSTRUCTORS: dict[str, Callable[..., Schedule]] = {
    "linear": linear,
    "cosine": cosine,
    "scaled_linear": scaled_linear,
    "sigmoid": sigmoid,
}

NAMES: tuple[str, ...] = tuple(_CONSTRUCTORS)


def make(name: str, **kwargs) -> Schedule:
    """Builds a schedule by name (for configs): ``make("cosine", num_timesteps=1000)``."""
    if name not in _CONSTRUCTORS:
        raise ValueError(f"schedule name must be one of {NAMES}, got {name!r}")
    return _CONSTRUCTORS[name](**kwargs)
