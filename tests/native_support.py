"""Shared by the ops tests: use the native kernels, or skip where this host cannot build them."""

from __future__ import annotations

import os
import shutil

import jax
import pytest

from diffusion_jax.ops import native


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
