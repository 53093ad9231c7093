"""Training throughput of an experiment config on this machine.

    python bench/bench_train.py --config experiments/mnist.py [--steps 20] [--config.training.batch_size=64]

Prints (medians over --steps timed steps, after one warm-up step):
images/s, step time (wall and process CPU time), compile time, peak memory, FLOPs per step from XLA's cost
analysis (of the step with the reference ops), this machine's float32 matmul peak and the model-FLOP
utilisation MFU = (FLOPs per step / step time) / matmul peak.

The peak is sampled between the timed steps (the best of 5 [n, n] matmuls right after each step), and
MFU is the median over steps of each step's utilisation of the peak measured next to it, so that both
sides of the ratio see the same load; on this project's shared VM the peak alone moved between 145 and
290 GFLOP/s within minutes (2026-11-26). The best-of-10 peak measured once at the end, and the MFU against it, are printed too.
"""

from __future__ import annotations

import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_jax.ops import allocator  # noqa: E402

allocator.keep_freed_memory()  # as launch.py, before JAX starts its threads

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from flops import matmul_timer, reference_flops  # noqa: E402
from step_inputs import train_step_inputs  # noqa: E402

from diffusion_jax import ops  # noqa: E402
from diffusion_jax.train import config as config_lib, parallel  # noqa: E402
from diffusion_jax.train.state import num_params  # noqa: E402
from diffusion_jax.train.step import jit_train_step  # noqa: E402

config_flags.DEFINE_config_file("config", "experiments/mnist.py", "experiment config")
flags.DEFINE_integer("steps", 20, "timed train steps")
flags.DEFINE_integer("matmul_size", 2048, "n of the n x n float32 matmul that measures the peak")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    ops.prepare()  # kernels chosen (DIFFUSION_JAX_OPS) and built before any trace
    config = FLAGS.config
    config_lib.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
    mesh = parallel.make_mesh()
    step, state, batch, key, make_step = train_step_inputs(config, mesh)
    b, mc = config.training.batch_size, config.model
    t = time.perf_counter()
    compiled = step.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - t
    # FLOPs of the same step with the reference ops, from a fresh step function (bench/flops.py).
    kernels = ops.selected()
    flops = reference_flops(
        lambda: jit_train_step(make_step(), mesh).lower(state, batch, key))

    peak_now = matmul_timer(FLAGS.matmul_size)
    state, m = compiled(state, batch, key)  # warm-up
    jax.block_until_ready(m)
    times, cpu_times, peaks = [], [], []
    for _ in range(FLAGS.steps):
        t, c = time.perf_counter(), time.process_time()
        state, m = compiled(state, batch, key)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
        peaks.append(peak_now(5) * 1e9)
    step_s = float(np.median(times))
    peak = float(np.median(peaks))
    mfus = [flops / t / p for t, p in zip(times, peaks)]
    best_peak = peak_now(10) * 1e9
    mem = jax.devices()[0].memory_stats() or {}
    peak_bytes = mem.get("peak_bytes_in_use")
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"config: {config.experiment}  model: {mc.name} {num_params(state.params) / 1e6:.2f}M params  "
          f"batch {b}  devices {jax.device_count()} ({jax.devices()[0].platform})")
    print(f"kernels          {kernels}")
    print(f"compile_s        {compile_s:.1f}")
    print(f"step_s (median)  {step_s:.4f}   (min {min(times):.4f}, max {max(times):.4f}, n={len(times)})")
    print(f"cpu_s_per_step   {float(np.median(cpu_times)):.4f}  (process CPU time, all threads; "
          f"{os.cpu_count()} cores)")
    print(f"images_per_s     {b / step_s:.1f}")
    print(f"flops_per_step   {flops:.3e}  (XLA cost analysis, reference ops)")
    print(f"matmul_peak      {peak / 1e9:.1f} GFLOP/s  (median over the steps of the best of 5 float32 "
          f"{FLAGS.matmul_size}^3 matmuls after each; range {min(peaks) / 1e9:.0f}-{max(peaks) / 1e9:.0f})")
    print(f"mfu              {float(np.median(mfus)):.3f}  (median over steps of step FLOP/s / peak next to it; "
          f"range {min(mfus):.3f}-{max(mfus):.3f})")
    print(f"matmul_peak_best {best_peak / 1e9:.1f} GFLOP/s  (best of 10, measured once after the steps)")
    print(f"mfu_vs_best      {flops / step_s / best_peak:.3f}  (median step against that best peak)")
    if peak_bytes is not None:
        print(f"peak_device_mem  {peak_bytes / 2**20:.1f} MiB")
    print(f"peak_host_rss    {rss_mib:.0f} MiB")
    print(f"est_time_for_num_steps ({config.training.num_steps}) {config.training.num_steps * step_s / 60:.1f} min")


if __name__ == "__main__":
    app.run(main)
