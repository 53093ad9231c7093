"""diffusion_jax.ops.norm (GroupNorm): fast and native == the reference == float64 oracles.

The pure-XLA "fast" custom VJP and the "native" C++ custom calls, forward and
the gradients wrt x, scale and bias, are compared with the reference GroupNorm
and its autodiff gradients, to 1e-5 relative in float32, and with a float64
numpy oracle (central finite differences for the gradients).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import ops
from diffusion_jax.ops import native
from ops_support import RTOL32, full_float32_precision, native_impl, rel_err  # noqa: F401 (an autouse fixture)


GN_IMPLS = ["group_norm_fast", "group_norm_native"]


def np_group_norm(x, scale, bias, num_groups, eps):
    x = np.asarray(x, np.float64)
    n, h, w, c = x.shape
    xg = x.reshape(n, h, w, num_groups, c // num_groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    y = ((xg - mean) / np.sqrt(var + eps)).reshape(n, h, w, c)
    return y * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)


# ----------------------------------------------------------------------------
# group_norm
# ----------------------------------------------------------------------------

GN_CASES = [
    # (N, H, W, C, groups, offset)  offset: a large mean tests the variance's cancellation
    (2, 7, 7, 8, 4, 0.0),
    (3, 5, 4, 6, 3, 3.0),
    (2, 1, 1, 16, 1, 0.5),  # LayerNorm as used by DiT: [tokens, 1, 1, D]
    (2, 4, 4, 64, 32, 0.0),
]


def _gn_inputs(case, dtype=jnp.float32, seed=0):
    n, h, w, c, groups, offset = case
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], (n, h, w, c)) * 2.0 + offset
    scale = 1.0 + 0.5 * jax.random.normal(k[1], (c,))
    bias = 0.5 * jax.random.normal(k[2], (c,))
    g = jax.random.normal(k[3], (n, h, w, c))
    return x.astype(dtype), scale, bias, g.astype(dtype), groups


def _gn_value_and_grads(impl, x, scale, bias, g, groups, eps=1e-5):
    def loss(x, scale, bias):
        y = impl(x, scale, bias, num_groups=groups, epsilon=eps)
        return jnp.sum((y * g).astype(jnp.float32)), y

    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)
    return (y, *grads)


def _np_gn_grads_fd(x, scale, bias, g, groups, eps, directions):
    """Central finite differences (float64) of L = sum(np_group_norm * g) along directions."""
    out = []
    for which, v in directions:
        args = [np.asarray(x, np.float64), np.asarray(scale, np.float64), np.asarray(bias, np.float64)]
        h = 1e-5
        plus = [a.copy() for a in args]
        minus = [a.copy() for a in args]
        plus[which] += h * v
        minus[which] -= h * v
        lp = np.sum(np_group_norm(*plus, groups, eps) * g)
        lm = np.sum(np_group_norm(*minus, groups, eps) * g)
        out.append((lp - lm) / (2 * h))
    return out


@pytest.mark.parametrize("impl", GN_IMPLS)
@pytest.mark.parametrize("case", GN_CASES, ids=[str(c) for c in GN_CASES])
def test_group_norm_matches_reference_and_float64(case, impl):
    impl = native_impl(impl) if impl.endswith("native") else getattr(ops, impl)
    x, scale, bias, g, groups = _gn_inputs(case)
    got = jax.jit(lambda *a: _gn_value_and_grads(impl, *a, groups))(x, scale, bias, g)
    want = jax.jit(lambda *a: _gn_value_and_grads(ops.group_norm_reference, *a, groups))(x, scale, bias, g)
    for name, a, b in zip(("y", "dx", "dscale", "dbias"), got, want):
        assert a.shape == b.shape, name
        assert rel_err(a, b) < RTOL32, (name, rel_err(a, b))
    # Independent float64 oracle: forward values, and directional derivatives.
    assert rel_err(got[0], np_group_norm(x, scale, bias, groups, 1e-5)) < RTOL32
    rng = np.random.default_rng(0)
    dirs = [(0, rng.standard_normal(x.shape)), (1, rng.standard_normal(scale.shape)),
            (2, rng.standard_normal(bias.shape))]
    fd = _np_gn_grads_fd(x, scale, bias, np.asarray(g, np.float64), groups, 1e-5, dirs)
    for (which, v), want_dd in zip(dirs, fd):
        got_dd = float(np.sum(np.asarray(got[1 + which], np.float64) * v))
        assert abs(got_dd - want_dd) <= 1e-4 * (1.0 + abs(want_dd)), (which, got_dd, want_dd)


@pytest.mark.parametrize("impl", GN_IMPLS)
def test_group_norm_bfloat16(impl):
    impl = getattr(ops, impl)
    x, scale, bias, g, groups = _gn_inputs(GN_CASES[0], jnp.bfloat16, seed=2)
    got = jax.jit(lambda *a: _gn_value_and_grads(impl, *a, groups))(x, scale, bias, g)
    want = _gn_value_and_grads(ops.group_norm_reference, x, scale, bias, g, groups)
    assert got[0].dtype == got[1].dtype == jnp.bfloat16
    assert got[2].dtype == got[3].dtype == jnp.float32
    for name, a, b in zip(("y", "dx", "dscale", "dbias"), got, want):
        assert rel_err(a, b) < 2e-2, (name, rel_err(a, b))


@pytest.mark.parametrize("impl", GN_IMPLS)
def test_group_norm_under_vmap(impl):
    impl = native_impl(impl) if impl.endswith("native") else getattr(ops, impl)
    x, scale, bias, g, groups = _gn_inputs(GN_CASES[1], seed=3)
    xs = jnp.stack([x, 2.0 * x + 1.0])
    gs = jnp.stack([g, -g])

    def batched(impl):
        return jax.jit(jax.vmap(lambda x, g: _gn_value_and_grads(impl, x, scale, bias, g, groups)))

    got, want = batched(impl)(xs, gs), batched(ops.group_norm_reference)(xs, gs)
    for a, b in zip(got, want):
        assert rel_err(a, b) < RTOL32


def test_group_norm_rejects_bad_groups():
    x = jnp.zeros((1, 2, 2, 6))
    for impl in (ops.group_norm_fast, ops.group_norm_native, ops.group_norm_reference, ops.group_norm):
        with pytest.raises(ValueError, match="num_groups"):
            impl(x, jnp.ones(6), jnp.zeros(6), num_groups=4)


def test_group_norm_native_falls_back_when_unavailable(monkeypatch):
    monkeypatch.setattr(native, "loaded", lambda: False)
    xs, scale, bias, _, groups = _gn_inputs(GN_CASES[0])
    jaxpr = str(jax.make_jaxpr(lambda x: ops.group_norm_native(x, scale, bias, num_groups=groups))(xs))
    assert "dj_group_norm" not in jaxpr
