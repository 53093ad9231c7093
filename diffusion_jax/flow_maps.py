"""Flow maps: MeanFlow (Geng et al. 2025) and shortcut models (Frans et al. 2024) on the flow process.

On the flow process x_t = (1 - t) x0 + t eps (t = 1 noise, t = 0 data; `processes.Flow`) the
probability-flow ODE dx_t/dt = v(x_t, t), v(x, t) = E[eps - x0 | x_t = x], carries x_t to x_r, r < t:

    x_r = x_t - (t - r) u(x_t, r, t),    u(x_t, r, t) = 1 / (t - r) int_r^t v(x_s, s) ds,

u the average velocity over [r, t] (MeanFlow, eq. 3), u(x, t, t) = v(x, t). A network of u takes
the interval h = t - r beside t (model.interval_input; `processes.Flow.interval_input`); k steps
x <- x - (t_i - t_{i+1}) u(x, t_{i+1}, t_i) then sample in k network calls (samplers "meanflow" and
"shortcut"), and every other sampler runs on it at h = 0, where it is the velocity.

Two objectives learn u from the network itself, without solving the ODE:

    meanflow  Differentiating (t - r) u = int_r^t v ds in t along the trajectory gives the MeanFlow
              identity (Geng et al. 2025, eq. 6-8)
                  u(x_t, r, t) = v(x_t, t) - (t - r) du/dt,    du/dt = v . grad_x u + d_t u,
              du/dt the JVP of u in (x, r, t) with tangent (v, 0, 1). The target replaces v by the
              conditional velocity eps - x0 and stops the gradient:
                  u_tgt = v - (t - r) sg(du/dt),   loss = ||u - u_tgt||^2 / sg(||u - u_tgt||^2 + c)^p,
              the adaptive weight of eq. 11-12, ||.||^2 summed over the data dimensions as in the
              official code. (t, r): two draws of the process's t (`Flow.t_sampling`; the paper's
              logit-normal), t the larger; r = t (flow matching) on all but a fraction `ratio`.
              tangent "predicted" (improved MeanFlow, Geng et al. 2025b, sec. 3): the JVP's
              x-tangent is the network's own velocity sg(u(x_t, t, t)), an estimate of the marginal
              v(x_t, t), instead of the conditional eps - x0, whose noise the Jacobian would carry
              into the target; the loss is then the same as a regression of
              u + (t - r) sg(du/dt) on eps - x0, the iMF "v-loss".
    shortcut  The flow map's semigroup property, one step of size d is two of d / 2 (Frans et al.
              2024, eq. 5, written for this direction of time):
                  u(x_t, t - d, t) = (u(x_t, t - d/2, t) + u(x', t - d, t - d/2)) / 2,
                  x' = x_t - (d / 2) u(x_t, t - d/2, t),
              the right side from the network (sg) on a fraction `bootstrap_fraction` of the batch,
              d in {1, 1/2, ..., 2^-num_levels} and t a multiple of d in (0, 1]; at the finest d the
              half steps use the velocity (h = 0). Flow matching (d = 0, target eps - x0) on the rest.

Classifier-free guidance is trained into the target (MeanFlow, sec. 4.2 and its official code),
so a guided model still samples in k calls: for an example with its label, v is replaced by
    v_g = omega v + kappa u(x_t, t, t | c) + (1 - omega - kappa) u(x_t, t, t | null)   (sg),
and an example whose label was dropped keeps v. omega = 1, kappa = 0: no guidance.

The objectives are registered frozen dataclasses (their fields: config.diffusion.<name>);
`training_losses(net, target_net, ...)` takes two networks as functions net(x_t, t, r, cond) -> u
(`network`): `net` carries the gradient, `target_net` (stop-gradient parameters: the current
ones, or the EMA for shortcut's teacher = "ema") makes the targets.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp

from diffusion_jax import ops, processes

__all__ = ["OBJECTIVES", "NAMES", "DEFAULT", "MeanFlow", "Shortcut", "make", "check", "network",
           "guided_velocity", "meanflow_target", "shortcut_target", "default_fields"]

DEFAULT = "denoising"  # config.diffusion.objective of the regression in `objectives`


def _bcast(v, ndim):
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _sum_flat(x):
    return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


def _number(name, value, lo, hi, *, lo_open=False, hi_open=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and (hi is None or (value < hi if hi_open else value <= hi))
    if not ok:
        lo_s, hi_s = ("(" if lo_open else "[") + f"{lo}", ("inf)" if hi is None else f"{hi}" + (")" if hi_open else "]"))
        raise ValueError(f"{name} must be a number in {lo_s}, {hi_s}, got {value!r}")


def _choice(name, value, options):
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


def network(apply_fn: Callable, process, params, **apply_kwargs) -> Callable:
    """net(x_t, t, r, cond) -> u: a model with interval_input (`apply_fn` = model.apply) as the
    average velocity over [r, t] (t, r float [B]); it sees the process's inputs (x_t, 1000 t) and
    h = 1000 (t - r)."""

    def net(x_t, t, r, cond):
        x_in, c_noise = process.network_inputs(x_t, t)
        return apply_fn({"params": params}, x_in, c_noise, cond, h=process.interval_input(t, r), **apply_kwargs)

    return net


def guided_velocity(v, x_t, t, cond, null, drop, target_net, omega: float, kappa: float):
    """v_g = omega v + kappa u(x_t, t, t | c) + (1 - omega - kappa) u(x_t, t, t | null) where the
    label was kept (drop False), v where it was dropped (MeanFlow, sec. 4.2); v itself for an
    unconditional model or omega = 1, kappa = 0. Stop-gradient: the network terms are targets."""
    if cond is None or (omega == 1.0 and kappa == 0.0):
        return v
    g = omega * v + (1.0 - omega - kappa) * target_net(x_t, t, t, null)
    if kappa:
        g = g + kappa * target_net(x_t, t, t, cond)
    return jnp.where(_bcast(drop, v.ndim), v, jax.lax.stop_gradient(g))


def meanflow_target(u_fn, x_t, t, r, v, tangent=None):
    """u_tgt = v - (t - r) du/dt, du/dt = jax.jvp of u_fn(x, t, r) at (x_t, t, r) with tangent
    (v', 1, 0), v' = `tangent` (default v): the MeanFlow identity's right side (Geng et al. 2025,
    eq. 8), exactly u(x_t, r, t) when u_fn is the flow's average velocity and v = v' its velocity."""
    tangent = v if tangent is None else tangent
    _, du_dt = jax.jvp(u_fn, (x_t, t, r), (tangent, jnp.ones_like(t), jnp.zeros_like(r)))
    return v - _bcast(t - r, x_t.ndim) * du_dt


def shortcut_target(u_fn, x_t, t, d, finest=False):
    """(u1 + u2) / 2 with u1 = u_fn(x_t, t, t - d/2), x' = x_t - (d/2) u1, u2 = u_fn(x', t - d/2, t - d):
    two half steps as one (Frans et al. 2024, eq. 5); where `finest`, both half steps take the
    velocity (u_fn with r = t). Exactly u(x_t, t - d, t) for the flow's average velocity; at
    d = 0 the velocity v(x_t, t), the flow-matching target."""
    s = d / 2
    u1 = u_fn(x_t, t, jnp.where(finest, t, t - s))
    x_mid, t_mid = x_t - _bcast(s, x_t.ndim) * u1, t - s
    u2 = u_fn(x_mid, t_mid, jnp.where(finest, t_mid, t_mid - s))
    return 0.5 * (u1 + u2)


def _example_keys(key, b):
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(b))


@dataclasses.dataclass(frozen=True)
class _FlowMapObjective:
    """Settings every flow-map objective has: the guidance trained into its target."""

    omega: float = 1.0  # guidance scale of the target, >= 1 in use (1 = none); sampling-time w = omega - 1
    kappa: float = 0.0  # weight of the conditional velocity in the guided target, [0, 1)

    name: ClassVar[str] = ""

    def __post_init__(self):
        _number("omega", self.omega, 0.0, None, lo_open=True)
        _number("kappa", self.kappa, 0.0, 1.0, hi_open=True)

    def target_params(self, params, ema_params):
        """The parameters of the target network (stop-gradient is the caller's)."""
        return params


OBJECTIVES: dict[str, type] = {}


def _register(cls):
    OBJECTIVES[cls.name] = cls
    return cls


@_register
@dataclasses.dataclass(frozen=True)
class MeanFlow(_FlowMapObjective):
    """MeanFlow (Geng et al. 2025, Algorithm 1), module docstring. Defaults: the paper's ImageNet
    ablation optimum (ratio 0.25 of r != t, p = 1) and the official code's c = 0.01."""

    ratio: float = 0.25  # fraction of the batch with r != t (the rest: r = t, flow matching), [0, 1]
    tangent: str = "conditional"  # x-tangent of the JVP: conditional (eps - x0, MeanFlow) | predicted (u(x_t, t, t), iMF)
    norm_p: float = 1.0  # power p of the adaptive weight 1 / sg(||u - u_tgt||^2 + c)^p, >= 0 (0 = plain squared error)
    norm_eps: float = 0.01  # c > 0 of the adaptive weight

    name: ClassVar[str] = "meanflow"

    def __post_init__(self):
        super().__post_init__()
        _number("ratio", self.ratio, 0.0, 1.0)
        _choice("tangent", self.tangent, ("conditional", "predicted"))
        _number("norm_p", self.norm_p, 0.0, None)
        _number("norm_eps", self.norm_eps, 0.0, None, lo_open=True)

    def times(self, process, t, key):
        """(t, r) [B]: t and a second draw of the process's t, sorted; r = t on the first
        B - round(ratio B) examples of the batch (the official code's split)."""
        b = t.shape[0]
        t2 = jax.vmap(process.sample_t)(_example_keys(key, b))
        t, r = jnp.maximum(t, t2), jnp.minimum(t, t2)
        return t, jnp.where(jnp.arange(b) < b - round(self.ratio * b), t, r)

    def training_losses(self, net, target_net, process, x0, noise, t, cond, null, drop, key) -> dict:
        """Per-example "mse" (mean over the data dimensions of (u - u_tgt)^2) and "loss" (the
        adaptive-weighted sum), float32 [B]; t [B] is one draw of process.sample_t, noise eps."""
        b = x0.shape[0]
        n = b - round(self.ratio * b)  # examples [n:] have r < t
        t, r = self.times(process, t, key)
        x_t = processes.q_sample(process, x0, t, noise)
        v = guided_velocity(noise - x0, x_t, t, cond, null, drop, target_net, self.omega, self.kappa)
        u = net(x_t, t, r, cond)
        u_tgt = v  # where r = t
        if n < b:  # the JVP only where t - r is not 0
            c = None if cond is None else cond[n:]
            v_n = v[n:]
            if self.tangent == "predicted":  # the network's own velocity: its marginal estimate (iMF)
                v_n = jax.lax.stop_gradient(target_net(x_t[n:], t[n:], t[n:], c))
            # the fast and native kernels (diffusion_jax.ops) define VJPs only: trace the JVP with the reference ones
            with ops.forced("reference"):
                u_tgt = u_tgt.at[n:].set(meanflow_target(lambda x, tt, rr: target_net(x, tt, rr, c),
                                                         x_t[n:], t[n:], r[n:], v[n:], v_n))
        u_tgt = jax.lax.stop_gradient(u_tgt)
        sq = _sum_flat((u - u_tgt) ** 2)
        weight = jax.lax.stop_gradient(1.0 / (sq + self.norm_eps) ** self.norm_p)
        return {"mse": sq / (x0.size // b), "loss": weight * sq}


@_register
@dataclasses.dataclass(frozen=True)
class Shortcut(_FlowMapObjective):
    """Shortcut models (Frans et al. 2024, Algorithm 1), module docstring. The bootstrap d is
    uniform over the num_levels + 1 sizes (the official code splits them evenly), t uniform on
    the multiples of d.

    teacher "current": the targets come from the network being trained (stop-gradient), as
    MeanFlow's do; "ema": from the EMA parameters (the official code's default, with decay
    0.999 over ~10^5 steps). Over this project's short runs (a few thousand steps, EMA decay
    0.995-0.999 with warm-up) an EMA teacher lags hundreds of steps behind, which slows every
    level of the bootstrap ladder (each learns from the one below), hence "current"."""

    bootstrap_fraction: float = 0.25  # fraction of the batch with self-consistency targets, [0, 1] (paper: 1/4)
    num_levels: int = 7  # finest step size 2^-num_levels (7: the paper's 1/128), integer in [0, 16]
    teacher: str = "current"  # network of the bootstrap targets: current | ema

    name: ClassVar[str] = "shortcut"

    def __post_init__(self):
        super().__post_init__()
        _number("bootstrap_fraction", self.bootstrap_fraction, 0.0, 1.0)
        if isinstance(self.num_levels, bool) or not isinstance(self.num_levels, int) or not 0 <= self.num_levels <= 16:
            raise ValueError(f"num_levels must be an integer in [0, 16], got {self.num_levels!r}")
        _choice("teacher", self.teacher, ("current", "ema"))

    def target_params(self, params, ema_params):
        return ema_params if self.teacher == "ema" else params

    def steps(self, b, key):
        """(t, d, finest) [nb] of the bootstrap examples: level j uniform in {0, ..., num_levels},
        d = 2^-j, t = m d with m uniform in {1, ..., 2^j}; finest marks j = num_levels."""
        def draw(k):
            k_j, k_m = jax.random.split(k)
            j = jax.random.randint(k_j, (), 0, self.num_levels + 1)
            count = 2.0 ** j.astype(jnp.float32)
            m = jnp.minimum(jnp.floor(jax.random.uniform(k_m) * count), count - 1.0) + 1.0
            return m / count, 1.0 / count, j == self.num_levels

        return jax.vmap(draw)(_example_keys(key, b))

    def training_losses(self, net, target_net, process, x0, noise, t, cond, null, drop, key) -> dict:
        """Per-example "mse" (mean over the data dimensions) and "loss" (= mse), float32 [B]; the
        first round(bootstrap_fraction B) examples get self-consistency targets, the others flow
        matching at d = 0 with t the given draw of process.sample_t."""
        b = x0.shape[0]
        nb = round(self.bootstrap_fraction * b)
        d = jnp.zeros_like(t)
        if nb > 0:
            t_b, d_b, finest = self.steps(nb, key)
            t, d = t.at[:nb].set(t_b), d.at[:nb].set(d_b)
        x_t = processes.q_sample(process, x0, t, noise)
        v = guided_velocity(noise - x0, x_t, t, cond, null, drop, target_net, self.omega, self.kappa)
        target = v
        if nb > 0:  # two half steps of the target network
            c = None if cond is None else cond[:nb]
            two_halves = shortcut_target(lambda x, tt, rr: target_net(x, tt, rr, c), x_t[:nb], t_b, d_b, finest)
            target = target.at[:nb].set(jax.lax.stop_gradient(two_halves))
        u = net(x_t, t, t - d, cond)
        mse = jnp.mean(((u - target) ** 2).reshape(b, -1), axis=-1)
        return {"mse": mse, "loss": mse}


NAMES = (DEFAULT,) + tuple(OBJECTIVES)


def default_fields(name: str) -> dict:
    """The sub-config of an objective (its dataclass defaults), for experiments/default.py."""
    return {f.name: f.default for f in dataclasses.fields(OBJECTIVES[name])}


def make(diffusion_config: Any):
    """The flow-map objective config.diffusion.objective names, with the fields of its
    sub-config (config.diffusion.meanflow / .shortcut); None for "denoising" (or absent)."""
    d = diffusion_config
    name = d.get("objective", DEFAULT)
    if name == DEFAULT:
        return None
    if name not in OBJECTIVES:
        raise ValueError(f"objective must be one of {NAMES}, got {name!r}")
    fields = d.get(name, {})
    fields = fields.to_dict() if hasattr(fields, "to_dict") else dict(fields)
    return OBJECTIVES[name](**fields)


def check(objective, process, prediction: str, model_config: Any) -> None:
    """ValueError unless the network can be a flow map: process flow, prediction velocity,
    model.interval_input."""
    if process.name != "flow" or prediction != "velocity":
        raise ValueError(f"objective {objective.name!r} needs process 'flow' with prediction 'velocity', "
                         f"got {process.name!r} with {prediction!r}")
    if not model_config["interval_input"]:
        raise ValueError(f"objective {objective.name!r} needs model.interval_input=True (the interval t - r)")
