"""Throughput of the default MNIST-sized denoisers (UNet and DiT) on this machine.

For each model: parameter count, compile seconds, forward and forward+backward
images/s (median over --steps timed steps after one warm-up), XLA's FLOP count
(of the network with the reference ops, since XLA does not count the
native kernels' custom calls), the achieved GFLOP/s and its fraction of this
machine's float32 matmul peak (MFU; best of 10 2048^3 matmuls, measured in the
same process right after the model), and peak memory: XLA's buffer analysis of the
compiled step (arguments + outputs + temporaries), and the process's max
resident set size (its growth over the benchmark, and its final value).
Each model runs in a fresh subprocess.

    .venv/bin/python bench/bench_models.py                       # batch 128, both models
    .venv/bin/python bench/bench_models.py --batch 32 --models dit --steps 3

The forward+backward step is value_and_grad of the eps-MSE loss with
dropout active (train=True); no optimiser update. Numbers on a shared CPU are
noisy: compare only runs made side by side.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from diffusion_jax.ops import allocator

allocator.keep_freed_memory()  # as launch.py, before JAX starts its threads

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from flops import matmul_peak_gflops, reference_flops  # noqa: E402

from diffusion_jax import models, ops  # noqa: E402


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def timed(fn, *args, steps: int) -> list[float]:
    jax.block_until_ready(fn(*args))  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return times


def compile_stats(jitted, *args):
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    peak = float("nan")
    if mem is not None:
        peak = (
            mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes
        ) / 2**20
    return compiled, seconds, peak


def bench_model(name: str, batch: int, steps: int, dtype: str) -> dict:
    cfg = models.default_config(name)
    cfg.dtype = dtype
    model = models.create(cfg)
    shape = (batch, cfg.image_size, cfg.image_size, cfg.in_channels)
    key = jax.random.key(0, impl="unsafe_rbg")  # rbg: much cheaper init compile than threefry on CPU
    variables = jax.jit(model.init)(key, jnp.zeros(shape[:1] + shape[1:]), jnp.zeros(batch, jnp.int32))
    params = variables["params"]
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, size=shape), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, size=batch), jnp.int32)
    eps = jnp.asarray(rng.normal(size=shape), jnp.float32)

    @jax.jit
    def forward(params, x, t):
        return model.apply({"params": params}, x, t)

    @jax.jit
    def forward_backward(params, x, t, eps, key):
        def loss(p):
            out = model.apply({"params": p}, x, t, train=True, rngs={"dropout": key})
            return jnp.mean((out - eps) ** 2)

        return jax.value_and_grad(loss)(params)

    # FLOPs of the reference-ops network, from fresh function objects (bench/flops.py).
    row = {"model": name, "params": n_params, "kernels": ops.selected()}
    row["fwd_gflop"] = reference_flops(lambda: jax.jit(lambda *a: forward.__wrapped__(*a)).lower(params, x, t))
    row["fb_gflop"] = reference_flops(
        lambda: jax.jit(lambda *a: forward_backward.__wrapped__(*a)).lower(params, x, t, eps, jax.random.key(1)))
    rss0 = max_rss_mib()
    fwd, row["fwd_compile_s"], row["fwd_xla_mib"] = compile_stats(forward, params, x, t)
    ts = timed(fwd, params, x, t, steps=steps)
    row["fwd_img_s"] = batch / statistics.median(ts)
    args = (params, x, t, eps, jax.random.key(1))
    fb, row["fb_compile_s"], row["fb_xla_mib"] = compile_stats(forward_backward, *args)
    ts_fb = timed(fb, *args, steps=steps)
    row["fb_img_s"] = batch / statistics.median(ts_fb)
    row["rss_delta_mib"] = max_rss_mib() - rss0
    row["max_rss_mib"] = max_rss_mib()
    row["fwd_gflop_s"] = row["fwd_gflop"] / 1e9 / statistics.median(ts)
    row["fb_gflop_s"] = row["fb_gflop"] / 1e9 / statistics.median(ts_fb)
    row["peak_gflop_s"] = matmul_peak_gflops()
    return row


def main() -> None:
    ops.prepare()  # kernels chosen (DIFFUSION_JAX_OPS) and built before any trace
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128, help="images per step")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up (median reported)")
    ap.add_argument("--models", default="unet,dit", help="comma-separated subset of " + ",".join(models.NAMES))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    ap.add_argument("--json", action="store_true", help="print one JSON row per model (used internally)")
    a = ap.parse_args()
    names = [n.strip() for n in a.models.split(",")]
    if a.json:
        for name in names:
            print(json.dumps(bench_model(name, a.batch, a.steps, a.dtype)), flush=True)
        return
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}, "
          f"batch {a.batch}, {a.steps} timed steps, dtype {a.dtype}")
    header = ("model", "params", "fwd img/s", "fwd+bwd img/s", "compile fwd s", "compile fwd+bwd s",
              "fwd GFLOP/s", "fwd+bwd GFLOP/s", "matmul peak GFLOP/s", "fwd+bwd MFU", "XLA peak fwd MiB", "XLA peak fwd+bwd MiB", "max-RSS growth MiB", "max RSS MiB")
    rows = []
    for name in names:  # one fresh process per model, so memory numbers do not mix
        out = subprocess.run(
            [sys.executable, __file__, "--json", "--models", name, "--batch", str(a.batch),
             "--steps", str(a.steps), "--dtype", a.dtype],
            check=True, capture_output=True, text=True,
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        rows.append(r)
        print(f"[{name}] {r}", flush=True)
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        vals = (r["model"], f"{r['params'] / 1e6:.2f}M", f"{r['fwd_img_s']:.1f}", f"{r['fb_img_s']:.2f}",
                f"{r['fwd_compile_s']:.1f}", f"{r['fb_compile_s']:.1f}", f"{r['fwd_gflop_s']:.1f}",
                f"{r['fb_gflop_s']:.1f}", f"{r['peak_gflop_s']:.0f}", f"{r['fb_gflop_s'] / r['peak_gflop_s']:.1%}",
                f"{r['fwd_xla_mib']:.0f}", f"{r['fb_xla_mib']:.0f}",
                f"{r['rss_delta_mib']:.0f}", f"{r['max_rss_mib']:.0f}")
        print("| " + " | ".join(vals) + " |")


if __name__ == "__main__":
    main()
