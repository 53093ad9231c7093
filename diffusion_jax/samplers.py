"""Samplers: registered frozen dataclasses that carry their settings, for every process.

    sampler = samplers.make("heun", num_steps=18)           # or samplers.Heun(num_steps=18)
    denoise = samplers.denoiser(model_fn, process, "edm")    # model_fn(x_in, c_noise) -> output
    x0 = samplers.draw(sampler, denoise, process, shape, key)

A sampler walks a decreasing grid of process times t_0 > ... > t_N = t_clean (`time_grid`),
calling `denoise(x, t) -> Prediction(x0, eps, out)` at the first N of them. Every formula is
written with a = a(t), s = s(t) of the process (x_t = a x0 + s eps), sigma = s / a and
lambda = log(a / s), so each sampler works for every process: the probability-flow ODE
of any such process is dy/dsigma = (y - x0_hat) / sigma = eps_hat in y = x / a
(Karras et al. 2022, eq. 4 with s(t) = a, sigma(t) = s / a).

    name              NFE        paper
    ddpm              N          Ho et al. 2020, Algorithm 2 (ancestral; respaced: DDIM, eta = 1)
    ddim              N          Song et al. 2021, eq. 12 (eta)
    euler             N          Karras et al. 2022, Algorithm 1 without the correction (= DDIM, eta = 0)
    heun              2N - 1     Karras et al. 2022, Algorithm 1
    edm_sde           2N - 1     Karras et al. 2022, Algorithm 2 (S_churn, S_noise, S_min, S_max)
    dpm_solver_pp     N          Lu et al. 2022, DPM-Solver++(2M), Algorithm 2
    dpm_solver_pp_3m  N          Lu et al. 2022, DPM-Solver++(3M) (multistep; as its reference code)
    meanflow          N          Geng et al. 2025, Algorithm 2 (flow maps; flow process only)
    shortcut          N          Frans et al. 2024, Algorithm 2 (the same step on d = 1 / N)

Heun and edm_sde take an Euler step where their correction is undefined: into clean data
(sigma = 0, as in EDM) and out of pure noise (sigma = inf, flow at t = 1); NFE counts that.
A new sampler is one registered class here (its fields are its config.sample settings).

`sample(denoise_fn, schedule, ...)`, the discrete-DDPM API of earlier versions, is `draw`
with the registered sampler of that name on the DDPM process (the same default grids);
`ddpm_step`, `ddim_step` and `dpm_solver_pp_step` are single steps over the updates above.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion, processes
from diffusion_jax.diffusion import PREDICTIONS, VARIANCES, p_mean_variance
from diffusion_jax.processes import DDPM
from diffusion_jax.schedules import Schedule

__all__ = [
    "Prediction", "denoiser", "draw", "time_grid", "GRIDS", "SAMPLERS", "NAMES", "make",
    "from_config", "default_settings", "ddim_update", "dpmpp_update",
    "ddpm_step", "ddim_step", "dpm_solver_pp_step", "sample",
]


def _check(field, value, allowed):
    if value not in allowed:
        raise ValueError(f"{field} must be one of {tuple(allowed)}, got {value!r}")


def _bcast(v, ndim):
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


# ----------------------------------------------------------------------------- denoiser


class Prediction(NamedTuple):
    """What a sampler gets from the network at (x_t, t): x0_hat, eps_hat and the raw output."""

    x0: jax.Array
    eps: jax.Array
    out: jax.Array


def denoiser(model_fn: Callable, process, prediction: str = "eps", clip_x0=None) -> Callable:
    """denoise(x_t, t) -> Prediction for a network `model_fn(x_in, c_noise)`, whose inputs the
    process makes (`network_inputs`, EDM's c_in and c_noise) and whose output of type
    `prediction` it converts. With 2C output channels (a learned variance) the first C are
    the prediction. clip_x0: None, True ([-1, 1]) or a bound for x0_hat; eps_hat is then
    recomputed from the clipped x0_hat. denoise(x_t, t, r) (flow maps, `flow_maps`): the network
    also gets the interval [r, t] (`process.interval_input`, model_fn's third argument) and
    `out` is its average velocity over it."""
    processes.check_prediction(process, prediction)

    def denoise(x, t, r=None):
        t = jnp.asarray(t)  # a scalar time stays one for the conversions
        tb = jnp.broadcast_to(t, (x.shape[0],))
        if r is None:
            out = model_fn(*process.network_inputs(x, tb))
        else:
            out = model_fn(*process.network_inputs(x, tb), process.interval_input(tb, jnp.broadcast_to(r, tb.shape)))
        m = out[..., : x.shape[-1]] if out.shape[-1] != x.shape[-1] else out
        x0 = diffusion._clip(processes.to_x0(process, x, t, m, prediction), clip_x0)
        if clip_x0 is None or clip_x0 is False:
            eps = processes.to_eps(process, x, t, m, prediction)
        else:
            a, s = process.alpha_sigma(t)
            eps = (x - _bcast(a, x.ndim) * x0) / _bcast(s, x.ndim)
        return Prediction(x0, eps, out)

    return denoise


# ----------------------------------------------------------------------------- updates


def ddim_update(x, pred: Prediction, a, s, a_next, s_next, *, eta=0.0, noise=None,
                variance_preserving=True):
    """DDIM from (a, s) to (a_next, s_next) (Song et al. 2021, eq. 12, any Gaussian process):

        x_next = a_next x0_hat + sqrt(s_next^2 - c^2) eps_hat + c z,
        c^2 = eta^2 (s_next / s)^2 (s^2 - (a / a_next)^2 s_next^2),

    eta^2 times the posterior variance of q(x_next | x_t, x0) (for a VP process the last
    factor is 1 - (a / a_next)^2). eta = 0 is Euler on the probability-flow ODE in sigma."""
    if isinstance(eta, (int, float)) and eta == 0.0:
        return a_next * pred.x0 + s_next * pred.eps
    if noise is None:
        raise ValueError("ddim_step: eta > 0 needs `noise` (an array shaped like x_t)")
    transition = 1.0 - (a / a_next) ** 2 if variance_preserving else s * s - (a / a_next) ** 2 * s_next**2
    step_var = (eta**2) * (s_next / s) ** 2 * transition
    dir_scale = jnp.sqrt(jnp.maximum(s_next**2 - step_var, 0.0))
    return a_next * pred.x0 + dir_scale * pred.eps + jnp.sqrt(step_var) * noise


def _half_log_snr(a, s):
    """lambda = log(a / s), with s = 0 read as lambda = +inf's stand-in 0 (masked by callers)."""
    return jnp.log(a) - jnp.log(jnp.where(s > 0, s, 1.0))


def dpmpp_update(x, x0, a, s, a_next, s_next, history=(), order: int = 2, d2_weight: float = 1.0):
    """One DPM-Solver++ multistep update (Lu et al. 2022) in data-prediction form,
    h = lambda_next - lambda, x_next = (s_next / s) x - a_next (exp(-h) - 1) D:

      order 1: D = x0;
      order 2 (2M, Algorithm 2): D = x0 + (x0 - x0_prev) / (2 r), r = h_prev / h;
      order 3 (3M): with r0 = h_prev / h, r1 = h_prev2 / h, D1_0 = (x0 - x0_prev) / r0,
        D1_1 = (x0_prev - x0_prev2) / r1, D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1) ~ h x0',
        D2 = (D1_0 - D1_1) / (r0 + r1) ~ h^2 x0'' / 2, phi_2 = (e^-h - 1) / h + 1,
        phi_3 = (e^-h - 1 + h) / h^2 - 1/2:
        x_next = (s_next / s) x - a_next (e^-h - 1) x0 + a_next phi_2 D1 - w a_next phi_3 D2,
        after a second-order warm-up step x_next = (s_next / s) x - a_next (e^-h - 1) x0
        + a_next phi_2 D1_0 (the same expansion one term shorter).

    d2_weight w: 1 (default) is the 3M of DPM-Solver's reference code, k-diffusion
    (`sample_dpmpp_3m_sde`, eta = 0) and diffusers. w = 2 is the Taylor term of
    x_next = (s_next / s) x + s_next int e^lambda x0(lambda) d lambda: exact when x0 is
    quadratic in lambda, local error O(h^4), third order as h -> 0, where w = 1 is second
    order. With 10 to 40 calls on EDM's rho = 7 grid w = 2 is the worse one (1.6-2x on a
    two-mode law, docs/samplers.md): where the data prediction bends (sigma of the order
    of the data's spread) a full curvature term extrapolated from the last three calls
    overshoots; w = 2 wins from about 80 calls on.

    history: ((x0_prev, a_prev, s_prev, use), (x0_prev2, a_prev2, s_prev2, use)) as far as
    needed, each `use` a mask of whether that call happened. Into clean data (s_next = 0,
    h = inf) the update is x_next = x0, the first-order limit. A previous point at
    lambda = -inf (pure noise) gives r = inf, so the update falls back to the lower order
    there by itself.
    """
    final = s_next == 0
    lam, lam_n = _half_log_snr(a, s), _half_log_snr(a_next, s_next)
    h = jnp.where(final, 1.0, lam_n - lam)
    ratio = jnp.where(final, 0.0, s_next / s)
    phi = jnp.where(final, 1.0, -a_next * jnp.expm1(-h))
    if order == 1 or not history:
        return ratio * x + phi * x0
    (x0_p, a_p, s_p, use_p) = history[0]
    lam_p = _half_log_snr(a_p, s_p)
    r0 = (lam - lam_p) / h
    second = jnp.logical_and(use_p, jnp.logical_not(final))
    c = jnp.where(second, 0.5 / jnp.where(second, r0, 1.0), 0.0)
    if order == 2:
        return ratio * x + phi * (x0 + c * (x0 - x0_p))
    (x0_pp, a_pp, s_pp, use_pp) = history[1]
    third = jnp.logical_and(use_pp, second)
    r1 = jnp.where(third, (lam_p - _half_log_snr(a_pp, s_pp)) / h, 1.0)
    r0 = jnp.where(third, r0, 1.0)
    em1 = jnp.expm1(-h)
    phi_2, phi_3 = em1 / h + 1.0, (em1 + h) / (h * h) - 0.5
    d1_0 = (x0 - x0_p) / jnp.where(second, (lam - lam_p) / h, 1.0)
    d1_1 = (x0_p - x0_pp) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    first_order = ratio * x + phi * x0
    third_order = first_order + a_next * phi_2 * d1 - d2_weight * a_next * phi_3 * d2
    second_order = first_order + a_next * phi_2 * d1_0
    return jnp.where(third, third_order, jnp.where(second, second_order, first_order))


# ----------------------------------------------------------------------------- time grids


# The data scale the "logsnr" and "cosine" grids assume: EDM's sigma_data for [-1, 1] ("cosine_half": `_DDIM_SCALE`).
_SIGMA_DATA = 0.5


def _sigma_spaced(spacing: Callable[[float, float, int], np.ndarray]):
    """A grid from decreasing noise levels on the process's [sigma_min, sigma_max], mapped to
    its times, the first replaced by t_max (where every sampler of the process starts)."""

    def grid(process, n, rho):
        lo, hi = process.sigma_range()
        ts = np.array(process.times_for_sigmas(spacing(lo, hi, n, rho)))
        ts[0] = process.t_max
        return ts

    return grid


def _rho(lo, hi, n, rho):
    """Karras et al. 2022, eq. 5: sigma_i = (hi^(1/rho) + i/(n-1) (lo^(1/rho) - hi^(1/rho)))^rho."""
    i = np.arange(n) / max(n - 1, 1)
    return (hi ** (1 / rho) + i * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def _prior_start(n):
    """sigma = cot(pi / 4n): on a variance-preserving process (a = cos phi, s = sin phi,
    sigma = tan phi) half the top step of n steps uniform in phi below pure noise."""
    return 1.0 / math.tan(math.pi / (4 * n))


def _logsnr(lo, hi, n, rho):
    """hi, then half log-SNR lambda = -log sigma uniform (Lu et al. 2022, DPM-Solver sec. 3.3)
    in steps h from sigma_1 = min(hi, cot(pi / 4n)) (the grid's first point when that is hi)
    down to the last call sigma_b = max(lo, sigma_data h / sqrt(8)), sigma_data = 0.5,
    h = log(sigma_1 / sigma_b) / (the steps between them), a fixed point; then x0_hat, into
    clean data. DPM-Solver++'s default, 2M and 3M.

    sigma_1 is DDIM's start on VP processes (`_prior_start`): the first step, first order
    from hi, shrinks the spread of data of scale D by about D^2 / (2 sigma_1^2)
    = (pi D / 4n)^2 / 2, O(1 / n^2) like the steps below it, for D of several units (modes
    3.5 apart need sigma_1 >~ 10; cot(pi / 2n) / 2, 3.2 at n = 10, lost 2.5x to diffusers).
    sigma_b balances DPM-Solver++(2M)'s two errors on Gaussian data N(m, c^2): its local error
    h^3 (x0' / 12 + 5 x0'' / 12) (x0 the data prediction along the flow, ' = d / d lambda),
    carried along the flow and summed over uniform steps h from sigma >> c to sigma << c,
    widens the spread by the factor 1 + h^2 / 16 whatever c; the last jump, x0_hat at
    sigma_b, narrows it by c / sqrt(c^2 + sigma_b^2) ~ 1 - sigma_b^2 / (2 c^2). They cancel at
    sigma_b = c h / sqrt(8), taken for c = sigma_data: 0.11 at n = 10, 0.06 at 20, 0.03 at 50
    (sharper data pays for it: N(0.3, 0.1^2) ends 2.5-28x less accurate than on the previous
    grid, which ran from cot(pi / 2n) / 2 to lo; still ahead of diffusers', docs/samplers.md)."""
    if n == 1:
        return np.array([hi])
    top = min(hi, _prior_start(n))
    m = n if top == hi else n - 1  # calls on the uniform part (hi is its first when it starts there)
    last = lo
    for _ in range(30):  # sigma_b = k log(top / sigma_b): contracts by 1 / log(top / sigma_b) ~ 1/5
        last = min(max(lo, _SIGMA_DATA * math.log(top / last) / (max(m - 1, 1) * math.sqrt(8.0))), top)
    uniform = np.exp(np.linspace(math.log(top), math.log(last), m)) if m > 1 else np.array([last])
    return uniform if m == n else np.concatenate([[hi], uniform])


def _cosine(lo, hi, n, rho):
    """sigma = tan(theta) / 2, theta uniform: uniform in arctan(sigma / sigma_data) with
    sigma_data = 0.5, the time-uniform grid of a cosine schedule (log-SNR -2 log tan(pi t / 2),
    Nichol & Dhariwal 2021) for data of that scale; where Euler's local error
    ~ sigma_data^2 / (sigma_data^2 + sigma^2)^(3/2) is spread evenly, nearly."""
    k = _SIGMA_DATA
    return k * np.tan(np.linspace(math.atan(hi / k), math.atan(lo / k), n))


def _half_step_angles(top, bottom, n):
    """theta_i = top - i d (i < n), d = min(top / (n - 1/2), (top - bottom) / (n - 1)): uniform
    steps whose last call sits half a step above clean data (theta = 0), or at `bottom` when
    that is higher (many steps)."""
    if n == 1:
        return np.array([top])
    d = min(top / (n - 0.5), (top - bottom) / (n - 1))
    return top - d * np.arange(n)


# The data scale of DDIM's grid: between [-1, 1] data's sigma_data = 0.5 and wider laws (MNIST's
# pixel std in [-1, 1] is 0.62). At 0.5 DDIM lost 1.09x to diffusers' grid on issue #21's wide
# mixture at 50 steps; at 0.65 it is at most 0.93x diffusers' on every law of
# bench/bench_default_grids.py at 10, 20 and 50 steps (sharp data gives back 8-30% of its lead).
_DDIM_SCALE = 0.65


def _cosine_half(process, n, rho):
    """DDIM's grid: theta = arctan(sigma / k) (k = `_DDIM_SCALE`, 0.65) in uniform steps from
    theta(sigma_top), the final jump to clean data half a step (`_half_step_angles`, never
    ending below sigma_min). A DDIM step from theta to theta' scales the spread of Gaussian
    data of std k by cos(theta - theta'), exactly, so from a given start equal steps
    down to theta = 0 are Euler's best grid for such data; the half last step spares sharper
    data. sigma_top: on a variance-preserving process (ddpm, vp), whose prior N(0, I) is the
    law of x_t for unit-variance data at every t, min(sigma_max, cot(pi / 4N))
    (`_prior_start`; on the cosine schedule diffusers' "leading" grid starts about a whole
    such step down, t = 900 of 1000 at N = 10); elsewhere sigma_max, at t_max."""
    lo, hi = process.sigma_range()
    top = min(hi, _prior_start(n)) if process.variance_preserving else hi
    k = _DDIM_SCALE
    theta = _half_step_angles(math.atan(top / k), math.atan(lo / k), n)
    ts = np.array(process.times_for_sigmas(k * np.tan(theta)))
    if top >= hi:
        ts[0] = process.t_max
    elif process.discrete:  # the nearest step to sigma_top, then strictly below it
        t0 = max(int(process.t_of_sigma(np.array(top))), n - 1)
        ts = np.minimum(ts, t0 - np.arange(n))
    return ts


def _linear(process, n, rho):
    """n times uniform from t_max to the time of sigma_min (DDPM: linspace(T - 1, 0))."""
    lo = 0 if process.discrete else process.times_for_sigmas(np.array([process.sigma_range()[0]]))[0]
    ts = np.linspace(process.t_max, lo, n)
    return np.round(ts).astype(np.int64) if process.discrete else ts


def _trailing(process, n, rho):
    """t_max - i (t_max - t_clean) / n: uniform steps that end on clean data
    (Lin et al. 2024, Table 2; DDPM: round(T - i T / n) - 1)."""
    if process.discrete:
        T = process.num_timesteps
        return np.round(T - np.arange(n) * (T / n)).astype(np.int64) - 1
    return process.t_max - np.arange(n) * (process.t_max - process.t_clean) / n


def _leading(process, n, rho):
    """0, T//n, 2 T//n, ... reversed (DDIM paper, diffusers' default; DDPM only)."""
    if not process.discrete:
        raise ValueError(f"grid 'leading' is for the discrete process 'ddpm', not {process.name!r}")
    T = process.num_timesteps
    return (np.arange(n) * (T // n))[::-1]


GRIDS: dict[str, Callable] = {
    "rho": _sigma_spaced(_rho),
    "logsnr": _sigma_spaced(_logsnr),
    "cosine": _sigma_spaced(_cosine),
    "cosine_half": _cosine_half,
    "linear": _linear,
    "trailing": _trailing,
    "leading": _leading,
}


def time_grid(process, num_steps: int, grid: str = "rho", rho: float = 7.0) -> np.ndarray:
    """Decreasing times t_0 = t_max > ... > t_{N-1} of the N network calls, then t_N = t_clean
    (numpy, [N + 1]; int32 for DDPM). Grids: "rho" (EDM, eq. 5), "logsnr" (uniform half
    log-SNR), "cosine" (uniform arctan(sigma / 0.5)), all on the process's [sigma_min,
    sigma_max]; "cosine_half" (`_cosine_half`: arctan steps, half a step into clean data, on VP
    processes from sigma = cot(pi / 4N)); "linear" (uniform t down to the time of sigma_min),
    "trailing" (uniform t ending on clean data), "leading" (DDPM only). t_0 = t_max except
    for "cosine_half" on VP processes."""
    _check("grid", grid, GRIDS)
    limit = process.num_timesteps if process.discrete else math.inf
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= limit:
        bound = f"[1, num_timesteps={limit}]" if process.discrete else ">= 1"
        raise ValueError(f"num_steps must be an integer in {bound}, got {num_steps!r}")
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be a finite number > 0, got {rho!r}")
    ts = np.asarray(GRIDS[grid](process, int(num_steps), float(rho)))
    ts = np.concatenate([ts, [process.t_clean]])
    if process.discrete:
        ts = ts.astype(np.int32)
    else:
        ts = ts.astype(np.float64)
    if not np.all(np.diff(ts) < 0):
        raise ValueError(f"grid {grid!r} with num_steps={num_steps} does not decrease strictly: {ts}")
    return ts


# ----------------------------------------------------------------------------- samplers


def _is_concrete(ts) -> bool:
    return not isinstance(ts, jax.core.Tracer)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Settings every sampler has: num_steps N (>= 1), the time grid ("" = the sampler's
    default) and EDM's rho (> 0) for the "rho" grid."""

    num_steps: int = 20
    grid: str = ""
    rho: float = 7.0

    name: ClassVar[str] = ""
    default_grid: ClassVar[str] = "rho"  # EDM's grid, the default of Heun and the EDM sampler

    def __post_init__(self):
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, (int, np.integer)) or self.num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {self.num_steps!r}")
        if self.grid:
            _check("grid", self.grid, GRIDS)
        if not (isinstance(self.rho, (int, float)) and math.isfinite(self.rho) and self.rho > 0):
            raise ValueError(f"rho must be a finite number > 0, got {self.rho!r}")

    def times(self, process) -> np.ndarray:
        """The sampler's grid for `process` (`time_grid`)."""
        return time_grid(process, self.num_steps, self.grid or self.default_grid, self.rho)

    def nfe(self, process) -> int:
        """Network evaluations per sample (a guided call counts once here)."""
        return self.num_steps

    def with_nfe(self, process, nfe: int) -> "Sampler":
        """This sampler with the most steps whose `nfe(process)` is at most `nfe` (>= 1 step)."""
        n = max(int(nfe), 1)
        while n > 1 and dataclasses.replace(self, num_steps=n).nfe(process) > nfe:
            n -= 1
        return dataclasses.replace(self, num_steps=n)

    def __call__(self, denoise, process, x_T, key=None, *, ts=None, return_trajectory=False):
        """x0 from x_T (drawn at t_0: `draw` does that) on `ts` (default: `times(process)`).
        Returns x0, or (x0, trajectory [N + 1, ...] from x_T) with return_trajectory."""
        ts = self.times(process) if ts is None else ts
        x, ys = self._run(denoise, process, x_T, key, ts, return_trajectory)
        if not return_trajectory:
            return x
        return x, jnp.concatenate([x_T[None], ys], axis=0)

    def _run(self, denoise, process, x, key, ts, keep):
        raise NotImplementedError


def _steps(process, ts):
    """Per step i: (t_i, a_i, s_i, t_{i+1}, a_{i+1}, s_{i+1}), as scan inputs."""
    ts = jnp.asarray(ts)
    a, s = process.alpha_sigma(ts)
    return ts[:-1], a[:-1], s[:-1], ts[1:], a[1:], s[1:]


def _alpha_sigma_at(process, t, ndim):
    """(a(t), s(t)) of one scalar time, shaped to broadcast against a rank-ndim batch."""
    a, s = process.alpha_sigma(t)
    return _bcast(a, ndim), _bcast(s, ndim)


def _step_keys(key, n):
    return jax.random.split(key, n) if key is not None else jnp.zeros((n, 2), jnp.uint32)


SAMPLERS: dict[str, type] = {}


def register(cls):
    """Class decorator: adds a sampler to SAMPLERS under its `name`."""
    SAMPLERS[cls.name] = cls
    return cls


@register
@dataclasses.dataclass(frozen=True)
class DDIM(Sampler):
    """DDIM (Song et al. 2021, eq. 12) with eta in [0, 1] (0: deterministic, 1: ancestral)."""

    eta: float = 0.0

    name: ClassVar[str] = "ddim"
    default_grid: ClassVar[str] = "cosine_half"  # beats diffusers' DDIM grid on the oracles (docs/samplers.md)

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.eta, (int, float)) and 0.0 <= self.eta <= 1.0):
            raise ValueError(f"eta must be a number with 0 <= eta <= 1, got {self.eta!r}")

    def _run(self, denoise, process, x, key, ts, keep):
        eta = float(self.eta)
        vp = process.variance_preserving
        if eta > 0 and key is None:
            raise ValueError(f"{self.name} with eta > 0 needs a PRNG key")

        def body(x, inp):
            t, t_n, k = inp
            (a, s), (a_n, s_n) = _alpha_sigma_at(process, t, x.ndim), _alpha_sigma_at(process, t_n, x.ndim)
            noise = jax.random.normal(k, x.shape, x.dtype) if eta > 0 else None
            x = ddim_update(x, denoise(x, t), a, s, a_n, s_n, eta=eta, noise=noise, variance_preserving=vp)
            return x, (x if keep else None)

        ts = jnp.asarray(ts)
        return jax.lax.scan(body, x, (ts[:-1], ts[1:], _step_keys(key, ts.shape[0] - 1)))


@register
@dataclasses.dataclass(frozen=True)
class Euler(Sampler):
    """Euler on the probability-flow ODE in sigma (Karras et al. 2022, Algorithm 1 without its
    second-order correction): y_{i+1} = y_i + (sigma_{i+1} - sigma_i) eps_hat, which is
    x_{i+1} = a_{i+1} x0_hat + s_{i+1} eps_hat, DDIM with eta = 0."""

    name: ClassVar[str] = "euler"
    default_grid: ClassVar[str] = "cosine_half"  # DDIM's: the same sampler

    def _run(self, denoise, process, x, key, ts, keep):
        return DDIM(eta=0.0)._run(denoise, process, x, None, ts, keep)


@register
@dataclasses.dataclass(frozen=True)
class Ancestral(Sampler):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2): x_{t-1} = mu_theta(x_t, t) + sigma_t z.

    On all T steps of a DDPM process the step is `ddpm_step` with the process's variance
    (small, large or learned). On any other grid it samples the posterior q(x_next | x_t,
    x0_hat), i.e. DDIM with eta = 1 (posterior variance only)."""

    name: ClassVar[str] = "ddpm"
    default_grid: ClassVar[str] = "cosine"

    def times(self, process) -> np.ndarray:
        if process.discrete and self.num_steps == process.num_timesteps:
            return np.arange(process.t_max, -2, -1, dtype=np.int32)  # the full chain
        return super().times(process)

    def _run(self, denoise, process, x, key, ts, keep):
        if key is None:
            raise ValueError("ddpm sampling needs a PRNG key")
        # T + 1 strictly decreasing integer times from T - 1 to -1 are all T steps.
        full = process.discrete and jnp.shape(ts)[0] == process.num_timesteps + 1
        if not full:
            if process.discrete and process.variance != "small":
                raise ValueError(
                    f"method='ddpm' with num_steps={jnp.shape(ts)[0] - 1} < T={process.num_timesteps} "
                    f"(respaced) supports variance='small' only, got {process.variance!r}; use all T steps")
            return DDIM(eta=1.0)._run(denoise, process, x, key, ts, keep)
        def body(x, inp):
            t, k = inp
            pred = denoise(x, t)
            x = _ancestral_table_step(process, x, t, pred, jax.random.normal(k, x.shape, x.dtype))
            return x, (x if keep else None)

        n = process.num_timesteps
        return jax.lax.scan(body, x, (jnp.arange(n - 1, -1, -1, dtype=jnp.int32), _step_keys(key, n)))


def _ancestral_table_step(process: DDPM, x, t, pred: Prediction, noise):
    """The DDPM step from its posterior tables, with x0_hat already converted (and clipped)."""
    tb = jnp.full((x.shape[0],), t, jnp.int32)
    out = p_mean_variance(process.schedule, x, tb, _as_x0_output(pred, x, process.variance),
                          prediction="x0", variance=process.variance)
    nonzero = (tb > 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise


def _as_x0_output(pred: Prediction, x, variance):
    if variance == "learned_range":
        return jnp.concatenate([pred.x0, pred.out[..., x.shape[-1]:]], axis=-1)
    return pred.x0


@register
@dataclasses.dataclass(frozen=True)
class Heun(Sampler):
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1):

        y_e = y_i + (sigma_{i+1} - sigma_i) d_i,   d_i = (y_i - x0_hat(y_i)) / sigma_i = eps_hat_i,
        y_{i+1} = y_i + (sigma_{i+1} - sigma_i) (d_i + d_e) / 2,   d_e at (y_e, sigma_{i+1}),

    in y = x / a; an Euler step where sigma_{i+1} = 0 or sigma_i = inf."""

    name: ClassVar[str] = "heun"

    def nfe(self, process) -> int:
        return int(sum(1 + h for h in _heun_mask(process, self.times(process))))

    def _run(self, denoise, process, x, key, ts, keep):
        return _second_order_scan(denoise, process, x, ts, keep, churn=None)


@register
@dataclasses.dataclass(frozen=True)
class EDMStochastic(Sampler):
    """The EDM stochastic sampler (Karras et al. 2022, Algorithm 2): before each Heun step,
    raise the noise level to sigma_hat = sigma_i (1 + gamma_i), gamma_i = min(s_churn / N,
    sqrt(2) - 1) for s_tmin <= sigma_i <= s_tmax (else 0), adding noise of std
    s_noise sqrt(sigma_hat^2 - sigma_i^2) in y = x / a. On a DDPM process sigma_hat moves
    to the nearest discrete level. s_churn = 0 is `heun`."""

    s_churn: float = 40.0
    s_noise: float = 1.003
    s_tmin: float = 0.05
    s_tmax: float = 50.0

    name: ClassVar[str] = "edm_sde"

    def __post_init__(self):
        super().__post_init__()
        for field in ("s_churn", "s_noise", "s_tmin"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{field} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.s_tmax, (int, float)) and self.s_tmax >= self.s_tmin):
            raise ValueError(f"s_tmax must be a number >= s_tmin={self.s_tmin}, got {self.s_tmax!r}")

    def nfe(self, process) -> int:
        return Heun(self.num_steps, self.grid, self.rho).nfe(process)

    def churned_times(self, process, ts: np.ndarray) -> np.ndarray:
        """t_hat_i, the time of sigma_hat_i (numpy)."""
        sig = process.sigma_of_t(ts[:-1])
        gamma = np.where((sig >= self.s_tmin) & (sig <= self.s_tmax) & np.isfinite(sig),
                         min(self.s_churn / self.num_steps, math.sqrt(2.0) - 1.0), 0.0)
        if process.discrete:
            return np.maximum(process.t_of_sigma(sig * (1 + gamma)), ts[:-1]).astype(np.int32)  # >= t_i
        return np.where(gamma > 0, process.t_of_sigma(sig * (1 + gamma)), ts[:-1])

    def _run(self, denoise, process, x, key, ts, keep):
        if key is None:
            raise ValueError("edm_sde needs a PRNG key")
        return _second_order_scan(denoise, process, x, ts, keep,
                                  churn=(self.churned_times(process, np.asarray(ts)), float(self.s_noise), key))


def _heun_mask(process, ts) -> np.ndarray:
    """1 where a step gets Heun's correction: sigma_{i+1} > 0 and sigma_i finite."""
    ts = np.asarray(ts)
    sig = process.sigma_of_t(ts)
    return (np.isfinite(sig[:-1]) & (sig[1:] > 0)).astype(np.int32)


def _second_order_scan(denoise, process, x, ts, keep, churn):
    """Heun steps (Algorithm 1), with EDM's churn before each (Algorithm 2) when given."""
    if not _is_concrete(ts):
        raise ValueError("heun and edm_sde need a concrete (numpy) time grid")
    ts_np = np.asarray(ts)
    n = ts_np.shape[0] - 1
    t_hat = ts_np[:-1] if churn is None else churn[0]
    t, a, s, t_n, a_n, s_n = _steps(process, ts_np)
    a_hat, s_hat = process.alpha_sigma(jnp.asarray(t_hat))
    heun = jnp.asarray(_heun_mask(process, ts_np).astype(bool))
    keys = _step_keys(None if churn is None else churn[2], n)

    def body(x, inp):
        t_i, a_i, s_i, th, ah, sh, tn, an, sn, second, k = inp
        if churn is not None:  # y_hat = y_i + sqrt(sigma_hat^2 - sigma_i^2) S_noise z, x = a y
            sig_i, sig_h = s_i / a_i, sh / ah
            extra = jnp.sqrt(jnp.maximum(sig_h**2 - sig_i**2, 0.0)) * churn[1]
            churned = (ah / a_i) * x + ah * extra * jax.random.normal(k, x.shape, x.dtype)
            x = jnp.where(th != t_i, churned, x)  # unchurned steps as they are (flow's a = 0 at t = 1)
        pred = denoise(x, th)
        x_e = an * pred.x0 + sn * pred.eps  # Euler: y_e = y + (sigma_n - sigma) eps_hat

        def correct(x_e):
            d_e = denoise(x_e, tn).eps
            sig_h, sig_n = sh / ah, sn / an
            return an * (x / ah + (sig_n - sig_h) * 0.5 * (pred.eps + d_e))

        x = jax.lax.cond(second, correct, lambda x_e: x_e, x_e)
        return x, (x if keep else None)

    return jax.lax.scan(body, x, (t, a, s, jnp.asarray(t_hat), a_hat, s_hat, t_n, a_n, s_n, heun, keys))


@register
@dataclasses.dataclass(frozen=True)
class DPMSolverPP(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): multistep, second order in lambda;
    first order on its first step and into clean data (`dpmpp_update`)."""

    name: ClassVar[str] = "dpm_solver_pp"
    default_grid: ClassVar[str] = "logsnr"  # beats diffusers' DPM-Solver++ grid on the oracles
    order: ClassVar[int] = 2

    def _run(self, denoise, process, x, key, ts, keep):
        t, a, s, t_n, a_n, s_n = _steps(process, ts)
        idx = jnp.arange(jnp.shape(ts)[0] - 1)
        zeros, one = jnp.zeros_like(x), jnp.ones((), a.dtype)

        def body(carry, inp):
            x, h1, h2 = carry  # (x0, a, s) of the two previous calls
            t_i, a_i, s_i, _, an, sn, i = inp
            x0 = denoise(x, t_i).x0
            hist = ((*h1, i >= 1), (*h2, i >= 2))
            x = dpmpp_update(x, x0, a_i, s_i, an, sn, hist, order=self.order)
            return (x, (x0, a_i, s_i), h1), (x if keep else None)

        init = (x, (zeros, one, one), (zeros, one, one))
        (x, _, _), ys = jax.lax.scan(body, init, (t, a, s, t_n, a_n, s_n, idx))
        return x, ys


@register
@dataclasses.dataclass(frozen=True)
class DPMSolverPP3M(DPMSolverPP):
    """DPM-Solver++(3M): multistep with the curvature term of DPM-Solver's reference code and
    k-diffusion (`dpmpp_update`, d2_weight = 1) after a first- and a second-order warm-up
    step, first order into clean data; its outputs match k-diffusion's
    `sample_dpmpp_3m_sde(eta=0)` on EDM's Karras grid (tests/test_samplers.py)."""

    name: ClassVar[str] = "dpm_solver_pp_3m"
    order: ClassVar[int] = 3


# ----------------------------------------------------------------------------- flow maps (#23)


@register
@dataclasses.dataclass(frozen=True)
class MeanFlowSampler(Sampler):
    """k steps of a flow-map network (MeanFlow, Geng et al. 2025, Algorithm 2; `flow_maps`): from
    x ~ N(0, I) at t_0 = 1,

        x_{t_{i+1}} = x_{t_i} - (t_i - t_{i+1}) u(x_{t_i}, t_{i+1}, t_i),   i = 0 .. k - 1,

    u the network's average velocity over [t_{i+1}, t_i] (`denoise(x, t, r).out`: a network of
    prediction "velocity"), so NFE = k;
    k = 1 is x0 = x_1 - u(x_1, 0, 1). Flow process only (x_t = (1 - t) x0 + t eps); no clip_x0
    inside (the final sample is clipped as any other). Guidance: trained into u (objective's
    omega), or config.sample.guidance_scale at sampling (a batch of 2B per call). On a velocity
    network without the interval input u = v: Euler."""

    name: ClassVar[str] = "meanflow"
    default_grid: ClassVar[str] = "trailing"  # t_i = 1 - i / k: the steps are equal

    def times(self, process) -> np.ndarray:
        if process.name != "flow":
            raise ValueError(f"method {self.name!r} needs the flow process (x_t = (1 - t) x0 + t eps), "
                             f"not {process.name!r}")
        return super().times(process)

    def _run(self, denoise, process, x, key, ts, keep):
        def body(x, inp):
            t, r = inp
            x = x - (t - r) * denoise(x, t, r).out
            return x, (x if keep else None)

        ts = jnp.asarray(ts)
        return jax.lax.scan(body, x, (ts[:-1], ts[1:]))


@register
@dataclasses.dataclass(frozen=True)
class ShortcutSampler(MeanFlowSampler):
    """Shortcut models' sampler (Frans et al. 2024, Algorithm 2): k steps of size d = 1 / k,
    x_{t - d} = x_t - d s(x_t, t, d), the network told its step size d (= t - r): the step of
    `meanflow` on its uniform grid. Trained step sizes are 2^-j (objective "shortcut"), so
    k = 1, 2, 4, ... up to 2^num_levels; other k use step sizes between them."""

    name: ClassVar[str] = "shortcut"


NAMES = tuple(SAMPLERS)


def make(name: str, **settings) -> Sampler:
    """A sampler by name with its settings: make("edm_sde", num_steps=18, s_churn=40)."""
    _check("method", name, SAMPLERS)
    return SAMPLERS[name](**settings)


def from_config(sample_config: Any) -> Sampler:
    """The sampler of `config.sample`: its method, with each of the class's fields read from
    the same-named entry of config.sample (absent entries keep the class default)."""
    cls = SAMPLERS.get(sample_config["method"])
    if cls is None:
        raise ValueError(f"method must be one of {NAMES}, got {sample_config['method']!r}")
    fields = {f.name: sample_config[f.name] for f in dataclasses.fields(cls) if f.name in sample_config}
    return cls(**fields)


def default_settings() -> dict:
    """Every sampler field with its default, for config.sample (a field shared by two
    samplers has one default)."""
    out: dict = {}
    for cls in SAMPLERS.values():
        for f in dataclasses.fields(cls):
            if out.setdefault(f.name, f.default) != f.default:
                raise AssertionError(f"sampler field {f.name!r} has two defaults")
    return out


def draw(sampler: Sampler, denoise, process, shape, key, *, return_trajectory=False):
    """x_T ~ N(0, prior_std^2 I) at the grid's first time, then `sampler`: the usual call."""
    k_init, k_steps = jax.random.split(key)
    x_T = process.prior_std * jax.random.normal(k_init, tuple(shape), jnp.float32)
    return sampler(denoise, process, x_T, k_steps, return_trajectory=return_trajectory)


# ----------------------------------------------------------------------------- DDPM API
# One step at given integer times, over the updates above; `sample` is `draw` on DDPM.


def _alpha_sigma_ext(schedule: Schedule, t, ndim: int):
    return _alpha_sigma_at(DDPM(schedule), t, ndim)


def _predict(schedule, x_t, t, model_output, prediction, clip_x0) -> Prediction:
    _check("prediction", prediction, PREDICTIONS)
    process = DDPM(schedule)
    x0 = diffusion._clip(processes.to_x0(process, x_t, t, model_output, prediction), clip_x0)
    if clip_x0 not in (None, False):
        a, s = _alpha_sigma_ext(schedule, t, x_t.ndim)
        eps = (x_t - a * x0) / s
    else:
        eps = processes.to_eps(process, x_t, t, model_output, prediction)
    return Prediction(x0, eps, model_output)


def ddpm_step(schedule: Schedule, x_t, t, model_output, noise, *, prediction: str = "eps",
              variance: str = "small", clip_x0=None) -> jax.Array:
    """x_{t-1} = mu_theta(x_t, t) + sigma_t z (Ho et al. 2020, Algorithm 2); no noise at t = 0.

    The seed's noise term is garbled; sigma_t^2 here is the posterior variance ("small"),
    beta_t ("large") or the learned interpolation ("learned_range"), see
    `diffusion.p_mean_variance`."""
    out = p_mean_variance(schedule, x_t, t, model_output, prediction=prediction, variance=variance,
                          clip_x0=clip_x0)
    t = jnp.asarray(t, jnp.int32)
    nonzero = _bcast((t > 0).astype(x_t.dtype), x_t.ndim)
    return out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise


def ddim_step(schedule: Schedule, x_t, t, t_prev, model_output, *, eta: float = 0.0, noise=None,
              prediction: str = "eps", clip_x0=None) -> jax.Array:
    """DDIM step from t to t_prev (t_prev = -1: abar = 1) on a DDPM schedule (`ddim_update`)."""
    pred = _predict(schedule, x_t, t, model_output, prediction, clip_x0)
    a_t, s_t = _alpha_sigma_ext(schedule, t, x_t.ndim)
    a_p, s_p = _alpha_sigma_ext(schedule, t_prev, x_t.ndim)
    return ddim_update(x_t, pred, a_t, s_t, a_p, s_p, eta=eta, noise=noise)


def dpm_solver_pp_step(schedule: Schedule, x_t, t, t_prev, model_output, *, prev_x0=None, prev_t=None,
                       prediction: str = "eps", clip_x0=None):
    """DPM-Solver++(2M) step from t to t_prev (t_prev = -1: clean) on a DDPM schedule.

    prev_x0 is the data prediction made at the previous (larger) timestep prev_t; without it
    the step is first order (equal to DDIM). Returns (x_{t_prev}, x0_hat at t)."""
    x0 = _predict(schedule, x_t, t, model_output, prediction, clip_x0).x0
    nd = x_t.ndim
    a_t, s_t = _alpha_sigma_ext(schedule, t, nd)
    a_n, s_n = _alpha_sigma_ext(schedule, t_prev, nd)
    if prev_x0 is None:
        return dpmpp_update(x_t, x0, a_t, s_t, a_n, s_n, order=1), x0
    if prev_t is None:
        raise ValueError("dpm_solver_pp_step: prev_x0 needs prev_t, the timestep it was predicted at")
    a_p, s_p = _alpha_sigma_ext(schedule, prev_t, nd)
    return dpmpp_update(x_t, x0, a_t, s_t, a_n, s_n, ((prev_x0, a_p, s_p, True),), order=2), x0


# Old name of the argument `sample` calls `grid`; "linspace" was `grid`'s "linear".
_SPACING_ALIASES = {"linspace": "linear"}


def sample(denoise_fn: Callable, schedule: Schedule, shape, key, *, method: str = "ddpm",
           num_steps: int | None = None, prediction: str = "eps", variance: str = "small",
           eta: float = 0.0, clip_x0=None, grid: str = "", timestep_spacing: str | None = None,
           return_trajectory: bool = False):
    """The registered sampler `method` on the DDPM process of `schedule`, for a
    `denoise_fn(x_t, t) -> model output` (t int32 [B]) of type `prediction`: exactly

        process = DDPM(schedule, variance)
        draw(make(method, num_steps=n, grid=grid[, eta=eta]), denoiser(denoise_fn, process,
             prediction, clip_x0), process, shape, key)

    so its default grids are the samplers' (`time_grid`; "cosine_half" for ddim and euler,
    "logsnr" for DPM-Solver++, "cosine" for respaced ddpm) and a grid given by name gives
    the same bits as `draw`. num_steps=None: all T steps (ddpm: the full ancestral chain).
    timestep_spacing is the old name of `grid` ("linspace" = "linear"; "logsnr" is now
    `time_grid`'s, no longer floored at sigma = 80). Returns x0, or (x0, trajectory
    [num_steps + 1, *shape] from x_T). A schedule traced by jit needs a grid that uses its
    length only: "leading", "trailing", "linear" or ddpm's full chain."""
    _check("method", method, SAMPLERS)
    _check("prediction", prediction, PREDICTIONS)
    _check("variance", variance, VARIANCES)
    if timestep_spacing is not None:
        if grid:
            raise ValueError(f"sample: give grid={grid!r} or its old name timestep_spacing="
                             f"{timestep_spacing!r}, not both")
        grid = _SPACING_ALIASES.get(timestep_spacing, timestep_spacing)
        _check("timestep_spacing", grid, GRIDS)
    n = schedule.num_timesteps if num_steps is None else num_steps
    settings = {"eta": eta} if "eta" in {f.name for f in dataclasses.fields(SAMPLERS[method])} else {}
    sampler = make(method, num_steps=n, grid=grid, **settings)
    process = DDPM(schedule, variance=variance)
    try:
        sampler.times(process)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        raise ValueError(f"sample: grid {grid or sampler.default_grid!r} needs a concrete schedule, "
                         "got a traced one; close over the schedule or use grid='trailing'") from None
    denoise = denoiser(lambda x, t: denoise_fn(x, t), process, prediction, clip_x0)
    return draw(sampler, denoise, process, shape, key, return_trajectory=return_trajectory)
