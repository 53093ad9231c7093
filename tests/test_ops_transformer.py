"""Tests for the transformer-side ops: dense, attention, adaptive LayerNorm, GELU, gated residual.

Each native implementation (XLA:CPU custom calls, `cpu_kernels.cc`) and the
reference one are checked against independent float64 numpy computations:
the forward formula directly, and every gradient through central finite
differences of the float64 formula along random directions. Float32 results
must agree to 1e-5 relative.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import models, ops
from ops_support import RTOL32, full_float32_precision, native_impl, rel_err, require_native  # noqa: F401 (an autouse fixture)


def _check(impl, f64, args, seed=0, directions=2, h=1e-6):
    """impl's value and gradients (of sum(out * g)) against the float64 formula `f64`."""
    rng = np.random.default_rng(seed)
    args32 = [jnp.asarray(a, jnp.float32) for a in args]
    out = impl(*args32)
    want = f64(*args)
    assert out.shape == want.shape
    assert rel_err(out, want) < RTOL32, rel_err(out, want)
    g = rng.standard_normal(want.shape)
    grads = jax.grad(lambda *a: jnp.sum(impl(*a) * jnp.asarray(g, jnp.float32)), range(len(args)))(*args32)
    for i, grad in enumerate(grads):
        grad = np.asarray(grad, np.float64)
        for _ in range(directions):
            u = rng.standard_normal(np.shape(args[i]))
            plus = [a + h * u if j == i else a for j, a in enumerate(args)]
            minus = [a - h * u if j == i else a for j, a in enumerate(args)]
            fd = (np.sum(f64(*plus) * g) - np.sum(f64(*minus) * g)) / (2 * h)
            err = abs(np.sum(grad * u) - fd) / (np.linalg.norm(grad) * np.linalg.norm(u))
            assert err < RTOL32, (i, err)


# ---------------------------------------------------------------------------- float64 formulas


def np_dense(x, w, b):
    return x @ w + b


def np_self_attention(qkv, heads):
    b, n, c = qkv.shape
    q, k, v = (a.reshape(b, n, heads, -1) for a in np.split(qkv, 3, axis=-1))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, n, c // 3)


def np_adaln(x, shift, scale, eps=1e-6):
    xh = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    return xh * (1 + scale[:, None, :]) + shift[:, None, :]


def np_gelu(x):
    """x/2 (1 + tanh(u)), u = sqrt(2/pi)(x + 0.044715 x^3), written as x sigmoid(2u): the same
    number without 1 + tanh(u) cancelling to 0 for large negative x."""
    with np.errstate(over="ignore"):
        return x / (1 + np.exp(-2 * np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


# ---------------------------------------------------------------------------- dense


@pytest.mark.parametrize("impl", ["dense_reference", "dense_native"])
@pytest.mark.parametrize("x_shape, features", [((5, 7), 3), ((2, 9, 16), 24), ((3, 49, 128), 384)])
def test_dense_matches_float64(impl, x_shape, features):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal((x_shape[-1], features)) / np.sqrt(x_shape[-1])
    b = rng.standard_normal(features)
    _check(native_impl(impl), np_dense, [x, w, b])


def test_dense_native_without_bias_and_in_bfloat16():
    impl = native_impl("dense_native")
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((6, 8)), rng.standard_normal((8, 5))
    assert rel_err(impl(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)), x @ w) < RTOL32
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    assert "dj_" not in str(jax.make_jaxpr(impl)(xb, wb))  # falls back to XLA
    assert impl(xb, wb).dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(impl(xb, wb), np.float32), x @ w, rtol=0.05, atol=0.1)


def test_dense_rejects_mismatched_kernel():
    for impl in (ops.dense_reference, ops.dense_native, ops.dense):
        with pytest.raises(ValueError, match="in_features"):
            impl(jnp.ones((2, 3)), jnp.ones((4, 5)))


# ---------------------------------------------------------------------------- attention


ATTENTION_CASES = [
    ((2, 17, 3 * 2 * 8), 2),  # odd length, 2 heads of 8
    ((3, 49, 3 * 64), 1),  # the UNet's 7x7 attention, one head
    ((2, 196, 3 * 4 * 64), 4),  # the DiT's 14x14 tokens, 4 heads of 64
]


@pytest.mark.parametrize("impl", ["self_attention_reference", "self_attention_native"])
@pytest.mark.parametrize("shape, heads", ATTENTION_CASES, ids=[str(c) for c in ATTENTION_CASES])
def test_self_attention_matches_float64(impl, shape, heads):
    qkv = np.random.default_rng(3).standard_normal(shape) * 1.5
    fn = native_impl(impl)
    _check(lambda a: fn(a, heads), lambda a: np_self_attention(a, heads), [qkv])


@pytest.mark.parametrize("impl", ["attention_reference", "attention_native"])
def test_attention_over_separate_q_k_v(impl):
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((2, 11, 3, 8)) for _ in range(3))

    def f64(q, k, v):
        b, n, h, d = q.shape
        return np_self_attention(np.concatenate([a.reshape(b, n, h * d) for a in (q, k, v)], -1), h).reshape(
            b, n, h, d
        )

    _check(native_impl(impl), f64, [q, k, v])


def test_cross_attention_lengths_take_the_reference():
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.standard_normal((2, 5, 2, 4)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((2, 9, 2, 4)), jnp.float32)
    got = ops.attention_native(q, kv, kv)
    np.testing.assert_allclose(got, ops.attention_reference(q, kv, kv), rtol=1e-6, atol=1e-6)


def test_self_attention_rejects_bad_packing():
    for impl in (ops.self_attention_reference, ops.self_attention_native):
        with pytest.raises(ValueError, match="num_heads"):
            impl(jnp.ones((1, 4, 30)), 4)


# ---------------------------------------------------------------------------- adaptive LayerNorm


@pytest.mark.parametrize(
    "impl", ["adaptive_layer_norm_reference", "adaptive_layer_norm_fast", "adaptive_layer_norm_native"]
)
@pytest.mark.parametrize("shape", [(3, 5, 16), (2, 196, 256)])
def test_adaptive_layer_norm_matches_float64(impl, shape):
    rng = np.random.default_rng(6)
    x = rng.standard_normal(shape) * 2 + 3  # an offset mean: the variance must not cancel
    shift, scale = rng.standard_normal((2, shape[0], shape[2]))
    _check(native_impl(impl), np_adaln, [x, shift, scale])


def test_adaptive_layer_norm_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shift, scale"):
        ops.adaptive_layer_norm(jnp.ones((2, 3, 4)), jnp.ones((2, 3)), jnp.ones((2, 3)))


# ---------------------------------------------------------------------------- GELU


@pytest.mark.parametrize("impl", ["gelu_reference", "gelu_native"])
def test_gelu_matches_float64(impl):
    x = np.concatenate([np.linspace(-6, 6, 1001), np.random.default_rng(7).standard_normal(77) * 3])
    _check(native_impl(impl), np_gelu, [x.reshape(2, -1)])


def test_gelu_native_saturates_like_the_formula():
    x = np.array([-80.0, -20.0, -9.0, 9.0, 20.0, 80.0])
    np.testing.assert_allclose(native_impl("gelu_native")(jnp.asarray(x, jnp.float32)), np_gelu(x), rtol=1e-6, atol=1e-30)


# ---------------------------------------------------------------------------- gated residual


def np_gated_residual(x, gate, h):
    return x + gate[:, None, :] * h


@pytest.mark.parametrize("impl", ["gated_residual_reference", "gated_residual_native"])
@pytest.mark.parametrize("shape", [(3, 5, 17), (2, 196, 256)])
def test_gated_residual_matches_float64(impl, shape):
    rng = np.random.default_rng(9)
    x, h = rng.standard_normal((2, *shape))
    gate = rng.standard_normal((shape[0], shape[2]))
    _check(native_impl(impl), np_gated_residual, [x, gate, h])


def test_gated_residual_native_gate_gradient_sums_over_tokens():
    # dgate[b] = sum_t dy[b, t] h[b, t]: with dy = 1 and h = t + 1 it is L (L + 1) / 2 in every entry.
    b, n, d = 3, 50, 20
    h = jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32)[None, :, None], (b, n, d))
    dgate = jax.grad(lambda g: jnp.sum(native_impl("gated_residual_native")(jnp.zeros((b, n, d)), g, h)))(
        jnp.zeros((b, d))
    )
    np.testing.assert_array_equal(dgate, np.full((b, d), n * (n + 1) / 2, np.float32))


def test_gated_residual_rejects_bad_shapes():
    with pytest.raises(ValueError, match="gate \\[B, D\\]"):
        ops.gated_residual(jnp.ones((2, 3, 4)), jnp.ones((2, 3)), jnp.ones((2, 3, 4)))


# ---------------------------------------------------------------------------- in the DiT


@pytest.mark.slow
def test_dit_native_matches_reference_and_uses_the_custom_calls():
    require_native()
    cfg = models.default_config("dit")
    cfg.hidden_size, cfg.depth, cfg.num_classes = 64, 2, 3
    model = models.create(cfg)
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_normal((2, 28, 28, 1)), jnp.float32)
    t, y = jnp.array([3, 700]), jnp.array([0, 2])
    params = model.init(jax.random.key(0), x, t, y)["params"]
    # adaLN-Zero starts every block at the identity; perturb so every op matters.
    params = jax.tree.map(lambda p: p + 0.05 * jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)

    def loss(p):
        return jnp.mean((model.apply({"params": p}, x, t, y) - x) ** 2)

    results = {}
    for mode in ("reference", "native"):
        with ops.forced(mode):
            fn = jax.jit(jax.value_and_grad(loss))
            text = fn.lower(params).as_text()
            results[mode] = fn(params)
        targets = ("dj_dense_forward", "dj_dense_backward", "dj_attention_forward", "dj_attention_backward",
                   "dj_adaln_forward", "dj_adaln_backward", "dj_gelu_forward", "dj_gelu_backward",
                   "dj_gated_residual_backward")
        assert all((t in text) == (mode == "native") for t in targets), mode
    (lr, gr), (ln, gn) = results["reference"], results["native"]
    assert abs(float(ln) - float(lr)) <= 1e-5 * abs(float(lr))
    for a, b in zip(jax.tree.leaves(gn), jax.tree.leaves(gr)):
        assert rel_err(a, b) < 1e-4
