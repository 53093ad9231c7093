"""Side-by-side speed of our UNet (JAX, fast and reference ops) and diffusers' UNet2DModel (PyTorch).

Same network on both sides: ch 64, ch_mult (1, 2, 2) (block_out_channels
(64, 128, 128)), 2 residual blocks per level, self-attention only at the 7x7
level (one head), GroupNorm with 32 groups, 28x28x1 images, float32, no
dropout. One run prints, for each batch size:

* train step (forward + backward + Adam) images/s and forward images/s for
  torch, JAX with `DIFFUSION_JAX_OPS=fast` and JAX with `=reference`, and the
  JAX/torch ratios;
* the minor page faults of the process per call (what
  `diffusion_jax.ops.allocator.keep_freed_memory()` removes);
* the float32 2048^3 matmul rate of jnp and of torch (the machine's practical
  peak), and model-FLOP utilisation: the FLOPs of the network (XLA's cost
  analysis of the step written with the reference ops, the same for every
  mode, since XLA does not count the native kernels' custom calls) divided by
  (step time x jnp matmul rate).

JAX modes (`DIFFUSION_JAX_OPS`): "native" (oneDNN convolutions and C++
GroupNorm as XLA FFI custom calls; the default on a 1-device CPU), "fast"
(pure-XLA custom VJPs) and "reference" (plain lax + autodiff). The process
starts with `diffusion_jax.ops.allocator.keep_freed_memory()` (as launch.py
does), which applies to torch as well; `--malloc default` leaves glibc alone.

The implementations are timed in interleaved rounds (torch, fast, reference,
torch, ...) so that load from other processes hits all of them alike; medians
are printed. Needs the "bench" extra (torch CPU build and diffusers):

    .venv/bin/pip install -e '.[bench,cpu]'
    .venv/bin/python bench/compare_torch.py --batch 128 256 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from collections.abc import Callable

import numpy as np


def _median_rates(
    fns: dict[str, Callable[[], None]], batch: int, rounds: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Images/s and minor page faults per call of each implementation: medians over
    interleaved rounds (after one warm-up call each); faults are the process's."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    faults: dict[str, list[int]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return ({k: batch / float(np.median(v)) for k, v in times.items()},
            {k: float(np.median(v)) for k, v in faults.items()})


# ----------------------------------------------------------------------------
# JAX side
# ----------------------------------------------------------------------------


def jax_unet(batch: int, mode: str, count_flops: bool):
    """Jitted train step and forward of models.create(default_config("unet")) for one ops mode.

    With `count_flops`, also the FLOPs of the reference-ops version of the same
    two functions (lowered, not compiled), with which every mode is credited;
    otherwise None for both.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flops import reference_flops

    from diffusion_jax import models, ops

    config = models.default_config("unet")
    config.dropout = 0.0  # diffusers' UNet2DModel has none by default
    model = models.create(config)
    key = jax.random.key(0)
    x = jax.random.normal(key, (batch, 28, 28, 1), jnp.float32)
    t = jax.random.randint(jax.random.key(1), (batch,), 0, 1000)
    target = jax.random.normal(jax.random.key(2), x.shape)
    params = model.init(jax.random.key(3), x, t)["params"]
    opt = optax.adam(1e-4)
    opt_state = opt.init(params)

    def train_step(params, opt_state, x, t, target):
        def loss_fn(p):
            return jnp.mean(jnp.square(model.apply({"params": p}, x, t, train=True) - target))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    with ops.forced(mode):
        step = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, opt_state, x, t, target).compile()
        fwd = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t)).lower(params, x, t).compile()
    step_flops = fwd_flops = None
    if count_flops:  # new function objects, so that no trace made above comes back from the cache
        step_flops = reference_flops(lambda: jax.jit(lambda *a: train_step(*a)).lower(params, opt_state, x, t, target))
        fwd_flops = reference_flops(
            lambda: jax.jit(lambda p, x, t: model.apply({"params": p}, x, t)).lower(params, x, t))
    state = {"params": params, "opt": opt_state}

    def run_step():
        state["params"], state["opt"], loss = step(state["params"], state["opt"], x, t, target)
        loss.block_until_ready()

    def run_fwd():
        fwd(state["params"], x, t).block_until_ready()

    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    return run_step, run_fwd, step_flops, fwd_flops, n_params


# ----------------------------------------------------------------------------
# PyTorch side
# ----------------------------------------------------------------------------


def torch_unet(batch: int, channels_last: bool = False):
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=28,
        in_channels=1,
        out_channels=1,
        block_out_channels=(64, 128, 128),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        attention_head_dim=128,  # one head of 128 channels, as ours
    )
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(batch, 1, 28, 28).to(memory_format=fmt)
    t = torch.randint(0, 1000, (batch,))
    target = torch.randn_like(x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def run_step():
        opt.zero_grad(set_to_none=True)
        loss = torch.mean((model(x, t).sample - target) ** 2)
        loss.backward()
        opt.step()

    def run_fwd():
        with torch.no_grad():
            model(x, t)

    n_params = sum(p.numel() for p in model.parameters())
    return run_step, run_fwd, n_params


def torch_matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / float(np.min(ts)) / 1e9


# ----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[128, 256], help="batch sizes")
    parser.add_argument("--rounds", type=int, default=3, help="timed interleaved rounds per measurement")
    parser.add_argument("--modes", nargs="+", default=["native", "fast"], help="JAX ops modes to time")
    parser.add_argument("--malloc", choices=("keep", "default"), default="keep",
                        help="keep: diffusion_jax.ops.allocator.keep_freed_memory() at start-up")
    parser.add_argument("--train-batch", type=int, nargs="*", default=None,
                        help="batch sizes at which to time the train step (default: all of --batch)")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    args = parser.parse_args()

    os.environ["DIFFUSION_JAX_MALLOC"] = args.malloc
    from diffusion_jax.ops import allocator

    kept = allocator.keep_freed_memory()  # before JAX or torch start their threads
    import jax

    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f} (1 min)")
    print(f"# jax {jax.__version__} ({jax.default_backend()})", end="")
    torch = None
    if not args.no_torch:
        import diffusers
        import torch

        print(f", torch {torch.__version__} ({torch.get_num_threads()} threads), diffusers {diffusers.__version__}", end="")
    print()
    from diffusion_jax.ops import native

    print(f"# malloc: {'keep_freed_memory' if kept else 'glibc defaults'}; native kernels: "
          f"{'available' if native.available() else native.reason()}")

    from flops import matmul_peak_gflops

    peak_jax = matmul_peak_gflops()
    print(f"float32 2048^3 matmul: jnp {peak_jax:.0f} GFLOP/s", end="")
    if torch is not None:
        print(f", torch {torch_matmul_gflops():.0f} GFLOP/s", end="")
    print()

    train_batches = args.batch if args.train_batch is None else args.train_batch
    for batch in args.batch:
        steps, fwds, flops = {}, {}, {}
        if torch is not None:
            steps["torch"], fwds["torch"], n_torch = torch_unet(batch)
        for i, mode in enumerate(args.modes):  # the same network in every mode: count its FLOPs once
            name = f"jax-{mode}"
            steps[name], fwds[name], step_flops, fwd_flops, n_jax = jax_unet(batch, mode, count_flops=i == 0)
            if i == 0:
                flops["step"], flops["fwd"] = step_flops, fwd_flops
        if torch is not None:
            print(f"\nparameters: diffusers {n_torch:,}, ours {n_jax:,}")
        print(f"\n## batch {batch}, load average {os.getloadavg()[0]:.1f}")
        rows = []
        if batch in train_batches:
            rows.append(("train step (fwd+bwd+Adam)", _median_rates(steps, batch, args.rounds), "step"))
        rows.append(("forward", _median_rates(fwds, batch, args.rounds), "fwd"))
        for title, (rates, faults), kind in rows:
            print(f"{title}: images/s")
            for name, rate in rates.items():
                line = f"  {name:14s} {rate:8.2f} img/s  {faults[name]:9,.0f} page faults/call"
                if name != "torch":
                    gflop = flops[kind] / 1e9
                    achieved = gflop * rate / batch
                    line += f"   {gflop:7.1f} GFLOP/call  {achieved:6.1f} GFLOP/s  MFU {achieved / peak_jax:5.1%}"
                    if "torch" in rates:
                        line += f"   x{rate / rates['torch']:.2f} torch"
                print(line)
            for a, b in (("native", "fast"), ("fast", "reference"), ("native", "reference")):
                if f"jax-{a}" in rates and f"jax-{b}" in rates:
                    print(f"  {a}/{b}: x{rates[f'jax-{a}'] / rates[f'jax-{b}']:.2f}")
        print(f"load average after: {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
