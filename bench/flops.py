"""FLOP counts for the benchmarks' utilisation figures.

XLA's cost analysis does not count the native kernels' custom calls
(`diffusion_jax.ops.native`), so every benchmark credits each ops mode with
the FLOPs of the same computation traced with the reference ops.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from diffusion_jax import ops


def flops_of(stage: Any) -> float:
    """The "flops" entry of a jax Lowered or Compiled stage's cost analysis (NaN when absent)."""
    cost = stage.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned a list of dicts
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def reference_flops(lower: Callable[[], Any]) -> float:
    """FLOPs of `lower()` (which jits a *fresh* function and lowers it) under the reference ops.

    The function must be a new object: JAX's trace cache would otherwise hand
    back a trace made earlier with another ops mode.
    """
    with ops.forced("reference"):
        return flops_of(lower())


def matmul_timer(n: int = 2048) -> Callable[[int], float]:
    """A function reps -> the best of `reps` float32 [n, n] @ [n, n] XLA matmuls, in GFLOP/s.

    2 n^3 FLOPs each; the operands are made and the matmul compiled once, here,
    so a benchmark can sample the peak between its own timed steps and divide
    each step by the peak measured under the same load.
    """
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()

    def best_gflops(reps: int) -> float:
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            mm(a, b).block_until_ready()
            best = min(best, time.perf_counter() - t0)
        return 2 * n**3 / best / 1e9

    return best_gflops


def matmul_peak_gflops(n: int = 2048, reps: int = 10) -> float:
    """Best of `reps` float32 [n, n] @ [n, n] matmuls by XLA, in GFLOP/s (2 n^3 FLOPs each).

    The machine's practical peak: the best run, not the median, so that load
    from other processes can only lower a utilisation divided by it.
    """
    return matmul_timer(n)(reps)
