"""diffusion_jax.ops.allocator: the glibc malloc setting, applied in a fresh process and only for CPU runs."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from diffusion_jax.ops import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = os.path.join(ROOT, "tests", "programs", "keep_freed_memory.py")


def _run(**env) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT, **env)
    return subprocess.run([sys.executable, PROGRAM], env=env, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("setting, want", [("keep", "True"), ("default", "False")])
def test_keep_freed_memory_in_a_fresh_process(setting, want):
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt(3) is glibc's")
    assert _run(DIFFUSION_JAX_MALLOC=setting, JAX_PLATFORMS="cpu") == want


def test_left_alone_when_jax_will_use_an_accelerator(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert not allocator.cpu_backend()
    assert allocator.keep_freed_memory() is False  # returns before touching malloc
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert allocator.cpu_backend()
