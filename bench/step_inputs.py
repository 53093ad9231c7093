"""What a benchmark of the train step needs, built once for bench_train.py and bench_flow_maps.py."""

from __future__ import annotations

import jax
import numpy as np

from diffusion_jax import models
from diffusion_jax.train import parallel, sampling
from diffusion_jax.train.state import create_train_state, make_optimizer
from diffusion_jax.train.step import jit_train_step, make_train_step


def train_step_inputs(config, mesh):
    """(step, state, batch, key, make_step) for a validated `config` on `mesh`: the jitted train step
    (not yet compiled), a fresh state replicated over the mesh, one batch of uniform images and
    labels (seed 0) and the step key; `make_step()` builds a fresh, unjitted step function."""
    model = models.create(config.model)
    process = sampling.make_process(config)  # any process (ddpm, vp, edm, flow)
    tx, lr = make_optimizer(config.training)
    state = jax.jit(lambda k: create_train_state(model, config.model, tx, k),
                    out_shardings=parallel.replicated_sharding(mesh))(jax.random.PRNGKey(0))
    b, mc = config.training.batch_size, config.model
    rng = np.random.default_rng(0)
    batch = parallel.global_batch(mesh, {
        "image": rng.uniform(-1, 1, (b, mc.image_size, mc.image_size, mc.in_channels)).astype(np.float32),
        "label": rng.integers(0, max(mc.num_classes, 1), b).astype(np.int32)})
    key = parallel.replicate_array(mesh, jax.random.PRNGKey(1))

    def make_step():
        return make_train_step(config, model, process, tx, lr)

    return jit_train_step(make_step(), mesh), state, batch, key, make_step
