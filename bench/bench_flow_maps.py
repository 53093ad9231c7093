"""Train-step time of the flow-map objectives against plain flow matching, in one process.

    python bench/bench_flow_maps.py [--config experiments/mnist_meanflow.py] [--rounds 15]

The config's network and batch train under config.diffusion.objective = denoising (flow
matching: one forward and backward pass), meanflow (plus the JVP on the r != t share of the
batch, traced with the reference kernels, and with omega != 1 one guidance forward pass) and
shortcut (plus two forward passes on the bootstrap share, and the guidance pass). The three
compiled steps run round-robin, one step each per round, so that they see the same load;
prints per objective the median wall and process-CPU time per step, the ratio to flow
matching and the compile time.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_jax.ops import allocator  # noqa: E402

allocator.keep_freed_memory()  # as launch.py, before JAX starts its threads

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from diffusion_jax import ops  # noqa: E402
from diffusion_jax.train import config as config_lib, parallel  # noqa: E402
from step_inputs import train_step_inputs  # noqa: E402

config_flags.DEFINE_config_file("config", "experiments/mnist_meanflow.py", "experiment config (flow, interval input)")
flags.DEFINE_integer("rounds", 15, "timed rounds (one step of each objective per round)")
FLAGS = flags.FLAGS

OBJECTIVES = ("denoising", "meanflow", "shortcut")


def main(argv):
    del argv
    ops.prepare()
    mesh = parallel.make_mesh()
    steps = {}
    for name in OBJECTIVES:
        config = FLAGS.config.copy_and_resolve_references()
        config.diffusion.objective = name
        config_lib.validate(config)
        step, state, batch, key, _ = train_step_inputs(config, mesh)
        t = time.perf_counter()
        compiled = step.lower(state, batch, key).compile()
        compile_s = time.perf_counter() - t
        state, m = compiled(state, batch, key)  # warm-up
        jax.block_until_ready(m)
        steps[name] = dict(fn=compiled, state=state, batch=batch, key=key, compile_s=compile_s, wall=[], cpu=[])
    for _ in range(FLAGS.rounds):
        for s in steps.values():
            t, c = time.perf_counter(), time.process_time()
            s["state"], m = s["fn"](s["state"], s["batch"], s["key"])
            jax.block_until_ready(m)
            s["wall"].append(time.perf_counter() - t)
            s["cpu"].append(time.process_time() - c)
    cfg = FLAGS.config
    print(f"config: {cfg.experiment}  batch {cfg.training.batch_size}  kernels {ops.selected()}  "
          f"{os.cpu_count()} cores  rounds {FLAGS.rounds}")
    base = float(np.median(steps["denoising"]["wall"]))
    for name, s in steps.items():
        wall, cpu = float(np.median(s["wall"])), float(np.median(s["cpu"]))
        print(f"{name:10s} step_s {wall:.4f} (min {min(s['wall']):.4f})  cpu_s {cpu:.4f}  "
              f"x flow matching {wall / base:.2f}  steps/s {1 / wall:.2f}  compile_s {s['compile_s']:.1f}")


if __name__ == "__main__":
    app.run(main)
