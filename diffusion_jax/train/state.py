"""Train state, optimiser, learning-rate schedule and EMA of the parameters.

The state is a plain pytree of arrays (no functions inside), so `jax.jit`
can donate it, shard it and Orbax can save it as it is:

    TrainState(step, params, ema_params, opt_state)

The model and the optimiser are rebuilt from the config; everything a resume
needs besides them is in the state (the data iterator's position is saved
beside it by `diffusion_jax.train.checkpoints`).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adam", "adamw", "muon")
MUON_MOMENTUM = 0.95  # Muon's momentum (Jordan et al. 2024)
MUON_RMS = 0.2  # update RMS of AdamW: its learning rate and weight decay carry over (Liu et al. 2025)
LR_SCHEDULES = ("constant", "cosine", "linear")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of optimiser updates applied so far
    params: Any
    ema_params: Any
    opt_state: Any


def make_learning_rate_schedule(training: Any) -> optax.Schedule:
    """Linear warm-up from 0 to `learning_rate` over `warmup_steps`, then
    constant, cosine decay to 0 or linear decay to 0 at `num_steps`.

    DDPM (Ho et al. 2020) uses 5,000 warm-up steps followed by a constant rate.
    """
    peak = float(training.learning_rate)
    warmup = int(training.warmup_steps)
    decay_steps = max(int(training.num_steps) - warmup, 1)
    if training.lr_schedule == "constant":
        after = optax.constant_schedule(peak)
    elif training.lr_schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps)
    elif training.lr_schedule == "linear":
        after = optax.linear_schedule(peak, 0.0, decay_steps)
    else:
        raise ValueError(
            f"training.lr_schedule must be one of {LR_SCHEDULES}, got {training.lr_schedule!r}"
        )
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def muon_matrices(params: Any) -> Any:
    """Which leaves Muon updates: the 2-D Dense kernels (x W, W of shape (in, out)), the hidden
    matrices of Jordan et al. (2024); None elsewhere (biases, norm scales, conv kernels,
    embedding tables), which AdamW updates."""
    def spec(path, x):
        is_kernel = getattr(path[-1], "key", None) == "kernel"
        return optax.contrib.MuonDimensionNumbers(0, 1) if is_kernel and x.ndim == 2 else None
    return jax.tree_util.tree_map_with_path(spec, params)


def make_optimizer(training: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Global-norm clipping (if grad_clip_norm > 0) followed by Adam, AdamW or Muon.

    Muon (Jordan et al. 2024): the Nesterov momentum (beta 0.95) of each Dense kernel
    orthogonalised by 5 Newton-Schulz steps, O ~ U V^T of its SVD U S V^T, scaled to the update
    RMS of AdamW, 0.2 sqrt(max(in, out)) O (Liu et al. 2025), so one learning rate and decoupled
    weight decay serve both; every other leaf (`muon_matrices`) takes AdamW with b1, b2, eps and
    Nesterov momentum (optax's Muon: its first step is 1.47 lr per entry at b1 = 0.9, not lr).
    `muon_lr_scale` multiplies the Muon leaves' learning rate only (the AdamW leaves keep lr).
    """
    schedule = make_learning_rate_schedule(training)
    if training.optimizer == "adam":
        opt = optax.adam(schedule, b1=training.b1, b2=training.b2, eps=training.eps)
    elif training.optimizer == "adamw":
        opt = optax.adamw(
            schedule, b1=training.b1, b2=training.b2, eps=training.eps,
            weight_decay=training.weight_decay,
        )
    elif training.optimizer == "muon":
        scale = float(training.muon_lr_scale)
        opt = optax.contrib.muon(
            lambda step: scale * schedule(step), adam_learning_rate=schedule, beta=MUON_MOMENTUM,
            eps=training.eps, weight_decay=training.weight_decay,
            adam_b1=training.b1, adam_b2=training.b2, adam_weight_decay=training.weight_decay,
            muon_weight_dimension_numbers=muon_matrices, consistent_rms=MUON_RMS,
        )
    else:
        raise ValueError(
            f"training.optimizer must be one of {OPTIMIZERS}, got {training.optimizer!r}"
        )
    if training.grad_clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(training.grad_clip_norm), opt)
    return opt, schedule


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """EMA decay used at `step`: `decay`, or min(decay, (1 + step) / (10 + step))
    with warm-up, so that early averages are not dominated by the random init."""
    decay = jnp.asarray(decay, jnp.float32)
    if not warmup:
        return decay
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema_params: Any, params: Any, decay: jax.Array) -> Any:
    """ema <- decay * ema + (1 - decay) * params, leaf by leaf."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def dummy_inputs(model_config: Any, batch: int = 1) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(x, t, cond) of the right shapes and dtypes to initialise a model."""
    size = int(model_config.image_size)
    x = jnp.zeros((batch, size, size, int(model_config.in_channels)), jnp.float32)
    t = jnp.zeros((batch,), jnp.int32)
    if model_config.num_classes > 0:
        cond = jnp.zeros((batch,), jnp.int32)
    elif model_config.cond_dim > 0:
        cond = jnp.zeros((batch, int(model_config.cond_dim)), jnp.float32)
    else:
        cond = None
    return x, t, cond


def create_train_state(
    model: Any, model_config: Any, tx: optax.GradientTransformation, key: jax.Array
) -> TrainState:
    """Fresh state at step 0 (EMA starts at the initial parameters). Traceable:
    the trainer runs it under `jax.jit` with replicated output shardings."""
    x, t, cond = dummy_inputs(model_config)
    params = model.init({"params": key}, x, t, cond, train=False)["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=params,
        opt_state=tx.init(params),
    )


def num_params(params: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))

