"""Tests for diffusion_jax.ops: fast and native kernels == reference kernels == float64 oracles.

Every replacement, the pure-XLA "fast" custom VJPs and the "native" XLA FFI
custom calls (oneDNN convolutions, C++ GroupNorm), forward and the gradients
wrt x, kernel, scale, bias,
is compared with (a) `lax.conv_general_dilated` / the reference GroupNorm and
their autodiff gradients, to 1e-5 relative in float32, and (b) independent
float64 numpy oracles (direct sums; central finite differences for GroupNorm).
"""

from __future__ import annotations

import itertools
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import ops
from diffusion_jax.ops import conv as conv_module
from diffusion_jax.ops import native
from native_support import require_native

_GEMM_RULE = conv_module.use_gemm_weight_grad  # the real rule, before the fixture below replaces it

RTOL32 = 1e-5


def _native_impl(name):
    """The native implementation (skips where the host cannot build the kernels)."""
    require_native()
    return getattr(ops, name)


CONV_IMPLS = ["conv2d_fast", "conv2d_native"]
GN_IMPLS = ["group_norm_fast", "group_norm_native"]


@pytest.fixture(autouse=True)
def _full_float32_precision():
    """GPUs run float32 convolutions and matmuls in TF32 by default; 1e-5 needs full float32."""
    with jax.default_matmul_precision("highest"):
        yield


def _rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# ----------------------------------------------------------------------------
# float64 numpy oracles
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


def np_group_norm(x, scale, bias, num_groups, eps):
    x = np.asarray(x, np.float64)
    n, h, w, c = x.shape
    xg = x.reshape(n, h, w, num_groups, c // num_groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    y = ((xg - mean) / np.sqrt(var + eps)).reshape(n, h, w, c)
    return y * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)


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
    impl = _native_impl(impl) if impl.endswith("native") else getattr(ops, impl)
    x, kernel, g, strides, padding = _conv_inputs(case)
    fast = jax.jit(lambda x, k, g: _conv_value_and_grads(impl, x, k, g, strides, padding))
    ref = jax.jit(lambda x, k, g: _conv_value_and_grads(ops.conv2d_reference, x, k, g, strides, padding))
    got, want = fast(x, kernel, g), ref(x, kernel, g)
    oracle = np_conv_and_grads(x, kernel, g, strides, padding)
    for name, a, b, c in zip(("y", "dx", "dkernel"), got, want, oracle):
        assert a.shape == b.shape == c.shape, name
        assert _rel_err(a, b) < RTOL32, (name, _rel_err(a, b))
        assert _rel_err(a, c) < RTOL32, (name, _rel_err(a, c))


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
        assert _rel_err(a, b) < 2e-2, (name, _rel_err(a, b))
        assert _rel_err(a, c) < 2e-2, (name, _rel_err(a, c))


@pytest.mark.parametrize("impl", CONV_IMPLS)
def test_conv2d_under_vmap(impl):
    impl = _native_impl(impl) if impl.endswith("native") else getattr(ops, impl)
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
            assert _rel_err(a[i], c) < RTOL32
    for a, b in zip(got, want):
        assert _rel_err(a, b) < RTOL32


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
    impl = _native_impl(impl) if impl.endswith("native") else getattr(ops, impl)
    x, scale, bias, g, groups = _gn_inputs(case)
    got = jax.jit(lambda *a: _gn_value_and_grads(impl, *a, groups))(x, scale, bias, g)
    want = jax.jit(lambda *a: _gn_value_and_grads(ops.group_norm_reference, *a, groups))(x, scale, bias, g)
    for name, a, b in zip(("y", "dx", "dscale", "dbias"), got, want):
        assert a.shape == b.shape, name
        assert _rel_err(a, b) < RTOL32, (name, _rel_err(a, b))
    # Independent float64 oracle: forward values, and directional derivatives.
    assert _rel_err(got[0], np_group_norm(x, scale, bias, groups, 1e-5)) < RTOL32
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
        assert _rel_err(a, b) < 2e-2, (name, _rel_err(a, b))


@pytest.mark.parametrize("impl", GN_IMPLS)
def test_group_norm_under_vmap(impl):
    impl = _native_impl(impl) if impl.endswith("native") else getattr(ops, impl)
    x, scale, bias, g, groups = _gn_inputs(GN_CASES[1], seed=3)
    xs = jnp.stack([x, 2.0 * x + 1.0])
    gs = jnp.stack([g, -g])

    def batched(impl):
        return jax.jit(jax.vmap(lambda x, g: _gn_value_and_grads(impl, x, scale, bias, g, groups)))

    got, want = batched(impl)(xs, gs), batched(ops.group_norm_reference)(xs, gs)
    for a, b in zip(got, want):
        assert _rel_err(a, b) < RTOL32


def test_group_norm_rejects_bad_groups():
    x = jnp.zeros((1, 2, 2, 6))
    for impl in (ops.group_norm_fast, ops.group_norm_native, ops.group_norm_reference, ops.group_norm):
        with pytest.raises(ValueError, match="num_groups"):
            impl(x, jnp.ones(6), jnp.zeros(6), num_groups=4)


# ----------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------


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


def test_conv2d_fast_with_xla_weight_grad(monkeypatch):
    # The branch taken for shapes where the per-tap GEMMs do not pay (conv_in, strided, small maps).
    monkeypatch.setattr(conv_module, "use_gemm_weight_grad", lambda *a: False)
    x, kernel, g, strides, padding = _conv_inputs(CONV_CASES[2])
    got = jax.jit(lambda x, k, g: _conv_value_and_grads(ops.conv2d_fast, x, k, g, strides, padding))(x, kernel, g)
    oracle = np_conv_and_grads(x, kernel, g, strides, padding)
    for a, c in zip(got, oracle):
        assert _rel_err(a, c) < RTOL32


# ----------------------------------------------------------------------------
# native kernels: build, cache and fallback
# ----------------------------------------------------------------------------


def test_native_falls_back_to_fast_when_unavailable(monkeypatch):
    monkeypatch.setattr(native, "loaded", lambda: False)
    x, kernel, g, strides, padding = _conv_inputs(CONV_CASES[0])
    got = _conv_value_and_grads(ops.conv2d_native, x, kernel, g, strides, padding)
    oracle = np_conv_and_grads(x, kernel, g, strides, padding)
    for a, c in zip(got, oracle):
        assert _rel_err(a, c) < RTOL32
    jaxpr = str(jax.make_jaxpr(lambda x, k: ops.conv2d_native(x, k))(x, kernel))
    assert "dj_conv2d" not in jaxpr
    xs, scale, bias, _, groups = _gn_inputs(GN_CASES[0])
    jaxpr = str(jax.make_jaxpr(lambda x: ops.group_norm_native(x, scale, bias, num_groups=groups))(xs))
    assert "dj_group_norm" not in jaxpr


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


def test_native_kernels_are_in_the_traced_program():
    impl = _native_impl("conv2d_native")
    x, kernel, g, strides, padding = _conv_inputs(CONV_CASES[0])
    text = jax.jit(lambda x, k, g: _conv_value_and_grads(impl, x, k, g, strides, padding)).lower(
        x, kernel, g
    ).as_text()
    for target in ("dj_conv2d_forward", "dj_conv2d_backward_data", "dj_conv2d_backward_weights"):
        assert target in text


@pytest.mark.parametrize("setting, want", [("keep", "True"), ("default", "False")])
def test_keep_freed_memory_in_a_fresh_process(setting, want):

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt(3) is glibc's")
    code = "from diffusion_jax.ops import allocator; print(allocator.keep_freed_memory())"
    env = dict(os.environ, DIFFUSION_JAX_MALLOC=setting, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == want


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
