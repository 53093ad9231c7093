"""Per-device bytes of the train state (params + Adam moments + EMA) under FSDP.

    .venv/bin/python bench/bench_fsdp_memory.py            # 8 fake CPU devices (set here)
    .venv/bin/python bench/bench_fsdp_memory.py --step XL 8 # + XLA's memory of DiT-XL/2's train step at fsdp=8
    .venv/bin/python bench/bench_fsdp_memory.py --step S 1 --run   # ... and train 2 steps: time and peak RSS

For the MNIST UNet (experiments/mnist.py) and DiT (experiments/mnist_dit.py) the
state is built on 8 host CPU devices at fsdp = 1, 2, 4, 8 with the trainer's
shardings (`parallel.state_sharding`), and device 0's bytes are summed over
the arrays' addressable shards. For the DiT sizes of Peebles & Xie (S, B, L, XL;
models.dit.DIT_SIZES, patch 2 at 32x32x4, i.e. the latent shape of 256px ImageNet)
the same rule is applied to the state's shapes (`jax.eval_shape`) without
allocating it; the script checks that this count equals the measured one on
the MNIST models. The last column is the host memory the 8 fake devices
need for the state alone (8 x per device), the figure that decides what one
24 GiB host can hold; activations and the step's temporaries come on top.
`--step SIZE FSDP` compiles that DiT's train step at global batch 8 and prints
XLA's memory analysis per device: arguments + outputs - donated + temporaries.
`--run` then builds the sharded state, trains 2 steps on a random batch and prints
each step's wall time and the process's peak RSS (getrusage); a watchdog ends the
process (exit 3) once its RSS passes --max_gib (default 15), before the host runs short.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import resource  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from diffusion_jax import models  # noqa: E402
from diffusion_jax.train import parallel, sampling  # noqa: E402
from diffusion_jax.train.state import create_train_state, make_optimizer, num_params  # noqa: E402
from diffusion_jax.train.step import jit_train_step, make_train_step  # noqa: E402
from experiments import mnist, mnist_dit  # noqa: E402

FSDP = (1, 2, 4, 8)
MiB = 2**20


def state_fn(config):
    model = models.create(config.model)
    tx, _ = make_optimizer(config.training)
    return lambda k: create_train_state(model, config.model, tx, k)


def counted_bytes(shapes, mesh) -> int:
    """Device 0's bytes under the FSDP rule, from shapes alone."""
    shardings = parallel.state_sharding(mesh, shapes)
    return sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
               for x, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)))


def measured_bytes(create, mesh, key) -> int:
    """Device 0's bytes of the real state, summed over its addressable shards."""
    shapes = jax.eval_shape(create, key)
    state = jax.jit(create, out_shardings=parallel.state_sharding(mesh, shapes))(key)
    dev0 = mesh.devices.flat[0]
    out = sum(s.data.nbytes for x in jax.tree.leaves((state.params, state.opt_state, state.ema_params))
              for s in x.addressable_shards if s.device == dev0)
    out += state.step.nbytes
    del state
    return out


def dit_config(size: str):
    config = mnist_dit.get_config()
    width, depth, heads = models.dit.DIT_SIZES[size]
    m = config.model
    m.image_size, m.in_channels, m.patch_size = 32, 4, 2
    m.hidden_size, m.depth, m.num_heads = width, depth, heads
    m.num_classes = 1000
    return config


def row(name, params, per_device):
    cells = " | ".join(f"{b / MiB:,.1f}" for b in per_device)
    print(f"| {name} | {params / 1e6:,.1f} | {cells} | {8 * per_device[0] / 2**30:,.2f} | "
          f"{8 * per_device[-1] / 2**30:,.2f} |", flush=True)


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def watch_rss(max_gib: float) -> None:
    """Ends the process (exit 3) as soon as its resident memory passes `max_gib`."""
    def watch():
        while True:
            if rss_gib() > max_gib:
                print(f"RSS {rss_gib():.1f} GiB > --max_gib {max_gib}: stopped", flush=True)
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


def step_memory(size: str, fsdp: int, batch_size: int = 8, run: bool = False) -> None:
    config = dit_config(size)
    config.training.batch_size = batch_size
    model = models.create(config.model)
    tx, lr = make_optimizer(config.training)
    mesh = parallel.make_mesh(fsdp=fsdp)
    create = state_fn(config)
    shapes = jax.eval_shape(create, jax.random.PRNGKey(0))
    shardings = parallel.state_sharding(mesh, shapes)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    rows = parallel.batch_sharding(mesh)
    batch = {"image": jax.ShapeDtypeStruct((batch_size, 32, 32, 4), jnp.float32, sharding=rows),
             "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=rows)}
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=parallel.replicated_sharding(mesh))
    step = jit_train_step(make_train_step(config, model, sampling.make_process(config), tx, lr), mesh, shardings)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, key).compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    per = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    print(f"DiT-{size}/2 fsdp={fsdp} batch {batch_size}: per device arguments {m.argument_size_in_bytes / 2**30:.2f} "
          f"GiB, temporaries {m.temp_size_in_bytes / 2**30:.2f} GiB, total {per / 2**30:.2f} GiB; "
          f"x8 devices {8 * per / 2**30:.1f} GiB (compile {seconds:.0f} s)", flush=True)
    if not run:
        return
    t0 = time.perf_counter()
    state = jax.jit(create, out_shardings=shardings)(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    batch = jax.device_put({"image": rng.standard_normal((batch_size, 32, 32, 4), np.float32),
                            "label": rng.integers(0, 1000, batch_size).astype(np.int32)}, rows)
    key = jax.device_put(jax.random.PRNGKey(1), parallel.replicated_sharding(mesh))
    jax.block_until_ready(state)
    print(f"state built in {time.perf_counter() - t0:.1f} s, RSS {rss_gib():.2f} GiB", flush=True)
    for i in range(2):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, key)
        loss = float(jax.device_get(metrics["loss"]))
        print(f"step {i + 1}: {time.perf_counter() - t0:.1f} s, loss {loss:.4f}, RSS {rss_gib():.2f} GiB", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    print(f"DiT-{size}/2 fsdp={fsdp} batch {batch_size}: peak RSS of the process {peak:.2f} GiB")


def main():
    if sys.argv[1:2] == ["--step"]:
        import argparse

        p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--step", nargs=2, metavar=("SIZE", "FSDP"), required=True)
        p.add_argument("--batch_size", type=int, default=8, help="global batch of the step")
        p.add_argument("--run", action="store_true", help="also train 2 steps: wall time and peak RSS")
        p.add_argument("--max_gib", type=float, default=15.0, help="--run: stop once RSS passes this (GiB)")
        args = p.parse_args()
        if args.run:
            watch_rss(args.max_gib)
        return step_memory(args.step[0], int(args.step[1]), args.batch_size, args.run)
    key = jax.random.PRNGKey(0)
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices")
    print("| model | params (M) | " + " | ".join(f"MiB/device fsdp={f}" for f in FSDP)
          + " | host GiB, fsdp=1 | host GiB, fsdp=8 |")
    print("|---" * (3 + len(FSDP) + 1) + "|")
    for name, config in (("MNIST UNet (measured)", mnist.get_config()),
                         ("MNIST DiT (measured)", mnist_dit.get_config())):
        create = state_fn(config)
        shapes = jax.eval_shape(create, key)
        per_device = []
        for fsdp in FSDP:
            mesh = parallel.make_mesh(fsdp=fsdp)
            got = measured_bytes(create, mesh, key)
            assert got == counted_bytes(shapes, mesh), (name, fsdp, got, counted_bytes(shapes, mesh))
            per_device.append(got)
        row(name, num_params(shapes.params), per_device)
    for size in ("S", "B", "L", "XL"):
        create = state_fn(dit_config(size))
        shapes = jax.eval_shape(create, key)
        per_device = [counted_bytes(shapes, parallel.make_mesh(fsdp=f)) for f in FSDP]
        row(f"DiT-{size}/2, 32x32x4 (counted)", num_params(shapes.params), per_device)


if __name__ == "__main__":
    main()
