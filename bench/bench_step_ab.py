"""Same-run A/B of the jitted train step between two checkouts of this repository.

    python bench/bench_step_ab.py OLD_REPO NEW_REPO [--config experiments/mnist_ddpm.py] [--rounds 4] [--steps 8]

Each round runs one subprocess per checkout, alternating A and B, each timing --steps train
steps (after a warm-up step) of the config's model at its batch size on its default process;
prints every round's median step time and the median of the per-round ratios NEW / OLD.
Used for issue #13: "train time per step unchanged for ddpm".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

PROGRAM = r'''
import json, sys, time
import jax, numpy as np
from diffusion_jax import models, ops
getattr(ops, "prepare", lambda: None)()  # as the trainer: choose and build the kernels before tracing
from diffusion_jax.train import parallel, sampling
from diffusion_jax.train.state import create_train_state, make_optimizer
from diffusion_jax.train.step import jit_train_step, make_train_step
import importlib.util
spec = importlib.util.spec_from_file_location("cfg", sys.argv[1]); mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod); config = mod.get_config()
model = models.create(config.model)
tx, lr = make_optimizer(config.training)
mesh = parallel.make_mesh()
repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
state = jax.jit(lambda k: create_train_state(model, config.model, tx, k), out_shardings=repl)(jax.random.PRNGKey(0))
step = jit_train_step(make_train_step(config, model, sampling.make_schedule(config), tx, lr), mesh)
mc, b = config.model, config.training.batch_size
rng = np.random.default_rng(0)
batch = {"image": rng.uniform(-1, 1, (b, mc.image_size, mc.image_size, mc.in_channels)).astype(np.float32),
         "label": rng.integers(0, max(mc.num_classes, 1), b).astype(np.int32)}
batch = parallel.global_batch(mesh, batch)
key = jax.random.PRNGKey(1)
state, m = step(state, batch, key); jax.block_until_ready(m)
times = []
for _ in range(int(sys.argv[2])):
    t0 = time.perf_counter(); state, m = step(state, batch, key); jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
print(json.dumps({"median": float(np.median(times))}))
'''


def run(repo: str, config: str, steps: int) -> float:
    env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", PROGRAM, os.path.join(repo, config), str(steps)], cwd=repo,
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["median"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--config", default="experiments/mnist_ddpm.py")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    a = p.parse_args()
    ratios = []
    for r in range(a.rounds):
        cfg = os.path.join(os.path.abspath(a.new), a.config)  # NEW's file: OLD may predate it
        old, new = run(a.old, cfg, a.steps), run(a.new, cfg, a.steps)
        ratios.append(new / old)
        print(f"round {r}: old {1e3 * old:.1f} ms, new {1e3 * new:.1f} ms, new/old {new / old:.3f}", flush=True)
    print(f"median new/old over {a.rounds} rounds: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
