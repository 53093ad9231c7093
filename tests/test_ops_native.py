"""diffusion_jax.ops.native: how the kernels' build fails (the numerics live in the per-op tests)."""

from __future__ import annotations

import jax
import pytest

from diffusion_jax.ops import native


def test_native_missing_onednn_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_prefixes", lambda: [tmp_path])
    with pytest.raises(RuntimeError, match=r"pip install 'diffusion_jax\[cpu\]'"):
        native._find_onednn()


def test_native_failed_compile_leaves_no_file_in_cache(monkeypatch, tmp_path):
    if jax.default_backend() != "cpu" or not native.available():
        pytest.skip("needs the CPU build environment of the native kernels")
    monkeypatch.setenv(native.CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(RuntimeError, match="compiling cpu_kernels.cc failed"):
        native._build()
    assert list(tmp_path.iterdir()) == []
