"""diffusion_jax.ops dispatch: the mode table, DIFFUSION_JAX_OPS, prepare() and forced()."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import pytest

from diffusion_jax import ops
from diffusion_jax.ops import native


def test_dispatch_env_switch(monkeypatch):
    calls = []
    monkeypatch.setattr(ops, "_prepared", None)  # before prepare() each trace reads the variable

    def spy(op, kind):
        impl = ops.IMPLEMENTATIONS[op][kind]

        def wrapped(*args, **kwargs):
            calls.append(f"{op}_{kind}")
            return impl(*args, **kwargs)

        monkeypatch.setitem(ops.IMPLEMENTATIONS[op], kind, wrapped)

    for kind in ("fast", "native", "reference"):
        for op in ("conv2d", "group_norm"):
            spy(op, kind)
    x = jnp.ones((1, 4, 4, 2))
    k = jnp.ones((3, 3, 2, 2))
    s, b = jnp.ones(2), jnp.zeros(2)

    def net():
        calls.clear()
        ops.group_norm(ops.conv2d(x, k), s, b, num_groups=2)
        return tuple(calls)

    monkeypatch.setenv(ops.ENV_VAR, "reference")
    assert net() == ("conv2d_reference", "group_norm_reference")
    monkeypatch.setenv(ops.ENV_VAR, "fast")
    assert net() == ("conv2d_fast", "group_norm_fast")
    monkeypatch.setenv(ops.ENV_VAR, "native")
    assert net() == ("conv2d_native", "group_norm_native")
    monkeypatch.setenv(ops.ENV_VAR, "auto")
    if jax.default_backend() != "cpu":
        want = "reference"
    elif jax.device_count() == 1 and native.available():
        want = "native"
    else:
        want = "fast"
    assert net() == (f"conv2d_{want}", f"group_norm_{want}")
    monkeypatch.setenv(ops.ENV_VAR, "turbo")
    with pytest.raises(ValueError, match=ops.ENV_VAR):
        ops.conv2d(x, k)


def test_prepare_chooses_once_and_a_trace_never_builds(monkeypatch):
    monkeypatch.setattr(ops, "_prepared", None)
    monkeypatch.setenv(ops.ENV_VAR, "native")
    builds = []
    real = native.available
    monkeypatch.setattr(native, "available", lambda: builds.append(1) or real())
    jax.make_jaxpr(lambda x: ops.gelu(x))(jnp.ones(3))  # unprepared trace: reads the variable, builds nothing
    assert builds == []
    monkeypatch.setenv(ops.ENV_VAR, "fast")
    assert ops.prepare() == "fast"
    monkeypatch.setenv(ops.ENV_VAR, "reference")  # read once: prepare() fixed the mode
    assert ops.selected() == "fast"
    with ops.forced("reference"):
        assert ops.selected() == "reference"
    assert ops.prepare("reference") == "reference" == ops.selected()


def test_forced_sets_and_restores_the_mode(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    with ops.forced("reference"):
        assert ops.selected() == "reference"
        with ops.forced("fast"):
            assert ops.selected() == "fast"
        assert ops.selected() == "reference"
    assert ops.ENV_VAR not in os.environ
    with pytest.raises(ValueError, match=ops.ENV_VAR):
        with ops.forced("turbo"):
            pass


def test_dispatch_covers_the_transformer_ops(monkeypatch):
    x = jnp.ones((1, 4, 6))
    monkeypatch.setattr(ops, "_prepared", None)  # before prepare() each trace reads the variable
    for mode in ("reference", "fast", "native"):
        monkeypatch.setenv(ops.ENV_VAR, mode)
        for name, call in [
            ("dense", lambda: ops.dense(x, jnp.ones((6, 2)))),
            ("self_attention", lambda: ops.self_attention(x, 1)),
            ("adaptive_layer_norm", lambda: ops.adaptive_layer_norm(x, jnp.ones((1, 6)), jnp.ones((1, 6)))),
            ("gelu", lambda: ops.gelu(x)),
            ("gated_residual", lambda: ops.gated_residual(x, jnp.ones((1, 6)), x)),
        ]:
            seen = []
            impl = ops.IMPLEMENTATIONS[name][mode]
            monkeypatch.setitem(ops.IMPLEMENTATIONS[name], mode, lambda *a, _i=impl, **k: seen.append(1) or _i(*a, **k))
            call()
            assert seen, (name, mode)
