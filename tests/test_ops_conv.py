"""diffusion_jax.ops.conv: fast and native conv2d == the reference == a float64 oracle.

The pure-XLA "fast" custom VJP and the "native" XLA FFI custom calls (oneDNN),
forward and the gradients wrt x and kernel, are compared with (a)
`lax.conv_general_dilated` and its autodiff gradients, to 1e-5 relative in
float32, and (b) an independent float64 numpy oracle (direct sums).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import ops
from diffusion_jax.ops import conv as conv_module
from diffusion_jax.ops import native
from ops_support import RTOL32, full_float32_precision, native_impl, rel_err  # noqa: F401 (an autouse fixture)

_GEMM_RULE = conv_module.use_gemm_weight_grad  # the real rule, before the fixture below replaces it


CONV_IMPLS = ["conv2d_fast", "conv2d_native"]


# ----------------------------------------------------------------------------
# float64 numpy oracle
# ----------------------------------------------------------------------------


def _np_pads(h, w, k, s, padding):
    if padding == "SAME":
        pads = []
        for size, kk, ss in ((h, k[0], s[0]), (w, k[1], s[1])):
            out = -(-size // ss)
            total = max((out - 1) * ss + kk - size, 0)
            pads.append((total // 2, total - total // 2))
        return pads
    if padding == "VALID":
        return [(0, 0), (0, 0)]
    return [tuple(p) for p in padding]


def np_conv_and_grads(x, kernel, g, strides, padding):
    """y = conv(x, kernel) and, for the loss sum(y * g), dL/dx and dL/dkernel (float64)."""
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    g = np.asarray(g, np.float64)
    n, h, w, c = x.shape
    kh, kw, _, o = kernel.shape
    sh, sw = strides
    (pt, pb), (pl, pr) = _np_pads(h, w, (kh, kw), strides, padding)
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho = (h + pt + pb - kh) // sh + 1
    wo = (w + pl + pr - kw) // sw + 1
    y = np.zeros((n, ho, wo, o))
    dxp = np.zeros_like(xp)
    dk = np.zeros_like(kernel)
    for a, b in itertools.product(range(kh), range(kw)):
        win = xp[:, a : a + sh * (ho - 1) + 1 : sh, b : b + sw * (wo - 1) + 1 : sw, :]
        y += win @ kernel[a, b]
        dk[a, b] = np.einsum("nijc,nijo->co", win, g)
        dxp[:, a : a + sh * (ho - 1) + 1 : sh, b : b + sw * (wo - 1) + 1 : sw, :] += g @ kernel[a, b].T
    dx = dxp[:, pt : pt + h, pl : pl + w, :]
    return y, dx, dk


# ----------------------------------------------------------------------------
# conv2d
# ----------------------------------------------------------------------------

CONV_CASES = [
    # (H, W, C, O, k, strides, padding)
    (7, 7, 3, 5, 3, (1, 1), "SAME"),
    (7, 7, 3, 5, 3, (2, 2), "SAME"),
    (8, 8, 4, 3, 3, (2, 2), ((1, 1), (1, 1))),
    (7, 7, 4, 6, 3, (1, 1), ((2, 0), (0, 1))),
    (7, 7, 4, 6, 1, (1, 1), "SAME"),
    (6, 5, 2, 3, 3, (1, 2), "VALID"),
    # UNet-like shapes, where oneDNN picks its blocked (brgemm) kernels.
    (14, 14, 64, 64, 3, (1, 1), "SAME"),
    (14, 14, 1, 32, 3, (1, 1), "SAME"),
    (14, 14, 32, 1, 3, (1, 1), "SAME"),
    (14, 14, 32, 64, 3, (2, 2), "SAME"),
    (7, 7, 96, 64, 1, (1, 1), "SAME"),
]


@pytest.fixture(autouse=True)
def _gemm_weight_grad_everywhere(monkeypatch):
    """Routes every test shape through the per-tap GEMM weight gradient (normally large maps only)."""
    monkeypatch.setattr(conv_module, "use_gemm_weight_grad", lambda *a: True)


def test_use_gemm_weight_grad_rule():
    rule = _GEMM_RULE
    assert rule((8, 28, 28, 128), (3, 3, 128, 128), (1, 1))
    assert rule((8, 14, 14, 128), (3, 3, 256, 128), (1, 1))
    assert rule((8, 7, 7, 4), (1, 1, 4, 4), (1, 1))
    assert not rule((8, 28, 28, 64), (3, 3, 1, 64), (1, 1))  # conv_in
    assert not rule((8, 14, 14, 64), (3, 3, 64, 64), (2, 2))  # strided
    assert not rule((8, 7, 7, 128), (3, 3, 128, 128), (1, 1))  # small map


def _conv_inputs(case, dtype=jnp.float32, seed=0):
    h, w, c, o, k, strides, padding = case
    kx, kk, kg = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (2, h, w, c), jnp.float32)
    kernel = jax.random.normal(kk, (k, k, c, o), jnp.float32) / np.sqrt(k * k * c)
    y_shape = jax.eval_shape(
        lambda: ops.conv2d_reference(x, kernel, strides=strides, padding=padding)
    ).shape
    g = jax.random.normal(kg, y_shape, jnp.float32)
    return x.astype(dtype), kernel.astype(dtype), g.astype(dtype), strides, padding


def _conv_value_and_grads(impl, x, kernel, g, strides, padding):
    def loss(x, kernel):
        y = impl(x, kernel, strides=strides, padding=padding)
        return jnp.sum((y * g).astype(jnp.float32)), y

    (_, y), (dx, dk) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, kernel)
    return y, dx, dk


@pytest.mark.parametrize("impl", CONV_IMPLS)
@pytest.mark.parametrize("case", CONV_CASES, ids=[str(c[2:]) + str(c[:2]) for c in CONV_CASES])
def test_conv2d_matches_reference_and_float64(case, impl):
    impl = native_impl(impl) if impl.endswith("native") else getattr(ops, impl)
    x, kernel, g, strides, padding = _conv_inputs(case)
    fast = jax.jit(lambda x, k, g: _conv_value_and_grads(impl, x, k, g, strides, padding))
    ref = jax.jit(lambda x, k, g: _conv_value_and_grads(ops.conv2d_reference, x, k, g, strides, padding))
    got, want = fast(x, kernel, g), ref(x, kernel, g)
    oracle = np_conv_and_grads(x, kernel, g, strides, padding)
    for name, a, b, c in zip(("y", "dx", "dkernel"), got, want, oracle):
        assert a.shape == b.shape == c.shape, name
        assert rel_err(a, b) < RTOL32, (name, rel_err(a, b))
        assert rel_err(a, c) < RTOL32, (name, rel_err(a, c))


@pytest.mark.parametrize("impl", CONV_IMPLS)
@pytest.mark.parametrize("case", [CONV_CASES[2], CONV_CASES[4]])
def test_conv2d_bfloat16(case, impl):
    # bfloat16 is not a native dtype: conv2d_native hands it to conv2d_fast.
    impl = getattr(ops, impl)
    x, kernel, g, strides, padding = _conv_inputs(case, jnp.bfloat16, seed=1)
    got = jax.jit(lambda x, k, g: _conv_value_and_grads(impl, x, k, g, strides, padding))(
        x, kernel, g
    )
    want = _conv_value_and_grads(ops.conv2d_reference, x, kernel, g, strides, padding)
    oracle = np_conv_and_grads(x, kernel, g, strides, padding)
    for name, a, b, c in zip(("y", "dx", "dkernel"), got, want, oracle):
        assert a.dtype == jnp.bfloat16, name
        assert rel_err(a, b) < 2e-2, (name, rel_err(a, b))
        assert rel_err(a, c) < 2e-2, (name, rel_err(a, c))


@pytest.mark.parametrize("impl", CONV_IMPLS)
def test_conv2d_under_vmap(impl):
    impl = native_impl(impl) if impl.endswith("native") else getattr(ops, impl)
    # vmap over a leading axis of x and per-example kernels, gradients included.
    case = CONV_CASES[1]
    xs, ks, gs = [], [], []
    for seed in range(3):
        x, k, g, strides, padding = _conv_inputs(case, seed=seed)
        xs.append(x), ks.append(k), gs.append(g)
    x, k, g = jnp.stack(xs), jnp.stack(ks), jnp.stack(gs)

    def per_example(impl):
        return jax.jit(jax.vmap(lambda x, k, g: _conv_value_and_grads(impl, x, k, g, strides, padding)))

    got = per_example(impl)(x, k, g)
    want = per_example(ops.conv2d_reference)(x, k, g)
    for i in range(3):
        oracle = np_conv_and_grads(x[i], k[i], g[i], strides, padding)
        for a, c in zip(got, oracle):
            assert rel_err(a[i], c) < RTOL32
    for a, b in zip(got, want):
        assert rel_err(a, b) < RTOL32


def test_conv2d_fast_with_xla_weight_grad(monkeypatch):
    # The branch taken for shapes where the per-tap GEMMs do not pay (conv_in, strided, small maps).
    monkeypatch.setattr(conv_module, "use_gemm_weight_grad", lambda *a: False)
    x, kernel, g, strides, padding = _conv_inputs(CONV_CASES[2])
    got = jax.jit(lambda x, k, g: _conv_value_and_grads(ops.conv2d_fast, x, k, g, strides, padding))(x, kernel, g)
    oracle = np_conv_and_grads(x, kernel, g, strides, padding)
    for a, c in zip(got, oracle):
        assert rel_err(a, c) < RTOL32


# ----------------------------------------------------------------------------
# native kernels: fallback and the traced program
# ----------------------------------------------------------------------------


def test_native_falls_back_to_fast_when_unavailable(monkeypatch):
    monkeypatch.setattr(native, "loaded", lambda: False)
    x, kernel, g, strides, padding = _conv_inputs(CONV_CASES[0])
    got = _conv_value_and_grads(ops.conv2d_native, x, kernel, g, strides, padding)
    oracle = np_conv_and_grads(x, kernel, g, strides, padding)
    for a, c in zip(got, oracle):
        assert rel_err(a, c) < RTOL32
    jaxpr = str(jax.make_jaxpr(lambda x, k: ops.conv2d_native(x, k))(x, kernel))
    assert "dj_conv2d" not in jaxpr


def test_native_kernels_are_in_the_traced_program():
    impl = native_impl("conv2d_native")
    x, kernel, g, strides, padding = _conv_inputs(CONV_CASES[0])
    text = jax.jit(lambda x, k, g: _conv_value_and_grads(impl, x, k, g, strides, padding)).lower(
        x, kernel, g
    ).as_text()
    for target in ("dj_conv2d_forward", "dj_conv2d_backward_data", "dj_conv2d_backward_weights"):
        assert target in text
