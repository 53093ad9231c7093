"""Array-level kernels behind the models' layers.

This package is the single place where the arithmetic of the networks' layers
lives: `conv2d` and `group_norm` (UNet), `dense`, `self_attention` /
`attention`, `adaptive_layer_norm`, `gelu` and `gated_residual` (DiT, and the
UNet's attention and embeddings). `diffusion_jax.models.layers` wraps the
parametrised ones in Flax modules. A faster implementation for one backend is
chosen here and every network picks it up.

Dispatch (decided when a function is traced):

* ``DIFFUSION_JAX_OPS`` unset or ``auto``: on GPU/TPU the plain XLA reference
  implementations. On CPU, the native kernels (`conv2d_native`,
  `group_norm_native`: oneDNN convolutions and C++ GroupNorm as XLA FFI
  custom calls, `diffusion_jax.ops.native`; likewise `dense_native`,
  `self_attention_native`, `adaptive_layer_norm_native`, `gelu_native`,
  `gated_residual_native`) when they are available and the process sees a
  single device (`native.usable` says which operands each takes); otherwise
  the pure-XLA fast ones
  (`conv2d_fast`, `group_norm_fast`: custom VJPs tuned for XLA:CPU). The
  custom calls have no SPMD partitioning rule, so with several CPU devices
  (``--xla_force_host_platform_device_count``, multi-process CPU runs) XLA
  would gather a sharded batch onto every device; the XLA path partitions.
* ``DIFFUSION_JAX_OPS=reference``: always the reference (plain `lax` + autodiff),
  for debugging and for speed comparisons.
* ``DIFFUSION_JAX_OPS=fast``: always the pure-XLA fast implementations.
* ``DIFFUSION_JAX_OPS=native``: the native kernels wherever they apply
  (float32; they fall back to the fast ones otherwise).

The variable is read at trace time, so a benchmark can set it (or use
``with ops.forced(mode):``) before tracing each variant; functions already
jitted keep the path they were traced with.

Layout convention: images are NHWC, convolution kernels HWIO.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import jax

from diffusion_jax.ops import native
from diffusion_jax.ops.activations import gelu_fast, gelu_native, gelu_reference
from diffusion_jax.ops.attention import (
    attention_fast,
    attention_native,
    attention_reference,
    self_attention_fast,
    self_attention_native,
    self_attention_reference,
)
from diffusion_jax.ops.conv import conv2d_fast, conv2d_native, conv2d_reference
from diffusion_jax.ops.dense import dense_fast, dense_native, dense_reference
from diffusion_jax.ops.norm import (
    adaptive_layer_norm_fast,
    adaptive_layer_norm_native,
    adaptive_layer_norm_reference,
    group_norm_fast,
    group_norm_native,
    group_norm_reference,
)
from diffusion_jax.ops.residual import (
    gated_residual_fast,
    gated_residual_native,
    gated_residual_reference,
)

ENV_VAR = "DIFFUSION_JAX_OPS"
MODES = ("auto", "reference", "fast", "native")


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR} / ops mode must be one of {MODES}, got {mode!r}")
    return mode


def selected() -> str:
    """The implementation the next trace uses: "reference", "fast" or "native"."""
    mode = _check_mode(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto")
    if mode != "auto":
        return mode
    if jax.default_backend() != "cpu":
        return "reference"
    if jax.device_count() == 1 and native.available():
        return "native"
    return "fast"


def _implementation(op: str):
    """The function `<op>_<selected()>` of this package, e.g. `dense_native`."""
    return globals()[f"{op}_{selected()}"]


@contextlib.contextmanager
def forced(mode: str) -> Iterator[None]:
    """Traces inside the block use `mode` ("auto", "reference", "fast" or "native").

    Sets ``DIFFUSION_JAX_OPS`` for the block and restores its previous value
    (or its absence) afterwards; functions jitted inside keep the path they
    were traced with.
    """
    _check_mode(mode)
    previous = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = mode
    try:
        yield
    finally:
        if previous is None:
            del os.environ[ENV_VAR]
        else:
            os.environ[ENV_VAR] = previous


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: Sequence[int] = (1, 1),
    padding: str | Sequence[tuple[int, int]] = "SAME",
) -> jax.Array:
    """y[n, i, j, o] = sum_{h, w, c} x[n, s*i + h, s*j + w, c] * kernel[h, w, c, o] (NHWC x HWIO)."""
    return _implementation("conv2d")(x, kernel, strides=strides, padding=padding)


def group_norm(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    *,
    num_groups: int,
    epsilon: float = 1e-5,
) -> jax.Array:
    """GroupNorm (Wu & He 2018) over NHWC; float32 statistics, output in x's dtype."""
    return _implementation("group_norm")(x, scale, bias, num_groups=num_groups, epsilon=epsilon)


def adaptive_layer_norm(
    x: jax.Array, shift: jax.Array, scale: jax.Array, *, epsilon: float = 1e-6
) -> jax.Array:
    """adaLN: LayerNorm(x)[b, t] * (1 + scale[b]) + shift[b] over x [B, L, D], no learned affine."""
    return _implementation("adaptive_layer_norm")(x, shift, scale, epsilon=epsilon)


def gelu(x: jax.Array) -> jax.Array:
    """GELU, tanh approximation: x / 2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return _implementation("gelu")(x)


def gated_residual(x: jax.Array, gate: jax.Array, h: jax.Array) -> jax.Array:
    """x + gate[b] * h over x, h [B, L, D] and gate [B, D] (adaLN-Zero's gated residual)."""
    return _implementation("gated_residual")(x, gate, h)


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """y[..., o] = sum_i x[..., i] kernel[i, o] + bias[o]."""
    return _implementation("dense")(x, kernel, bias)


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Multi-head softmax(q k^T / sqrt(D)) v over [B, L, H, D]; float32 logits and softmax."""
    return _implementation("attention")(q, k, v)


def self_attention(qkv: jax.Array, num_heads: int) -> jax.Array:
    """`attention` of q, k, v packed as [B, L, 3 * num_heads * D] -> [B, L, num_heads * D]."""
    return _implementation("self_attention")(qkv, num_heads)


__all__ = [
    "ENV_VAR",
    "MODES",
    "adaptive_layer_norm",
    "adaptive_layer_norm_fast",
    "adaptive_layer_norm_native",
    "adaptive_layer_norm_reference",
    "attention",
    "attention_fast",
    "attention_native",
    "attention_reference",
    "conv2d",
    "conv2d_fast",
    "conv2d_native",
    "conv2d_reference",
    "dense",
    "dense_fast",
    "dense_native",
    "dense_reference",
    "forced",
    "gated_residual",
    "gated_residual_fast",
    "gated_residual_native",
    "gated_residual_reference",
    "gelu",
    "gelu_fast",
    "gelu_native",
    "gelu_reference",
    "group_norm",
    "group_norm_fast",
    "group_norm_native",
    "group_norm_reference",
    "native",
    "selected",
    "self_attention",
    "self_attention_fast",
    "self_attention_native",
    "self_attention_reference",
]
