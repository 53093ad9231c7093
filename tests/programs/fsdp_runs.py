"""FSDP runs for tests/test_train_parallel.py, in a fresh process (the device count is fixed
at JAX start-up). Prints one line "RESULT <json>".

    fsdp_runs.py direct <workdir>        8 devices: the smoke config's first 4 steps, data parallel
                                         the old way (replicated state, `jit_train_step` without
                                         shardings) and at fsdp = 8; the trainer at fsdp = 4
                                         for 3 steps, then resumed at fsdp = 2 to step 4 (fsdp = 4
                                         and 2 run in the trainer only: compilations are the cost)
    fsdp_runs.py loop <workdir> FLAGS    the trainer (loop.train) on the smoke config with FLAGS
                                         (--config.* overrides), e.g. in two processes

Every run starts from the trainer's keys (PRNGKey(seed) split into init, step, sample) and
reads the trainer's data iterator, so its losses are comparable with metrics.jsonl.
"""

import json
import os
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from diffusion_jax import models  # noqa: E402
from diffusion_jax.train import loop, parallel, sampling  # noqa: E402
from diffusion_jax.train.state import create_train_state, make_optimizer  # noqa: E402
from diffusion_jax.train.step import jit_train_step, make_train_step  # noqa: E402

SMOKE = os.path.join(REPO, "experiments", "smoke.py")
NUM_STEPS = 4
# The smoke UNet's arrays are all below the production threshold (2**12 elements):
# split those of 256 elements and more, so that FSDP has something to shard.
parallel.FSDP_MIN_SIZE = 256


def smoke_config(extra=()):
    config_flags.DEFINE_config_file("config", SMOKE)
    flags.FLAGS([sys.argv[0], *extra])
    config = flags.FLAGS.config
    config.training.log_every_steps = 1
    config.training.checkpoint_every_steps = 3
    config.training.num_steps = NUM_STEPS
    return config


def flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v).tolist()
            for k, v in jax.tree_util.tree_leaves_with_path(parallel.to_host(tree))}


def direct(config, fsdp):
    """NUM_STEPS train steps outside the trainer; fsdp=None: data parallel the old way
    (a mesh of all devices, the state replicated, the step without state shardings)."""
    model = models.create(config.model)
    process = sampling.make_process(config)
    tx, lr = make_optimizer(config.training)
    mesh = parallel.make_mesh(fsdp=fsdp or 1)
    init_key, step_key, _ = (parallel.replicate_array(mesh, k)
                             for k in jax.random.split(jax.random.PRNGKey(config.seed), 3))
    create = lambda k: create_train_state(model, config.model, tx, k)  # noqa: E731
    if fsdp is None:
        shardings = None
        state = jax.jit(create, out_shardings=parallel.replicated_sharding(mesh))(init_key)
    else:
        shardings = parallel.state_sharding(mesh, jax.eval_shape(create, init_key))
        state = jax.jit(create, out_shardings=shardings)(init_key)
    step = jit_train_step(make_train_step(config, model, process, tx, lr), mesh, shardings)
    data = loop.make_train_iterator(config)
    losses = []
    for _ in range(NUM_STEPS):
        state, metrics = step(state, parallel.global_batch(mesh, next(data)), step_key)
        losses.append(float(parallel.to_host(metrics)["loss"]))
    # bytes of params + Adam state + EMA that device 0 holds (its addressable shards)
    dev0 = jax.devices()[0]
    nbytes = sum(s.data.nbytes for x in jax.tree.leaves((state.params, state.opt_state, state.ema_params))
                 for s in x.addressable_shards if s.device == dev0)
    sharded = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params))
    return {"losses": losses, "params": flat(state.params), "ema": flat(state.ema_params),
            "device0_bytes": nbytes, "sharded_leaves": sharded,
            "leaves": len(jax.tree.leaves(state.params))}


def metrics_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {int(r["step"]): r["loss"] for r in rows if "loss" in r}


def main():
    mode, workdir = sys.argv[1], sys.argv[2]
    if mode == "loop":
        config = smoke_config(sys.argv[3:])
        state = loop.train(config, workdir)
        out = {"losses": metrics_losses(workdir) if jax.process_index() == 0 else None,
               "params": flat(state.params), "process": jax.process_index(),
               "sharded_leaves": sum(not x.sharding.is_fully_replicated
                                     for x in jax.tree.leaves(state.params))}
        print("RESULT " + json.dumps(out), flush=True)
        return
    assert jax.device_count() == 8, jax.devices()
    config = smoke_config()
    out = {"dp": direct(config, None)}
    out["fsdp8"] = direct(config, 8)
    # the trainer: fsdp = 4, stopped by SIGTERM after step 3 (saved), then resumed at fsdp = 2
    def stop_after_3(step, state):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    config.parallel.fsdp = 4
    state = loop.train(config, workdir, step_callback=stop_after_3)
    assert int(parallel.to_host(state.step)) == 3
    config.parallel.fsdp = 2
    state = loop.train(config, workdir)
    out["resumed"] = {"losses": metrics_losses(workdir), "params": flat(state.params),
                      "ema": flat(state.ema_params)}
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
