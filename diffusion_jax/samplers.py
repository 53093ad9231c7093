"""Samplers: pure reverse-step functions and one jit-able loop, `sample`.

Index convention as in `diffusion_jax.schedules`: t in [0, T); a target timestep
t_prev = -1 means clean data (abar = 1). Notation alpha_t = sqrt(abar_t),
sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t) (half log-SNR).

Step functions (explicit noise, no hidden state):
  ddpm_step           ancestral step of Ho et al. 2020 (Algorithm 2) with the correct noise
                      scale sigma_t (the seed's noise term is garbled; see `diffusion_jax.diffusion`).
  ddim_step           Song et al. 2021 (DDIM, eq. 12) from t to any t_prev < t, eta in [0, 1].
  dpm_solver_pp_step  DPM-Solver++(2M), Lu et al. 2022 ("DPM-Solver++", Algorithm 2): a
                      multistep second-order solver of the diffusion ODE in data-prediction form.

`sample` runs a whole trajectory inside one `lax.scan` and is traceable, so it can be
called inside a caller's `jax.jit` with a `denoise_fn` that closes over traced params.
Methods are registered in `SAMPLERS` (name -> loop function).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion
from diffusion_jax.diffusion import PREDICTIONS, VARIANCES, p_mean_variance, predict_eps, predict_x0
from diffusion_jax.schedules import Schedule

__all__ = [
    "ddpm_step",
    "ddim_step",
    "dpm_solver_pp_step",
    "make_timesteps",
    "sample",
    "SAMPLERS",
    "METHODS",
    "SPACINGS",
    "DEFAULT_SPACING",
]


def _check(field, value, allowed):
    if value not in allowed:
        raise ValueError(f"{field} must be one of {tuple(allowed)}, got {value!r}")


def _alpha_sigma_ext(schedule: Schedule, t, ndim: int):
    """(alpha, sigma) at t, with t = -1 giving the clean limit (1, 0); shaped to broadcast."""
    t = jnp.asarray(t, jnp.int32)
    idx = jnp.maximum(t, 0)
    clean = t < 0
    a = jnp.where(clean, 1.0, schedule.sqrt_alphas_cumprod[idx])
    s = jnp.where(clean, 0.0, schedule.sqrt_one_minus_alphas_cumprod[idx])
    shape = a.shape + (1,) * (ndim - a.ndim)
    return a.reshape(shape), s.reshape(shape), clean.reshape(shape)


# ----------------------------------------------------------------------------- steps


def ddpm_step(
    schedule: Schedule,
    x_t,
    t,
    model_output,
    noise,
    *,
    prediction: str = "eps",
    variance: str = "small",
    clip_x0=None,
) -> jax.Array:
    """x_{t-1} = mu_theta(x_t, t) + sigma_t z (Ho et al. 2020, Algorithm 2); no noise at t = 0.

    sigma_t^2 is the posterior variance ("small"), beta_t ("large") or the learned
    interpolation ("learned_range"), see `diffusion.p_mean_variance`.
    """
    out = p_mean_variance(
        schedule, x_t, t, model_output, prediction=prediction, variance=variance, clip_x0=clip_x0
    )
    t = jnp.asarray(t, jnp.int32)
    nonzero = (t > 0).astype(x_t.dtype)
    nonzero = nonzero.reshape(nonzero.shape + (1,) * (x_t.ndim - nonzero.ndim))
    return out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise


def ddim_step(
    schedule: Schedule,
    x_t,
    t,
    t_prev,
    model_output,
    *,
    eta: float = 0.0,
    noise=None,
    prediction: str = "eps",
    clip_x0=None,
) -> jax.Array:
    """DDIM step from t to t_prev (Song et al. 2021, eq. 12), t_prev = -1 meaning abar = 1:

        x_prev = alpha_prev x0_hat + sqrt(sigma_prev^2 - s^2) eps_hat + s z,
        s = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev).

    eta = 0 is deterministic; eta = 1 is the ancestral DDPM step ("small" variance) on the
    respaced schedule. With clip_x0, eps_hat is recomputed from the clipped x0_hat.
    """
    _check("prediction", prediction, PREDICTIONS)
    nd = x_t.ndim
    x0 = diffusion._clip(predict_x0(schedule, x_t, t, model_output, prediction), clip_x0)
    a_t, s_t, _ = _alpha_sigma_ext(schedule, t, nd)
    eps = (x_t - a_t * x0) / s_t if clip_x0 not in (None, False) else predict_eps(
        schedule, x_t, t, model_output, prediction
    )
    a_p, s_p, _ = _alpha_sigma_ext(schedule, t_prev, nd)
    if isinstance(eta, (int, float)) and eta == 0.0:
        return a_p * x0 + s_p * eps
    if noise is None:
        raise ValueError("ddim_step: eta > 0 needs `noise` (an array shaped like x_t)")
    # s^2 = eta^2 (sigma_p^2 / sigma_t^2) (1 - abar_t / abar_p)
    step_var = (eta**2) * (s_p / s_t) ** 2 * (1.0 - (a_t / a_p) ** 2)
    dir_scale = jnp.sqrt(jnp.maximum(s_p**2 - step_var, 0.0))
    return a_p * x0 + dir_scale * eps + jnp.sqrt(step_var) * noise


def _dpmpp_update(schedule, x_t, t, t_prev, x0, prev_x0, prev_t, use_prev):
    """One DPM-Solver++(2M) update given the data predictions (Lu et al. 2022, Algorithm 2):

        h_i = lambda_{t_prev} - lambda_t,  r_i = h_{i-1} / h_i,
        D_i = (1 + 1/(2 r_i)) x0_t - 1/(2 r_i) x0_{prev_t}     (first order: D_i = x0_t),
        x_{t_prev} = (sigma_{t_prev} / sigma_t) x_t - alpha_{t_prev} (exp(-h_i) - 1) D_i.

    The step to the clean limit (t_prev = -1, sigma = 0, h = inf) is first order and
    returns D_i = x0_t, as the formula gives in that limit.
    """
    nd = x_t.ndim
    a_t, s_t, _ = _alpha_sigma_ext(schedule, t, nd)
    a_n, s_n, final = _alpha_sigma_ext(schedule, t_prev, nd)
    a_p, s_p, _ = _alpha_sigma_ext(schedule, prev_t, nd)
    lam_t = jnp.log(a_t) - jnp.log(s_t)
    lam_n = jnp.log(a_n) - jnp.log(jnp.where(final, 1.0, s_n))
    lam_p = jnp.log(a_p) - jnp.log(jnp.where(s_p > 0, s_p, 1.0))
    h = jnp.where(final, 1.0, lam_n - lam_t)
    r = (lam_t - lam_p) / h
    second = jnp.logical_and(jnp.asarray(use_prev), jnp.logical_not(final))
    c = jnp.where(second, 0.5 / jnp.where(second, r, 1.0), 0.0)
    d = x0 + c * (x0 - prev_x0)
    ratio = jnp.where(final, 0.0, s_n / s_t)
    phi = jnp.where(final, 1.0, -a_n * jnp.expm1(-h))
    return ratio * x_t + phi * d


def dpm_solver_pp_step(
    schedule: Schedule,
    x_t,
    t,
    t_prev,
    model_output,
    *,
    prev_x0=None,
    prev_t=None,
    prediction: str = "eps",
    clip_x0=None,
):
    """DPM-Solver++(2M) step from t to t_prev (t_prev = -1: clean limit).

    prev_x0 is the data prediction made at the previous (larger) timestep prev_t; without
    it the step is first order (equal to DDIM). Returns (x_{t_prev}, x0_hat at t); feed the
    second value back as prev_x0 (with prev_t = t) in the next step.
    """
    _check("prediction", prediction, PREDICTIONS)
    x0 = diffusion._clip(predict_x0(schedule, x_t, t, model_output, prediction), clip_x0)
    if prev_x0 is None:
        return _dpmpp_update(schedule, x_t, t, t_prev, x0, x0, t, False), x0
    if prev_t is None:
        raise ValueError("dpm_solver_pp_step: prev_x0 needs prev_t, the timestep it was predicted at")
    return _dpmpp_update(schedule, x_t, t, t_prev, x0, prev_x0, prev_t, True), x0


# ----------------------------------------------------------------------------- timesteps


def _leading(T, n):
    return (np.arange(n) * (T // n))[::-1]


def _trailing(T, n):
    # Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2.
    return np.round(T - np.arange(n) * (T / n)).astype(np.int64) - 1


def _linspace(T, n):
    return np.round(np.linspace(T - 1, 0, n)).astype(np.int64)


# Lower end of the "logsnr" grid: sigma / alpha = 80, the largest noise level of Karras et
# al. 2022 (EDM, sigma_max = 80 for data in [-1, 1]); below it the data prediction hardly
# changes, so steps spent there (e.g. on the clipped tail of the cosine schedule) are wasted.
LOGSNR_SPACING_MIN_LAMBDA = -math.log(80.0)


def _logsnr(schedule, n):
    """Model calls at t_1 = T - 1, then t_2 > ... > t_N = 0 with half log-SNR
    lambda = log(alpha / sigma) uniform on [max(lambda_{T-1}, -log 80), lambda_0] (the
    logSNR-uniform steps of Lu et al. 2022, DPM-Solver sec. 3.3, floored at EDM's sigma_max);
    each point moved to the discrete t of nearest lambda, then made strictly decreasing.
    Uses numpy for a concrete schedule and jnp for a traced one."""
    try:
        ab, xp = np.asarray(schedule.alphas_cumprod, dtype=np.float64), np
    except jax.errors.TracerArrayConversionError:
        ab, xp = schedule.alphas_cumprod, jnp
    T = ab.shape[0]
    lam = 0.5 * (xp.log(ab) - xp.log1p(-ab))  # increases as t decreases
    targets = xp.linspace(xp.maximum(lam[-1], LOGSNR_SPACING_MIN_LAMBDA), lam[0], n)
    ts = xp.argmin(xp.abs(lam[None, :] - targets[:, None]), axis=1)
    ts = xp.where(xp.arange(n) == 0, T - 1, ts)
    i = xp.arange(n)
    # ts[i] >= ts[i+1] + 1, enforced from the end: ts[i] = max_{j >= i}(ts[j] + j) - i ...
    ts = xp.flip(_cum(xp, "max", xp.flip(ts + i))) - i
    # ... and ts[i] <= ts[i-1] - 1 from the start, with ts[0] <= T - 1.
    ts = _cum(xp, "min", xp.minimum(ts, T - 1) + i) - i
    return ts.astype(xp.int32)


def _cum(xp, op, a):
    if xp is np:
        return (np.maximum if op == "max" else np.minimum).accumulate(a)
    return (jax.lax.cummax if op == "max" else jax.lax.cummin)(a, axis=0)


# Each takes (schedule, num_steps) and returns decreasing int timesteps.
_SPACINGS: dict[str, Callable[[Schedule, int], np.ndarray]] = {
    "leading": lambda sch, n: _leading(sch.num_timesteps, n),
    "trailing": lambda sch, n: _trailing(sch.num_timesteps, n),
    "linspace": lambda sch, n: _linspace(sch.num_timesteps, n),
    "logsnr": _logsnr,
}
SPACINGS = tuple(_SPACINGS)


def make_timesteps(schedule: Schedule, num_steps: int, spacing: str = "logsnr") -> np.ndarray:
    """Decreasing int32 timesteps t_1 > ... > t_N in [0, T) at which the model is called
    (numpy; a jnp array for "logsnr" with a traced schedule).

    "leading":  0, T//N, 2 T//N, ... reversed (DDIM paper / diffusers default; skips t near T-1).
    "trailing": round(T - i T/N) - 1, starts at T - 1 (Lin et al. 2024, sec. 3.4).
    "linspace": round(linspace(T - 1, 0, N)), both ends included.
    "logsnr":   T - 1, then uniform in log-SNR down to t = 0 (see `_logsnr`). The default of
                every method: on the Gaussian oracle (bench/bench_samplers.py) it has the smallest
                error for sharp data (s = 0.1) by 3-50x at 10-50 steps; for broad data (s >= 0.5)
                time-uniform grids ("trailing") are better for DPM-Solver++ at >= 20 steps.
    The sampler then steps from t_N to t = -1 (clean data).
    """
    _check("timestep_spacing", spacing, SPACINGS)
    num_timesteps = schedule.num_timesteps
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not (
        1 <= num_steps <= num_timesteps
    ):
        raise ValueError(
            f"num_steps must be an integer in [1, num_timesteps={num_timesteps}], got {num_steps!r}"
        )
    ts = _SPACINGS[spacing](schedule, int(num_steps))
    if isinstance(ts, np.ndarray):
        ts = ts.astype(np.int32)
        assert np.all(np.diff(ts) < 0) and ts[0] <= num_timesteps - 1 and ts[-1] >= 0, ts
    return ts


# ----------------------------------------------------------------------------- loops


def _prediction_channels(model_output, x, variance):
    """With learned variance the network returns 2C channels; deterministic steps use the first C."""
    if variance == "learned_range":
        return model_output[..., : x.shape[-1]]
    return model_output


def _call(denoise_fn, x, t):
    return denoise_fn(x, jnp.full((x.shape[0],), t, jnp.int32))


def _finish(x_T, x, ys, return_trajectory):
    if not return_trajectory:
        return x
    return x, jnp.concatenate([x_T[None], ys], axis=0)


def _sample_ddpm(denoise_fn, schedule, shape, key, *, num_steps, prediction, variance, eta,
                 clip_x0, timestep_spacing, return_trajectory):
    T = schedule.num_timesteps
    if num_steps is not None and num_steps != T:
        if variance != "small":
            raise ValueError(
                f"method='ddpm' with num_steps={num_steps} < T={T} (respaced) supports "
                f"variance='small' only, got {variance!r}; use num_steps=None for all T steps"
            )
        return _sample_ddim(denoise_fn, schedule, shape, key, num_steps=num_steps,
                            prediction=prediction, variance=variance, eta=1.0, clip_x0=clip_x0,
                            timestep_spacing=timestep_spacing, return_trajectory=return_trajectory)
    k_init, k_steps = jax.random.split(key)
    x_T = jax.random.normal(k_init, shape, jnp.float32)

    def body(x, inp):
        t, k = inp
        out = _call(denoise_fn, x, t)
        x = ddpm_step(schedule, x, jnp.full((shape[0],), t, jnp.int32), out,
                      jax.random.normal(k, shape, x.dtype), prediction=prediction,
                      variance=variance, clip_x0=clip_x0)
        return x, (x if return_trajectory else None)

    ts = jnp.arange(T - 1, -1, -1, dtype=jnp.int32)
    x, ys = jax.lax.scan(body, x_T, (ts, jax.random.split(k_steps, T)))
    return _finish(x_T, x, ys, return_trajectory)


def _sample_ddim(denoise_fn, schedule, shape, key, *, num_steps, prediction, variance, eta,
                 clip_x0, timestep_spacing, return_trajectory):
    T = schedule.num_timesteps
    ts = make_timesteps(schedule, T if num_steps is None else num_steps, timestep_spacing)
    ts = jnp.asarray(ts, jnp.int32)
    prev = jnp.concatenate([ts[1:], jnp.full((1,), -1, jnp.int32)])
    k_init, k_steps = jax.random.split(key)
    x_T = jax.random.normal(k_init, shape, jnp.float32)
    stochastic = not (isinstance(eta, (int, float)) and eta == 0.0)

    def body(x, inp):
        t, t_prev, k = inp
        out = _prediction_channels(_call(denoise_fn, x, t), x, variance)
        noise = jax.random.normal(k, shape, x.dtype) if stochastic else None
        x = ddim_step(schedule, x, t, t_prev, out, eta=eta, noise=noise,
                      prediction=prediction, clip_x0=clip_x0)
        return x, (x if return_trajectory else None)

    xs = (ts, prev, jax.random.split(k_steps, ts.shape[0]))
    x, ys = jax.lax.scan(body, x_T, xs)
    return _finish(x_T, x, ys, return_trajectory)


def _sample_dpm_solver_pp(denoise_fn, schedule, shape, key, *, num_steps, prediction, variance,
                          eta, clip_x0, timestep_spacing, return_trajectory):
    T = schedule.num_timesteps
    ts = make_timesteps(schedule, T if num_steps is None else num_steps, timestep_spacing)
    ts = jnp.asarray(ts, jnp.int32)
    prev = jnp.concatenate([ts[1:], jnp.full((1,), -1, jnp.int32)])
    last = jnp.concatenate([ts[:1], ts[:-1]])  # timestep of the previous x0
    use_prev = jnp.arange(ts.shape[0]) > 0  # first step is first order
    x_T = jax.random.normal(key, shape, jnp.float32)

    def body(carry, inp):
        x, prev_x0 = carry
        t, t_prev, t_last, second = inp
        out = _prediction_channels(_call(denoise_fn, x, t), x, variance)
        x0 = diffusion._clip(predict_x0(schedule, x, t, out, prediction), clip_x0)
        x = _dpmpp_update(schedule, x, t, t_prev, x0, prev_x0, t_last, second)
        return (x, x0), (x if return_trajectory else None)

    xs = (ts, prev, last, use_prev)
    (x, _), ys = jax.lax.scan(body, (x_T, jnp.zeros_like(x_T)), xs)
    return _finish(x_T, x, ys, return_trajectory)


SAMPLERS: dict[str, Callable] = {
    "ddpm": _sample_ddpm,
    "ddim": _sample_ddim,
    "dpm_solver_pp": _sample_dpm_solver_pp,
}
METHODS = tuple(SAMPLERS)

# Spacing used when `timestep_spacing=None`; chosen with bench/bench_samplers.py (Gaussian
# oracle, see `make_timesteps`). With num_steps=None "ddpm" visits every t whatever the spacing.
DEFAULT_SPACING = {"ddpm": "logsnr", "ddim": "logsnr", "dpm_solver_pp": "logsnr"}


def sample(
    denoise_fn: Callable,
    schedule: Schedule,
    shape,
    key,
    *,
    method: str = "ddpm",
    num_steps: int | None = None,
    prediction: str = "eps",
    variance: str = "small",
    eta: float = 0.0,
    clip_x0=None,
    timestep_spacing: str | None = None,
    return_trajectory: bool = False,
):
    """Draws samples x0 of `shape` from x_T ~ N(0, I) by running `method` for `num_steps`.

    denoise_fn(x_t, t) -> model_output (t int32 [B]); prediction in PREDICTIONS; variance in
    VARIANCES (used by "ddpm"; with "learned_range" the deterministic methods read the first
    C output channels). num_steps=None means all T timesteps. eta: DDIM stochasticity.
    clip_x0: None, True ([-1, 1]) or a bound applied to every x0 prediction.
    timestep_spacing: one of SPACINGS for the sub-sampled methods (None: DEFAULT_SPACING).
    Returns x0, or (x0, trajectory [num_steps + 1, *shape] starting at x_T) if return_trajectory.
    """
    _check("method", method, METHODS)
    _check("prediction", prediction, PREDICTIONS)
    _check("variance", variance, VARIANCES)
    spacing = DEFAULT_SPACING[method] if timestep_spacing is None else timestep_spacing
    _check("timestep_spacing", spacing, SPACINGS)
    return SAMPLERS[method](
        denoise_fn, schedule, tuple(shape), key, num_steps=num_steps, prediction=prediction,
        variance=variance, eta=eta, clip_x0=clip_x0, timestep_spacing=spacing,
        return_trajectory=return_trajectory,
    )
