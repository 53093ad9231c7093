"""Shared by the ops tests: float32 precision, relative error, and the native kernels or a skip."""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import pytest

from diffusion_jax import ops
from diffusion_jax.ops import native

RTOL32 = 1e-5


def require_native() -> None:
    """Skips off XLA:CPU, without a C++ compiler or without oneDNN; otherwise the build must work."""
    if jax.default_backend() != "cpu":
        pytest.skip("native kernels are XLA:CPU custom calls")
    if not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")):
        pytest.skip("no C++ compiler (g++) to build the native kernels")
    try:
        native._find_onednn()
    except RuntimeError as e:
        pytest.skip(str(e))
    assert native.available(), native.reason()  # CI installs the "cpu" extra: a failed build is a bug


def native_impl(name: str):
    """`ops.<name>`, after `require_native()` for the native implementations."""
    if name.endswith("_native"):
        require_native()
    return getattr(ops, name)


@pytest.fixture(autouse=True)
def full_float32_precision():
    """GPUs run float32 convolutions and matmuls in TF32 by default; 1e-5 needs full float32."""
    with jax.default_matmul_precision("highest"):
        yield


def rel_err(a, b) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
