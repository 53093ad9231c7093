"""The jit-compiled training step: (state, batch, key) -> (state, metrics).

One step of diffusion training under the experiment's process (`diffusion_jax.processes`;
for ddpm, Ho et al. 2020, Algorithm 1), per example i of the global batch:

    t_i = process.sample_t(k_i),  eps_i ~ N(0, I),  x_t = a(t_i) x0 + s(t_i) eps_i
    loss = mean_i objectives.training_losses(process, model(*network_inputs(x_t, t), cond), x0, t, eps)

with the class label replaced by the null label `num_classes` with
probability `cond_drop_prob` (classifier-free guidance, Ho & Salimans 2022).
With config.diffusion.objective "meanflow" or "shortcut" the loss is instead the flow-map
objective's (`diffusion_jax.flow_maps`: targets made by the network itself, from its own
(t, r) or (t, d) draws); with the default "denoising" the step is exactly the one above.

Randomness: the step's key is fold_in(key, step); example i's key is
fold_in(step_key, i) with i its index in the GLOBAL batch, so the draws do not
depend on how the batch is split over devices or hosts (the 1-device and
8-device runs see the same t, eps and label drops).

A non-finite loss, gradient norm or new (EMA) parameter leaves the state as it was (the update is
discarded inside the step) and sets metrics["finite"] to 0; the loop stops on
it, so a bad state is never saved.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from diffusion_jax import flow_maps, models, objectives, processes
from diffusion_jax.train import parallel
from diffusion_jax.train.state import TrainState, ema_decay_at, ema_update


def per_example_draws(
    step_key: jax.Array, batch_size: int, image_shape: tuple[int, ...], process: Any,
    cond_drop_prob: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(t [B], noise float32 [B, H, W, C], drop bool [B]) from per-example keys; t is int32
    for ddpm and float32 for the continuous processes."""

    def draw(k):
        k_t, k_noise, k_drop = jax.random.split(k, 3)
        t = process.sample_t(k_t)
        noise = jax.random.normal(k_noise, image_shape, jnp.float32)
        drop = jax.random.bernoulli(k_drop, cond_drop_prob)
        return t, noise, drop

    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, jnp.arange(batch_size))
    return jax.vmap(draw)(keys)


def make_train_step(config: Any, model: Any, process: Any, tx: optax.GradientTransformation,
                    lr_schedule: optax.Schedule) -> Callable:
    """The pure (unjitted) step function for `config` under `process` (a Schedule means ddpm)."""
    if isinstance(process, processes.Schedule):
        process = processes.DDPM(process, variance=config.diffusion.variance)
    mc, dc, tc = config.model, config.diffusion, config.training
    prediction, weighting = processes.own_objective(process, dc.prediction, dc.loss_weighting)  # "": its own
    num_classes = int(mc.num_classes)
    cond_drop_prob = float(tc.cond_drop_prob) if num_classes > 0 else 0.0
    flow_map = flow_maps.make(dc)  # meanflow | shortcut; None: the regression of `objectives`

    def train_step(state: TrainState, batch: dict, key: jax.Array):
        x0 = batch["image"]
        b = x0.shape[0]
        step_key = jax.random.fold_in(key, state.step)
        draw_key, dropout_key = jax.random.split(step_key)
        t, noise, drop = per_example_draws(
            draw_key, b, x0.shape[1:], process, cond_drop_prob)
        if num_classes > 0:  # the null label (value num_classes) where dropped
            cond = models.guidance.where_dropped(
                drop, batch["label"].astype(jnp.int32), models.null_cond(mc, b))
        else:
            cond = None
        x_t = processes.q_sample(process, x0, t, noise)
        x_in, c_noise = process.network_inputs(x_t, t)

        def loss_fn(params):
            if flow_map is not None:  # targets made by the network itself (diffusion_jax.flow_maps)
                target_params = jax.lax.stop_gradient(flow_map.target_params(params, state.ema_params))
                losses = flow_map.training_losses(
                    flow_maps.network(model.apply, process, params, train=True, rngs={"dropout": dropout_key}),
                    flow_maps.network(model.apply, process, target_params), process, x0, noise, t, cond,
                    models.null_cond(mc, b), drop, jax.random.fold_in(step_key, 1))
                return jnp.mean(losses["loss"]), losses
            out = model.apply({"params": params}, x_in, c_noise, cond, train=True,
                              rngs={"dropout": dropout_key})
            losses = objectives.training_losses(
                process, out, x0, t, noise,
                prediction=prediction, weighting=weighting,
                min_snr_gamma=dc.min_snr_gamma, learn_variance=bool(mc.learn_sigma),
                vlb_weight=dc.vlb_weight,
            )
            return jnp.mean(losses["loss"]), losses

        (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay_at(state.step, tc.ema_decay, tc.ema_warmup)
        candidate = TrainState(
            step=state.step + 1,
            params=params,
            ema_params=ema_update(state.ema_params, params, decay),
            opt_state=opt_state,
        )
        # The update is kept only if everything it produced is finite: the loss, the
        # gradient norm, and every new parameter and EMA parameter (a finite gradient
        # times a huge learning rate can still overflow the parameters).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.all(jnp.asarray(
            [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((params, candidate.ema_params))]))
        # lax.cond, not a jnp.where per leaf: the same values, but the where over the params,
        # optimiser state and EMA took XLA ~110 s to compile against ~8 s (bench/bench_compile.py).
        new_state = jax.lax.cond(finite, lambda: candidate, lambda: state)
        metrics = {
            "loss": loss,
            "mse": jnp.mean(losses["mse"]),
            "grad_norm": grad_norm,
            "learning_rate": lr_schedule(state.step),
            "finite": finite.astype(jnp.int32),
        }
        if "vlb" in losses:
            metrics["vlb"] = jnp.mean(losses["vlb"])
        return new_state, metrics

    return train_step


def jit_train_step(train_step: Callable, mesh: Mesh, state_sharding: Any = None) -> Callable:
    """jax.jit with the batch split over the mesh, the state under `state_sharding`
    (`parallel.state_sharding`: FSDP; default replicated) in and out, key and
    metrics replicated, and the incoming state donated (its buffers are reused
    for the new one)."""
    repl = parallel.replicated_sharding(mesh)
    state_sharding = repl if state_sharding is None else state_sharding
    return jax.jit(
        train_step,
        in_shardings=(state_sharding, parallel.batch_sharding(mesh), repl),
        out_shardings=(state_sharding, repl),
        donate_argnums=(0,),
    )
