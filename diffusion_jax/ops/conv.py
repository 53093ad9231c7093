"""2-D convolution, NHWC x HWIO -> NHWC.

Two implementations of the same function:

* `conv2d_reference`: `lax.conv_general_dilated` and its autodiff gradients.
  This is the path used on GPU/TPU, where cuDNN / XLA's own convolution
  emitters are fast.
* `conv2d_fast`: identical forward pass and input gradient, but a hand-written
  weight gradient (`jax.custom_vjp`). On XLA:CPU (jaxlib 0.10) the
  autodiff weight gradient is emitted as a convolution whose "kernel" is the
  whole H x W output gradient and whose output is the tiny kh x kw window;
  the YNNPACK/Eigen convolution kernels run that shape at 2-30 GFLOP/s. The
  same sum

      dW[a, b, c, o] = sum_{n, i, j} x_pad[n, s*i + a, s*j + b, c] * dy[n, i, j, o]

  written as one matrix product per kernel tap (a, b) over the (n, i, j)
  rows runs on XLA:CPU's dot (Eigen GEMM) path instead. It pays for 1x1
  kernels (one GEMM, 3-7x faster) and for stride-1 3x3 kernels with at least
  64 input and output channels on maps of at least 14x14 (1.6-3.3x, e.g.
  28x28x128->128, 14x14x256->128); for the rest (1-channel conv_in / conv_out,
  strided downsampling, 7x7 maps) the per-tap GEMMs measured slower and the
  backward pass keeps XLA's own weight gradient (`use_gemm_weight_grad`).

* `conv2d_native`: all three passes (forward, input gradient, weight
  gradient) as oneDNN primitives through XLA FFI custom calls
  (`diffusion_jax.ops.native`), 2-8x faster than XLA:CPU's own convolutions
  for the UNet's shapes (bench/bench_ops.py); float32 only, other dtypes and
  hosts without the native kernels take `conv2d_fast`.

Which one `diffusion_jax.ops.conv2d` uses is decided in `diffusion_jax.ops`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from diffusion_jax.ops import native

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def conv2d_reference(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: Sequence[int] = (1, 1),
    padding: str | Sequence[tuple[int, int]] = "SAME",
) -> jax.Array:
    """y[n, i, j, o] = sum_{h, w, c} x[n, s*i + h, s*j + w, c] * kernel[h, w, c, o].

    Reference path: `lax.conv_general_dilated` and its autodiff gradients.
    """
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=tuple(strides),
        padding=padding,
        dimension_numbers=_DIMENSION_NUMBERS,
    )


def explicit_padding(
    x_shape: Sequence[int],
    kernel_shape: Sequence[int],
    strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Turns "SAME" / "VALID" / [(lo, hi), (lo, hi)] into explicit (lo, hi) pairs."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(
                f"conv2d: padding must be 'SAME', 'VALID' or two (lo, hi) pairs, got {padding!r}"
            )
        pads = lax.padtype_to_pads(
            tuple(x_shape[1:3]), tuple(kernel_shape[:2]), tuple(strides), padding.upper()
        )
    else:
        pads = tuple(padding)
        if len(pads) != 2 or any(len(p) != 2 for p in pads):
            raise ValueError(
                f"conv2d: explicit padding must be two (lo, hi) pairs, got {padding!r}"
            )
    return tuple((int(lo), int(hi)) for lo, hi in pads)  # type: ignore[return-value]


def conv2d_weight_grad(
    x: jax.Array,
    dy: jax.Array,
    kernel_shape: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[tuple[int, int]],
) -> jax.Array:
    """dL/dkernel of `conv2d` as kh*kw matrix products (float32 accumulation).

    For every tap (a, b) the strided window x_pad[:, a::s, b::s, :] of the
    padded input, flattened to rows (n, i, j), is contracted with the output
    gradient flattened the same way:  dW[a, b] = X_ab^T dY  ([C, O]).
    """
    kh, kw, c, o = kernel_shape
    sh, sw = strides
    n, ho, wo, _ = dy.shape
    (plo_h, phi_h), (plo_w, phi_w) = pads
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (plo_h, phi_h, 0), (plo_w, phi_w, 0), (0, 0, 0)))
    dy_rows = dy.reshape(n * ho * wo, o)
    taps = []
    for a in range(kh):
        for b in range(kw):
            window = lax.slice(
                xp,
                (0, a, b, 0),
                (n, a + sh * (ho - 1) + 1, b + sw * (wo - 1) + 1, c),
                (1, sh, sw, 1),
            )
            taps.append(
                lax.dot_general(
                    window.reshape(n * ho * wo, c),
                    dy_rows,
                    (((0,), (0,)), ((), ())),
                    preferred_element_type=jnp.float32,
                )
            )
    return jnp.stack(taps).reshape(kh, kw, c, o)


# Thresholds of `use_gemm_weight_grad`, from bench/bench_ops.py at batch 128 (see the module docstring).
GEMM_WEIGHT_GRAD_MIN_CHANNELS = 64
GEMM_WEIGHT_GRAD_MIN_PIXELS = 14 * 14


def use_gemm_weight_grad(dy_shape: Sequence[int], kernel_shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether the per-tap GEMM weight gradient is the faster one on XLA:CPU for this shape."""
    kh, kw, c, o = kernel_shape
    if kh * kw == 1:
        return True
    return (
        tuple(strides) == (1, 1)
        and min(c, o) >= GEMM_WEIGHT_GRAD_MIN_CHANNELS
        and dy_shape[1] * dy_shape[2] >= GEMM_WEIGHT_GRAD_MIN_PIXELS
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv2d_fast(x, kernel, strides, pads):
    return conv2d_reference(x, kernel, strides=strides, padding=pads)


def _conv2d_fast_fwd(x, kernel, strides, pads):
    return _conv2d_fast(x, kernel, strides, pads), (x, kernel)


def _conv2d_fast_bwd(strides, pads, residuals, dy):
    x, kernel = residuals
    # Input gradient: XLA's own transposed convolution (a forward-layout conv
    # with the flipped kernel), which XLA:CPU already runs at GEMM speed.
    _, x_vjp = jax.vjp(lambda x_: conv2d_reference(x_, kernel, strides=strides, padding=pads), x)
    (dx,) = x_vjp(dy)
    if use_gemm_weight_grad(dy.shape, kernel.shape, strides):
        dw = conv2d_weight_grad(x, dy, kernel.shape, strides, pads).astype(kernel.dtype)
    else:
        _, k_vjp = jax.vjp(lambda k_: conv2d_reference(x, k_, strides=strides, padding=pads), kernel)
        (dw,) = k_vjp(dy)
    return dx, dw


_conv2d_fast.defvjp(_conv2d_fast_fwd, _conv2d_fast_bwd)


def conv2d_fast(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: Sequence[int] = (1, 1),
    padding: str | Sequence[tuple[int, int]] = "SAME",
) -> jax.Array:
    """Same function as `conv2d_reference`; weight gradient as per-tap GEMMs where that pays.

    Works under jit, vmap and grad (`jax.custom_vjp`); forward values and the
    input gradient are exactly the reference ones.
    """
    strides = tuple(int(s) for s in strides)
    pads = explicit_padding(x.shape, kernel.shape, strides, padding)
    if any(p < 0 for pair in pads for p in pair):
        # Negative (cropping) padding: rare, leave it to XLA.
        return conv2d_reference(x, kernel, strides=strides, padding=pads)
    return _conv2d_fast(x, kernel, strides, pads)


def conv_output_shape(x_shape, kernel_shape, strides, pads) -> tuple[int, int, int, int]:
    """NHWC output shape of a convolution with explicit (lo, hi) padding."""
    n, h, w, _ = x_shape
    kh, kw, _, o = kernel_shape
    (pt, pb), (pl, pr) = pads
    return (n, (h + pt + pb - kh) // strides[0] + 1, (w + pl + pr - kw) // strides[1] + 1, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv2d_native(x, kernel, strides, pads):
    out_shape = conv_output_shape(x.shape, kernel.shape, strides, pads)
    return native.conv2d_forward(x, kernel, out_shape, strides, pads)


def _conv2d_native_fwd(x, kernel, strides, pads):
    return _conv2d_native(x, kernel, strides, pads), (x, kernel)


def _conv2d_native_bwd(strides, pads, residuals, dy):
    x, kernel = residuals
    dx = native.conv2d_backward_data(dy, kernel, x.shape, strides, pads)
    dw = native.conv2d_backward_weights(x, dy, kernel.shape, strides, pads)
    return dx, dw


_conv2d_native.defvjp(_conv2d_native_fwd, _conv2d_native_bwd)


def conv2d_native(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: Sequence[int] = (1, 1),
    padding: str | Sequence[tuple[int, int]] = "SAME",
) -> jax.Array:
    """Same function as `conv2d_reference`, every pass a oneDNN primitive (XLA:CPU custom calls).

    Float32 NHWC x HWIO only; other dtypes, negative padding or a host without
    the native kernels (`native.loaded()`) take `conv2d_fast`.
    """
    strides = tuple(int(s) for s in strides)
    pads = explicit_padding(x.shape, kernel.shape, strides, padding)
    if (
        x.dtype != jnp.float32
        or kernel.dtype != jnp.float32
        or x.ndim != 4
        or kernel.ndim != 4
        or any(p < 0 for pair in pads for p in pair)
        or not native.loaded()
    ):
        return conv2d_fast(x, kernel, strides=strides, padding=pads)
    if x.shape[-1] != kernel.shape[2]:
        raise ValueError(
            f"conv2d: input channels ({x.shape[-1]}) must equal kernel's in-channels (HWIO dim 2, "
            f"{kernel.shape[2]})"
        )
    return _conv2d_native(x, kernel, strides, pads)
