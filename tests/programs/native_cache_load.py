"""Loads the native kernels from $DIFFUSION_JAX_CACHE with a stand-in compiler that writes the
library file argv[1] (no real build, no handlers to register; argv[2] stands in for oneDNN's
folder), then prints "available=<bool> builds=<n> reason=<reason>". Run by
tests/test_ops_native_cache.py in a fresh process: loading a truncated library by mistake
kills the process (SIGBUS), which must not take the test run with it."""

import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from diffusion_jax.ops import native  # noqa: E402

payload = pathlib.Path(sys.argv[1]).read_bytes()
builds = []


def compile_(cmd, out):
    builds.append(out)
    pathlib.Path(out).write_bytes(payload)


native._compile = compile_  # this program's own module state only
native._TARGETS = {}
native._find_onednn = lambda: (pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[2]))
print(f"available={native.available()} builds={len(builds)} reason={native.reason()}", flush=True)
