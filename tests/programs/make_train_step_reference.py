"""Writes tests/data/train_step_reference.npz: losses and parameter checksums of three jitted
train steps of experiments/smoke.py (ddpm, eps) and of its v-prediction/min-SNR variant, made
with the discrete-time implementation at commit 17866ad, so that tests/test_train_step.py can
hold the redesigned train step to the same bits.

Run once from the repository root at that commit: python tests/programs/make_train_step_reference.py
"""

import jax
import numpy as np

from experiments import smoke
from diffusion_jax import models
from diffusion_jax.train import parallel, sampling
from diffusion_jax.train.state import create_train_state, make_optimizer
from diffusion_jax.train.step import jit_train_step, make_train_step
try:  # where it lives now; at 17866ad it was diffusion_jax.train.synthetic
    from diffusion_jax.data.synthetic import SyntheticIterator
except ImportError:
    from diffusion_jax.train.synthetic import SyntheticIterator

VARIANTS = {"eps": {}, "v_min_snr": {"prediction": "v", "loss_weighting": "min_snr"}}


def run(variant):
    config = smoke.get_config()
    config.training.warmup_steps = 0
    for k, v in VARIANTS[variant].items():
        config.diffusion[k] = v
    model = models.create(config.model)
    tx, lr = make_optimizer(config.training)
    mesh = parallel.make_mesh()
    repl = (getattr(parallel, "replicated_sharding", None) or parallel.replicated)(mesh)
    state = jax.jit(lambda k: create_train_state(model, config.model, tx, k), out_shardings=repl)(
        jax.random.PRNGKey(0))
    step = jit_train_step(make_train_step(config, model, sampling.make_schedule(config), tx, lr), mesh)
    it = SyntheticIterator(batch_size=8, image_shape=(8, 8, 1), num_classes=3, seed=0)
    losses = []
    for _ in range(3):
        state, metrics = step(state, parallel.global_batch(mesh, next(it)), jax.random.PRNGKey(1))
        losses.append(float(metrics["loss"]))
    leaves = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(state.params)]
    return np.asarray(losses, np.float32), np.asarray([np.sum(x) for x in leaves] + [np.sum(x * x) for x in leaves])


if __name__ == "__main__":
    out = {}
    for variant in VARIANTS:
        out[f"{variant}/loss"], out[f"{variant}/params"] = run(variant)
    np.savez("tests/data/train_step_reference.npz", **out)
    print({k: v[:3] for k, v in out.items()})
