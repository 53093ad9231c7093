"""XLA compile time of the train step and of its pieces, for one experiment config.

    python bench/bench_compile.py [--config experiments/mnist.py] [--batch 8]

Prints seconds to compile (after lowering) each of: the network forward; value_and_grad of
an MSE through it; that plus the optimiser update, the EMA, the finite check and the select
that keeps the old state ("pieces"), selecting with a jnp.where per leaf and with one lax.cond
(the where took XLA ~107 s on this UNet, the cond ~8 s); and the real step (`train.step.make_train_step`) under
a plain jax.jit and under `jit_train_step` (shardings and donation), as the trainer runs it.
The batch size barely matters to compile time; a small one keeps the run short.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from diffusion_jax import models, ops  # noqa: E402
from diffusion_jax.data.synthetic import SyntheticIterator  # noqa: E402
from diffusion_jax.train import parallel, sampling  # noqa: E402
from diffusion_jax.train.state import create_train_state, ema_update, make_optimizer  # noqa: E402
from diffusion_jax.train.step import jit_train_step, make_train_step  # noqa: E402


def seconds_to_compile(fn, *args) -> float:
    lowered = fn.lower(*args)
    t0 = time.perf_counter()
    lowered.compile()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="experiments/mnist.py")
    p.add_argument("--batch", type=int, default=8)
    a = p.parse_args()
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, a.config))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    config.training.batch_size = a.batch
    ops.prepare()
    mc = config.model
    model = models.create(mc)
    tx, lr = make_optimizer(config.training)
    state = jax.jit(lambda k: create_train_state(model, mc, tx, k))(jax.random.PRNGKey(0))
    size, ch = int(mc.image_size), int(mc.in_channels)
    x = jnp.zeros((a.batch, size, size, ch))
    t = jnp.ones((a.batch,))
    c = jnp.zeros((a.batch,), jnp.int32) if mc.num_classes > 0 else None

    def loss(params, x, t, c):
        return jnp.mean(model.apply({"params": params}, x, t, c, train=True) ** 2)

    def update(state, x, t, c):  # grad, optimiser, EMA and the finite check, before the select
        value, grads = jax.value_and_grad(loss)(state.params, x, t, c)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, 0.999)
        finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves((params, ema))]))
        return value, finite, (params, opt_state, ema), (state.params, state.opt_state, state.ema_params)

    def pieces(state, x, t, c):  # keeps the old state with a jnp.where per leaf
        value, finite, new, old = update(state, x, t, c)
        return value, jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    def pieces_cond(state, x, t, c):  # the same, selecting with one lax.cond (what step.py does)
        value, finite, new, old = update(state, x, t, c)
        return value, jax.lax.cond(finite, lambda: new, lambda: old)

    mesh = parallel.make_mesh()
    raw = make_train_step(config, model, sampling.make_process(config), tx, lr)
    batch = next(SyntheticIterator(batch_size=a.batch, image_shape=(size, size, ch),
                                   num_classes=max(int(mc.num_classes), 1), seed=0))
    print(f"{a.config}: {len(jax.tree.leaves(state.params))} parameter arrays, batch {a.batch}", flush=True)
    rows = [
        ("forward", jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c)), (state.params, x, t, c)),
        ("value_and_grad", jax.jit(jax.value_and_grad(loss)), (state.params, x, t, c)),
        ("pieces (grad, optimiser, EMA, finite, jnp.where per leaf)", jax.jit(pieces), (state, x, t, c)),
        ("pieces (grad, optimiser, EMA, finite, one lax.cond)", jax.jit(pieces_cond), (state, x, t, c)),
        ("train step, plain jax.jit", jax.jit(raw), (state, batch, jax.random.PRNGKey(1))),
        ("train step, jit_train_step", jit_train_step(raw, mesh),
         (state, parallel.global_batch(mesh, batch), jax.random.PRNGKey(1))),
    ]
    for name, fn, args in rows:
        print(f"{name}: {seconds_to_compile(fn, *args):.1f} s", flush=True)


if __name__ == "__main__":
    main()
