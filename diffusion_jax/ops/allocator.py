"""Host allocator setting that keeps XLA:CPU from page-faulting its buffers every step.

XLA:CPU allocates each executable's temporary buffer (gigabytes for the default
6.47M-parameter UNet's train step at batch 128) with malloc on
one of its worker threads and frees it when the step ends. glibc serves such
a block with a fresh mmap from a per-thread arena and unmaps it on free, so
every step page-faults the whole buffer back in: 649k minor faults per step
(0 with this setting), and 20.4 instead of 25.6 img/s, on this project's
2-core machine (`python bench/compare_torch.py --batch 128 --modes native
--no-torch --malloc default|keep`, 2026-11-26).

`keep_freed_memory()` changes three glibc malloc parameters (mallopt(3)) so
that freed memory is reused instead of returned to the kernel:

* ``M_ARENA_MAX = 1``: threads share the main arena (the per-thread arenas
  fall back to mmap for blocks above their 64 MB heap size whatever the
  other settings are);
* ``M_MMAP_MAX = 0``: large blocks come from the heap, not from mmap;
* ``M_TRIM_THRESHOLD = -1`` (the maximum): the heap's top is never trimmed.

The process then keeps its peak heap for its lifetime, as tcmalloc or
jemalloc would. It is process-wide, so `launch.py` and the benchmarks call it
at start-up, before JAX starts its threads (threads keep the arena they got
on their first allocation); library code never calls it. Set
``DIFFUSION_JAX_MALLOC=default`` to leave the allocator alone.

It applies only when JAX will run on the CPU: GPU/TPU processes keep their
buffers in device memory and glibc's defaults. As it runs before JAX picks
its backend, "CPU" means ``JAX_PLATFORMS`` is ``cpu``, or it is unset and no
accelerator plugin (a ``jax_plugins`` entry point or package, ``libtpu``) is
installed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import platform

ENV_VAR = "DIFFUSION_JAX_MALLOC"
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def cpu_backend() -> bool:
    """Whether JAX will run on the CPU, decided without starting JAX (see module docstring)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0] == "cpu"
    if importlib.metadata.entry_points(group="jax_plugins"):
        return False
    return not any(importlib.util.find_spec(m) for m in ("jax_plugins", "libtpu"))


def keep_freed_memory() -> bool:
    """Tunes glibc malloc to keep freed memory (see module docstring); True if applied.

    A no-op returning False on non-glibc systems, when JAX will use an
    accelerator (`cpu_backend`) or with DIFFUSION_JAX_MALLOC=default.
    """
    if os.environ.get(ENV_VAR, "keep").strip().lower() == "default":
        return False
    if not cpu_backend():
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = libc.mallopt(_M_ARENA_MAX, 1) == 1
    ok &= libc.mallopt(_M_MMAP_MAX, 0) == 1
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
    return bool(ok)
