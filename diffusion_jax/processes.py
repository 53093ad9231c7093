"""Forward processes: every formulation as a marginal x_t = a(t) x0 + s(t) eps.

A process says how x_t is made from data (`alpha_sigma`), how training draws t
(`sample_t`), what the network sees (`network_inputs`: EDM's c_in and c_noise),
where sampling starts and ends (`t_max`, `t_clean`, `prior_std`), and how a time
relates to the noise level sigma = s / a of the scaled variable y = x / a
(Karras et al. 2022, eq. 3-4): `sigma_of_t`, `t_of_sigma`. Everything the samplers
and objectives need follows from these (module functions below).

    name   time t                       a(t)                    s(t)
    ddpm   integer in [0, T), -1 clean  sqrt(abar_t) (tables)   sqrt(1 - abar_t)   Ho et al. 2020
    vp     [0, 1], 0 clean              a^2 + s^2 = 1: linear beta(t) or cosine    Song et al. 2021
    edm    sigma in [0, inf)            1                       sigma              Karras et al. 2022
    flow   [0, 1], 0 clean              1 - t                   t                  Liu et al. 2022; Lipman et al. 2023

Network outputs ("predictions"), converted to the data prediction x0_hat by `to_x0`
and to the noise prediction eps_hat by `to_eps`:

    eps       eps (Ho et al. 2020)
    x0        x0
    v         a eps - s x0 (Salimans & Ho 2022)
    score     grad log q(x_t | x0) = -eps / s (Song et al. 2021)
    velocity  dx_t/dt = a'(t) x0 + s'(t) eps (flow matching: eps - x0)
    edm       F of EDM's preconditioning D = c_skip y + c_out F (Karras et al. 2022, Table 1)

Processes are frozen dataclasses registered as pytrees (the DDPM tables are
leaves, every other field static), so they pass through `jax.jit` or close over.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import schedules
from diffusion_jax.schedules import Schedule

__all__ = [
    "DDPM", "VP", "EDM", "Flow", "PROCESSES", "NAMES", "PREDICTIONS", "make",
    "q_sample", "to_x0", "to_eps", "target", "output_scale", "velocity_coefficients",
]

PREDICTIONS = ("eps", "x0", "v", "score", "velocity", "edm")


def _static(cls):
    """A frozen dataclass whose fields are all static pytree metadata."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    return jax.tree_util.register_dataclass(
        cls, data_fields=[], meta_fields=[f.name for f in dataclasses.fields(cls)])


def _broadcast(v: jax.Array, ndim: int) -> jax.Array:
    """v [B] (or a scalar) shaped to broadcast against an array of rank ndim, batch first."""
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _finite_positive(name: str, value: float, *, allow_inf: bool = False) -> float:
    value = float(value)
    if not (value > 0 and (math.isfinite(value) or (allow_inf and value == math.inf))):
        raise ValueError(f"{name} must be a finite number > 0{' (or inf)' if allow_inf else ''}, got {value}")
    return value


# ----------------------------------------------------------------------------- processes


@functools.partial(jax.tree_util.register_dataclass, data_fields=["schedule"],
                   meta_fields=["variance", "sigma_min", "sigma_max"])
@dataclasses.dataclass(frozen=True)
class DDPM:
    """Discrete variance-preserving diffusion on a `Schedule` (Ho et al. 2020).

    t is an integer in [0, T) (step t + 1 of the 1-based papers, see `schedules`), t = -1 is
    clean data. variance: the ancestral step's sigma_t^2 ("small" posterior, "large" beta_t
    or "learned_range"; `diffusion.p_mean_variance`). sigma_min and sigma_max bound the noise
    levels that sigma-spaced sampling grids visit after their first point t = T - 1 (DDIM's
    "cosine_half" starts lower; samplers.py). 80: EDM's sigma_max for data in [-1, 1], above
    which the data prediction hardly changes; 0.02: below it the last jump to clean data
    changes data of scale c by a factor c / sqrt(c^2 + 0.02^2), under 1% for c >= 0.15,
    chosen on the oracles of bench/bench_samplers.py.
    The network sees (x_t, t) unchanged.
    """

    schedule: Schedule
    variance: str = "small"
    sigma_min: float = 0.02
    sigma_max: float = 80.0

    name = "ddpm"
    variance_preserving = True
    predictions = ("eps", "x0", "v", "score")  # the first is its own (config.diffusion.prediction "")
    loss_weighting = "none"  # its own objective (config.diffusion.loss_weighting "")
    discrete = True

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    @property
    def t_max(self) -> int:
        return self.num_timesteps - 1

    t_clean = -1
    prior_std = 1.0

    def alpha_sigma(self, t):
        """(sqrt(abar_t), sqrt(1 - abar_t)) from the float64-built tables; (1, 0) at t = -1."""
        t = jnp.asarray(t, jnp.int32)
        idx = jnp.maximum(t, 0)
        clean = t < 0
        return (jnp.where(clean, 1.0, self.schedule.sqrt_alphas_cumprod[idx]),
                jnp.where(clean, 0.0, self.schedule.sqrt_one_minus_alphas_cumprod[idx]))

    def sample_t(self, key, shape=()):
        """t ~ U{0, ..., T-1} (Ho et al. 2020, Algorithm 1)."""
        return jax.random.randint(key, shape, 0, self.num_timesteps, dtype=jnp.int32)

    def network_inputs(self, x_t, t):
        return x_t, t

    def sigma_of_t(self, t) -> np.ndarray:
        """sigma_t = sqrt((1 - abar_t) / abar_t), float64 numpy (0 at t = -1)."""
        ab = np.asarray(self.schedule.alphas_cumprod, np.float64)
        t = np.asarray(t)
        return np.where(t < 0, 0.0, np.sqrt(-np.expm1(np.log(ab[np.maximum(t, 0)])) / ab[np.maximum(t, 0)]))

    def sigma_range(self) -> tuple[float, float]:
        """[sigma_min, sigma_max] clipped to the table's own range [sigma_0, sigma_{T-1}]."""
        lo, hi = float(self.sigma_of_t(0)), float(self.sigma_of_t(self.t_max))
        return max(lo, min(self.sigma_min, hi)), min(hi, self.sigma_max)

    def t_of_sigma(self, sigma) -> np.ndarray:
        """The integer t whose sigma_t is nearest in log (numpy; for EDM's churn)."""
        log_table = np.log(self.sigma_of_t(np.arange(self.num_timesteps)))
        log_sigma = np.log(np.asarray(sigma, np.float64))
        return np.argmin(np.abs(log_table - log_sigma[..., None]), axis=-1).astype(np.int32)

    def times_for_sigmas(self, sigmas: np.ndarray) -> np.ndarray:
        """Strictly decreasing integer times nearest (in log sigma) to decreasing `sigmas`;
        entry 0 is always T - 1, the start of every DDPM sampler."""
        lam = 0.5 * (np.log(np.asarray(self.schedule.alphas_cumprod, np.float64))
                     - np.log1p(-np.asarray(self.schedule.alphas_cumprod, np.float64)))
        return nearest_decreasing_steps(lam, -np.log(np.asarray(sigmas, np.float64)), np)


def nearest_decreasing_steps(lam, targets, xp):
    """Integer steps t_0 = T - 1 > t_1 > ... > t_{n-1} >= 0 whose half log-SNR lam[t] is
    nearest each target (increasing targets), moved the least to make them strictly
    decreasing. lam: [T] table, increasing as t decreases; xp: numpy, or jax.numpy for a
    traced table."""
    T, n = lam.shape[0], targets.shape[0]
    ts = xp.argmin(xp.abs(lam[None, :] - targets[:, None]), axis=1)
    i = xp.arange(n)
    ts = xp.where(i == 0, T - 1, ts)
    # ts[i] >= ts[i+1] + 1, enforced from the end: ts[i] = max_{j >= i}(ts[j] + j) - i ...
    ts = xp.flip(_cumulative(xp, "max", xp.flip(ts + i))) - i
    # ... and ts[i] <= ts[i-1] - 1 from the start, with ts[0] <= T - 1.
    ts = _cumulative(xp, "min", xp.minimum(ts, T - 1) + i) - i
    return ts.astype(xp.int32)


def _cumulative(xp, op, a):
    if xp is np:
        return (np.maximum if op == "max" else np.minimum).accumulate(a)
    return (jax.lax.cummax if op == "max" else jax.lax.cummin)(a, axis=0)


@_static
class VP:
    """Continuous-time variance-preserving diffusion (Song et al. 2021, VP SDE), t in [0, 1].

    schedule "linear": beta(t) = beta_min + t (beta_max - beta_min), so
        log a(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2   (Song et al. 2021, eq. 33);
    schedule "cosine": a(t) = cos(pi t / 2), s(t) = sin(pi t / 2), i.e. log-SNR
        -2 log tan(pi t / 2) (Nichol & Dhariwal 2021 with offset 0).
    Training draws t ~ U(t_eps, 1). Sampling runs from sigma_max (t_max = t_of_sigma(sigma_max))
    down to sigma_min and then to clean data t = 0. The network sees (x_t, 999 t), the
    DDPM time range (EDM's VPPrecond, c_noise = (M - 1) t with M = 1000).
    """

    schedule: str = "linear"
    beta_min: float = 0.1
    beta_max: float = 20.0
    t_eps: float = 1e-5
    sigma_min: float = 0.02
    sigma_max: float = 80.0

    name = "vp"
    variance_preserving = True
    predictions = ("eps", "x0", "v", "score", "velocity")  # the first is its own (config.diffusion.prediction "")
    loss_weighting = "none"  # its own objective (config.diffusion.loss_weighting "")
    discrete = False
    t_clean = 0.0
    prior_std = 1.0

    def __post_init__(self):
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule must be 'linear' or 'cosine', got {self.schedule!r}")
        if not 0 <= self.beta_min < self.beta_max < math.inf:
            raise ValueError(f"beta_min and beta_max need 0 <= beta_min < beta_max < inf, got "
                             f"{self.beta_min}, {self.beta_max}")
        if not 0 < self.t_eps < 1:
            raise ValueError(f"t_eps must lie in (0, 1), got {self.t_eps}")
        _check_sigma_range(self.sigma_min, self.sigma_max)

    def alpha_sigma(self, t):
        t = jnp.asarray(t, jnp.float32)
        if self.schedule == "cosine":
            half_pi_t = 0.5 * math.pi * t
            return jnp.maximum(jnp.cos(half_pi_t), 0.0), jnp.sin(half_pi_t)
        log_a = -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        return jnp.exp(log_a), jnp.sqrt(-jnp.expm1(2.0 * log_a))

    def sample_t(self, key, shape=()):
        return jax.random.uniform(key, shape, jnp.float32, self.t_eps, 1.0)

    def network_inputs(self, x_t, t):
        return x_t, 999.0 * t

    def sigma_of_t(self, t):
        t = np.asarray(t, np.float64)
        if self.schedule == "cosine":
            return np.tan(0.5 * np.pi * t)
        d = self.beta_max - self.beta_min
        return np.sqrt(np.expm1(0.5 * d * t * t + self.beta_min * t))

    def t_of_sigma(self, sigma):
        """Inverse of sigma(t): 2 atan(sigma) / pi (cosine); the root of
        d t^2 / 2 + beta_min t = log(1 + sigma^2) (linear, d = beta_max - beta_min)."""
        xp = np if isinstance(sigma, (float, np.ndarray, np.floating)) else jnp
        if self.schedule == "cosine":
            return 2.0 / math.pi * xp.arctan(sigma)
        d, b = self.beta_max - self.beta_min, self.beta_min
        return (xp.sqrt(b * b + 2.0 * d * xp.log1p(sigma * sigma)) - b) / d

    @property
    def t_max(self) -> float:
        return float(min(1.0, self.t_of_sigma(np.float64(self.sigma_max))))

    def sigma_range(self):
        return self.sigma_min, float(self.sigma_of_t(self.t_max))

    def times_for_sigmas(self, sigmas):
        return self.t_of_sigma(np.asarray(sigmas, np.float64))


@_static
class EDM:
    """The EDM formulation (Karras et al. 2022): t = sigma, x_t = x0 + sigma eps.

    Training: ln sigma ~ N(p_mean, p_std^2) (Table 1: -1.2, 1.2). Preconditioning of
    Table 1 with the data's standard deviation sigma_data (0.5 for images in [-1, 1]):
        c_in = 1 / sqrt(sigma^2 + sigma_data^2),   c_noise = ln(sigma) / 4,
        c_skip = sigma_data^2 / (sigma^2 + sigma_data^2),
        c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2).
    The network sees (c_in x_t, 1000 c_noise): c_noise scaled by 1000 so that the
    sinusoidal time embedding of diffusion_jax.models (built for DDPM's t in [0, 1000))
    sees a range of that size. Sampling starts at x ~ N(0, sigma_max^2).
    """

    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0

    name = "edm"
    variance_preserving = False
    predictions = ("edm", "x0", "eps", "v")  # the first is its own (config.diffusion.prediction "")
    loss_weighting = "edm"  # its own objective (config.diffusion.loss_weighting "")
    discrete = False
    t_clean = 0.0

    def __post_init__(self):
        _finite_positive("sigma_data", self.sigma_data)
        _finite_positive("p_std", self.p_std)
        if not math.isfinite(self.p_mean):
            raise ValueError(f"p_mean must be a finite number, got {self.p_mean}")
        _check_sigma_range(self.sigma_min, self.sigma_max)

    def alpha_sigma(self, t):
        t = jnp.asarray(t, jnp.float32)
        return jnp.ones_like(t), t

    def sample_t(self, key, shape=()):
        return jnp.exp(self.p_mean + self.p_std * jax.random.normal(key, shape, jnp.float32))

    def network_inputs(self, x_t, t):
        c_in = jax.lax.rsqrt(t * t + self.sigma_data**2)
        return _broadcast(c_in, x_t.ndim) * x_t, 250.0 * jnp.log(t)

    def sigma_of_t(self, t):
        return np.asarray(t, np.float64)

    def t_of_sigma(self, sigma):
        return sigma

    @property
    def t_max(self) -> float:
        return self.sigma_max

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def sigma_range(self):
        return self.sigma_min, self.sigma_max

    def times_for_sigmas(self, sigmas):
        return np.asarray(sigmas, np.float64)


@_static
class Flow:
    """Rectified flow / conditional flow matching (Liu et al. 2022; Lipman et al. 2023):
    x_t = (1 - t) x0 + t eps, t in [0, 1], whose velocity target is eps - x0.

    Training draws t ~ U(0, 1) ("uniform") or t = sigmoid(n), n ~ N(logit_mean, logit_std^2)
    ("logit_normal", Esser et al. 2024, sec. 3.1). Sampling starts from pure noise at t = 1;
    sigma-spaced grids visit sigma = t / (1 - t) in [sigma_min, sigma_max] after that first
    point. The network sees (x_t, time_scale t), time_scale = 1000 by default (SD3 and SiT feed
    t scaled to the DDPM range), and a network of the average velocity over [r, t] also
    h = time_scale (t - r) (`interval_input`). The flow maps take derivatives in t (MeanFlow's
    JVP): there the sinusoidal embedding's top frequency, time_scale radians per unit of t,
    sets how large du/dt can be, and experiments/mnist_meanflow.py feeds t unscaled (1.0).
    """

    t_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    sigma_min: float = 0.02
    sigma_max: float = 80.0
    time_scale: float = 1000.0

    name = "flow"
    variance_preserving = False
    predictions = ("velocity", "x0", "v")  # the first is its own (config.diffusion.prediction "")
    loss_weighting = "none"  # its own objective (config.diffusion.loss_weighting "")
    discrete = False
    t_clean = 0.0
    t_max = 1.0
    prior_std = 1.0

    def __post_init__(self):
        if self.t_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"t_sampling must be 'uniform' or 'logit_normal', got {self.t_sampling!r}")
        if not math.isfinite(self.logit_mean):
            raise ValueError(f"logit_mean must be a finite number, got {self.logit_mean}")
        _finite_positive("logit_std", self.logit_std)
        _check_sigma_range(self.sigma_min, self.sigma_max)
        _finite_positive("time_scale", self.time_scale)

    def alpha_sigma(self, t):
        t = jnp.asarray(t, jnp.float32)
        return 1.0 - t, t

    def sample_t(self, key, shape=()):
        if self.t_sampling == "uniform":
            return jax.random.uniform(key, shape, jnp.float32)
        return jax.nn.sigmoid(self.logit_mean + self.logit_std * jax.random.normal(key, shape, jnp.float32))

    def network_inputs(self, x_t, t):
        return x_t, self.time_scale * t

    def interval_input(self, t, r):
        """The second time input h of a network over an interval [r, t] (model.interval_input;
        `flow_maps`): time_scale (t - r), on the scale of c_noise = time_scale t."""
        return self.time_scale * (t - r)

    def sigma_of_t(self, t):
        t = np.asarray(t, np.float64)
        with np.errstate(divide="ignore"):
            return t / (1.0 - t)

    def t_of_sigma(self, sigma):
        """t = sigma / (1 + sigma), written so that sigma = inf gives t = 1."""
        sigma = np.asarray(sigma, np.float64)
        with np.errstate(divide="ignore"):
            return 1.0 / (1.0 + 1.0 / sigma)

    def sigma_range(self):
        return self.sigma_min, self.sigma_max

    def times_for_sigmas(self, sigmas):
        return self.t_of_sigma(np.asarray(sigmas, np.float64))


def _check_sigma_range(lo: float, hi: float) -> None:
    _finite_positive("sigma_min", lo)
    _finite_positive("sigma_max", hi)
    if not lo < hi:
        raise ValueError(f"sigma_min must be < sigma_max, got {lo} and {hi}")


PROCESSES: dict[str, type] = {"ddpm": DDPM, "vp": VP, "edm": EDM, "flow": Flow}
NAMES = tuple(PROCESSES)


def make(diffusion_config: Any):
    """The process of `config.diffusion`: `process` names it; ddpm reads schedule,
    num_timesteps, schedule_kwargs and variance, the others their own sub-config
    (config.diffusion.vp / .edm / .flow, fields as the dataclasses above)."""
    d = diffusion_config
    name = d.get("process", "ddpm")
    if name not in PROCESSES:
        raise ValueError(f"process must be one of {NAMES}, got {name!r}")
    if name == "ddpm":
        kwargs = d.get("schedule_kwargs", {})
        kwargs = kwargs.to_dict() if hasattr(kwargs, "to_dict") else dict(kwargs)
        schedule = schedules.make(d["schedule"], num_timesteps=d["num_timesteps"], **kwargs)
        return DDPM(schedule, variance=d.get("variance", "small"))
    fields = d.get(name, {})
    fields = fields.to_dict() if hasattr(fields, "to_dict") else dict(fields)
    return PROCESSES[name](**fields)


def default_fields(name: str) -> dict:
    """The sub-config of a continuous process (its dataclass defaults), for experiments/default.py."""
    return {f.name: f.default for f in dataclasses.fields(PROCESSES[name])}


# ----------------------------------------------------------------------------- conversions


class Coefficients(NamedTuple):
    """a(t), s(t) and their time derivatives, shaped to broadcast against x_t."""

    a: jax.Array
    s: jax.Array
    da: Any = None
    ds: Any = None


def velocity_coefficients(process, t):
    """(a, s, a'(t), s'(t)) by forward-mode differentiation of `alpha_sigma`."""
    if process.discrete:
        raise ValueError(f"prediction 'velocity' needs a continuous-time process, not {process.name!r}")
    t = jnp.asarray(t, jnp.float32)
    (a, s), (da, ds) = jax.jvp(process.alpha_sigma, (t,), (jnp.ones_like(t),))
    return a, s, da, ds


def _coefficients(process, t, ndim: int, prediction: str) -> Coefficients:
    """Coefficients at times where the network is evaluated (never clean data)."""
    if prediction == "velocity":
        return Coefficients(*(_broadcast(c, ndim) for c in velocity_coefficients(process, t)))
    a, s = process.alpha_sigma(t)
    return Coefficients(_broadcast(a, ndim), _broadcast(s, ndim))


def _edm_c_skip(process, c: Coefficients):
    """EDM's c_skip(sigma) = sigma_data^2 / (sigma^2 + sigma_data^2) applied to y = x_t / a."""
    sd2, sigma = _sigma_data(process) ** 2, c.s / c.a
    return sd2 / (sigma * sigma + sd2) / c.a


def _edm_c_out(process, c: Coefficients):
    """EDM's c_out(sigma) = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)."""
    sd, sigma = _sigma_data(process), c.s / c.a
    return sigma * sd * jax.lax.rsqrt(sigma * sigma + sd * sd)


def _sigma_data(process) -> float:
    """EDM's sigma_data; 0.5 (images in [-1, 1]) for processes without that field."""
    return float(getattr(process, "sigma_data", 0.5))


def _v_norm(process, c: Coefficients):
    """a^2 + s^2, which is 1 for a variance-preserving process (and then not computed)."""
    return 1.0 if process.variance_preserving else c.a * c.a + c.s * c.s


# Each maps (process, x_t, model output m, coefficients c) to the implied x0 resp. eps; derived
# from x_t = a x0 + s eps, v = a eps - s x0, score = -eps / s, u = a' x0 + s' eps.
_TO_X0: dict[str, Callable] = {
    "eps": lambda p, x, m, c: (x - c.s * m) / c.a,
    "x0": lambda p, x, m, c: m,
    "v": lambda p, x, m, c: (c.a * x - c.s * m) / _v_norm(p, c),
    "score": lambda p, x, m, c: (x + c.s * c.s * m) / c.a,
    "velocity": lambda p, x, m, c: (c.ds * x - c.s * m) / (c.a * c.ds - c.s * c.da),
    "edm": lambda p, x, m, c: _edm_c_skip(p, c) * x + _edm_c_out(p, c) * m,
}
_TO_EPS: dict[str, Callable] = {
    "eps": lambda p, x, m, c: m,
    "x0": lambda p, x, m, c: (x - c.a * m) / c.s,
    "v": lambda p, x, m, c: (c.s * x + c.a * m) / _v_norm(p, c),
    "score": lambda p, x, m, c: -c.s * m,
}
_TARGET: dict[str, Callable] = {
    "eps": lambda p, x0, n, c: n,
    "x0": lambda p, x0, n, c: x0,
    "v": lambda p, x0, n, c: c.a * n - c.s * x0,
    "score": lambda p, x0, n, c: -n / c.s,
    "velocity": lambda p, x0, n, c: c.da * x0 + c.ds * n,
    "edm": lambda p, x0, n, c: (x0 - _edm_c_skip(p, c) * (c.a * x0 + c.s * n)) / _edm_c_out(p, c),
}


def own_objective(process, prediction: str = "", loss_weighting: str = "") -> tuple[str, str]:
    """(prediction, loss_weighting) with "" read as the process's own, the defaults of
    config.diffusion: its first prediction (eps for ddpm and vp, edm for edm, velocity for
    flow) and its `loss_weighting` (none, the MSE of that output; edm for edm)."""
    return prediction or process.predictions[0], loss_weighting or process.loss_weighting


def check_prediction(process, prediction: str) -> None:
    if prediction not in process.predictions:
        raise ValueError(f"prediction must be one of {process.predictions} for process "
                         f"{process.name!r}, got {prediction!r}")


def q_sample(process, x0, t, noise):
    """x_t = a(t) x0 + s(t) noise."""
    a, s = process.alpha_sigma(t)
    return _broadcast(a, x0.ndim) * x0 + _broadcast(s, x0.ndim) * noise


def to_x0(process, x_t, t, model_output, prediction: str):
    """The data prediction x0_hat implied by a network output of type `prediction`."""
    check_prediction(process, prediction)
    return _TO_X0[prediction](process, x_t, model_output, _coefficients(process, t, x_t.ndim, prediction))


def to_eps(process, x_t, t, model_output, prediction: str):
    """The noise prediction eps_hat implied by a network output (through x0_hat where needed)."""
    check_prediction(process, prediction)
    c = _coefficients(process, t, x_t.ndim, prediction)
    if prediction in _TO_EPS:
        return _TO_EPS[prediction](process, x_t, model_output, c)
    return (x_t - c.a * _TO_X0[prediction](process, x_t, model_output, c)) / c.s


def target(process, x0, noise, t, prediction: str):
    """The regression target of `prediction` for x_t = q_sample(process, x0, t, noise)."""
    check_prediction(process, prediction)
    return _TARGET[prediction](process, x0, noise, _coefficients(process, t, x0.ndim, prediction))


def output_scale(process, t, prediction: str, ndim: int = 1):
    """k with x0_hat - x0 = k (output - target): how an error in the network's output
    space maps to data space (the loss weightings of `objectives` are built on it); any
    name in PREDICTIONS, also one the process's network does not output."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    c = _coefficients(process, t, ndim, prediction)
    return {
        "eps": lambda: c.s / c.a,
        "x0": lambda: jnp.ones_like(c.a),
        "v": lambda: c.s / _v_norm(process, c) * jnp.ones_like(c.a),
        "score": lambda: c.s * c.s / c.a,
        "velocity": lambda: c.s / (c.a * c.ds - c.s * c.da),
        "edm": lambda: _edm_c_out(process, c),
    }[prediction]()
