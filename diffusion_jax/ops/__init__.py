"""Array-level kernels behind the models' layers.

This package is the single place where the arithmetic of the networks' layers
lives: `conv2d` and `group_norm` (UNet), `dense`, `self_attention` /
`attention`, `layer_norm`, `adaptive_layer_norm`, `gelu` and `gated_residual` (DiT, and the
UNet's attention and embeddings). `diffusion_jax.models.layers` wraps the
parametrised ones in Flax modules. A faster implementation for one backend is
chosen here and every network picks it up.

Dispatch: a table maps each op to its implementation per mode,
``IMPLEMENTATIONS[op][mode]``. The mode comes from ``DIFFUSION_JAX_OPS``:

* unset or ``auto``: on GPU/TPU the plain XLA reference implementations
  (attention through `jax.nn.dot_product_attention`, so XLA's fused kernels).
  On CPU, the native kernels (oneDNN convolutions and matmuls, C++ GroupNorm,
  attention, adaLN, GELU and gated-residual backward as XLA FFI custom calls,
  `diffusion_jax.ops.native`) when they build and the process sees a single
  device (`native.usable` says which operands each takes); otherwise the
  pure-XLA fast ones (`conv2d_fast`, `group_norm_fast`: custom VJPs tuned for
  XLA:CPU). The custom calls have no SPMD partitioning rule, so with several
  CPU devices (``--xla_force_host_platform_device_count``, multi-process CPU
  runs) XLA would gather a sharded batch onto every device; the XLA path
  partitions.
* ``reference``: always the reference (plain `lax` + autodiff), for debugging
  and for speed comparisons.
* ``fast``: always the pure-XLA fast implementations.
* ``native``: the native kernels wherever they apply (float32; they fall back
  to the fast ones otherwise).

`prepare()` chooses the mode once per process, builds the native kernels if
the mode wants them (outside any trace: a trace never starts a compiler) and
logs the choice once; the trainer calls it before jitting. Until it is called,
each trace reads the variable and uses only native kernels that are already
loaded. ``with ops.forced(mode):`` overrides the mode for the traces inside
the block (benchmarks); functions already jitted keep the path they were
traced with. ``python -m diffusion_jax.ops build`` builds the native kernels
ahead of time.

Layout convention: images are NHWC, convolution kernels HWIO.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence

import jax
from absl import logging

from diffusion_jax.ops import native
from diffusion_jax.ops.activations import gelu_native, gelu_reference
from diffusion_jax.ops.attention import (
    attention_native,
    attention_reference,
    self_attention_native,
    self_attention_reference,
)
from diffusion_jax.ops.conv import conv2d_fast, conv2d_native, conv2d_reference
from diffusion_jax.ops.dense import dense_native, dense_reference
from diffusion_jax.ops.norm import (
    adaptive_layer_norm_fast,
    adaptive_layer_norm_native,
    adaptive_layer_norm_reference,
    group_norm_fast,
    group_norm_native,
    group_norm_reference,
    layer_norm_fast,
    layer_norm_reference,
)
from diffusion_jax.ops.residual import gated_residual_native, gated_residual_reference

ENV_VAR = "DIFFUSION_JAX_OPS"
MODES = ("auto", "reference", "fast", "native")

# op -> {mode: implementation}. Where an op has no XLA:CPU-tuned variant its
# "fast" entry is the reference; LayerNorm's "native" entry is its fast one
# (XLA's fusion beats the C++ GroupNorm on [tokens, 1, 1, D]).
IMPLEMENTATIONS: dict[str, dict[str, Callable]] = {
    "conv2d": {"reference": conv2d_reference, "fast": conv2d_fast, "native": conv2d_native},
    "group_norm": {"reference": group_norm_reference, "fast": group_norm_fast, "native": group_norm_native},
    "layer_norm": {"reference": layer_norm_reference, "fast": layer_norm_fast, "native": layer_norm_fast},
    "adaptive_layer_norm": {
        "reference": adaptive_layer_norm_reference,
        "fast": adaptive_layer_norm_fast,
        "native": adaptive_layer_norm_native,
    },
    "dense": {"reference": dense_reference, "fast": dense_reference, "native": dense_native},
    "attention": {"reference": attention_reference, "fast": attention_reference, "native": attention_native},
    "self_attention": {
        "reference": self_attention_reference,
        "fast": self_attention_reference,
        "native": self_attention_native,
    },
    "gelu": {"reference": gelu_reference, "fast": gelu_reference, "native": gelu_native},
    "gated_residual": {
        "reference": gated_residual_reference,
        "fast": gated_residual_reference,
        "native": gated_residual_native,
    },
}

_prepared: str | None = None  # the mode prepare() chose, None before it ran
_forced: list[str] = []  # stack of forced() modes, innermost last


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR} / ops mode must be one of {MODES}, got {mode!r}")
    return mode


def _requested() -> str:
    return _check_mode(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto")


def _resolve(mode: str, *, build: bool) -> str:
    """"auto" -> the mode for this backend; builds the native kernels only if `build`."""
    if mode != "auto":
        if mode == "native" and build:
            native.available()
        return mode
    if jax.default_backend() != "cpu":
        return "reference"
    if jax.device_count() == 1 and (native.available() if build else native.loaded()):
        return "native"
    return "fast"


def prepare(mode: str | None = None) -> str:
    """Chooses the ops mode for this process (`mode`, else ``DIFFUSION_JAX_OPS``, else "auto"),
    builds the native kernels if it uses them and logs the choice; returns the mode.

    Call it before jitting (after `jax.distributed.initialize`: it asks for the
    backend). Repeated calls with the same request are free and log nothing.
    """
    global _prepared
    requested = _check_mode(mode) if mode else _requested()
    chosen = _resolve(requested, build=True)
    if chosen != _prepared:
        why = ""
        wanted_native = chosen == "native" or (requested == "auto" and jax.default_backend() == "cpu")
        if wanted_native and not native.available():  # built already by _resolve: no second build
            why = f" (native kernels unavailable, using the fast ones: {native.reason()})"
        logging.info("ops: %s kernels on %s%s", chosen, jax.default_backend(), why)
    _prepared = chosen
    return chosen


def selected() -> str:
    """The implementation the next trace uses: "reference", "fast" or "native"."""
    if _forced:
        return _forced[-1]
    if _prepared is not None:
        return _prepared
    return _resolve(_requested(), build=False)


def implementation(op: str, mode: str | None = None) -> Callable:
    """IMPLEMENTATIONS[op][mode], `mode` defaulting to `selected()`."""
    return IMPLEMENTATIONS[op][mode or selected()]


@contextlib.contextmanager
def forced(mode: str) -> Iterator[None]:
    """Traces inside the block use `mode` ("auto", "reference", "fast" or "native").

    Builds the native kernels first if the mode uses them; functions jitted
    inside keep the path they were traced with.
    """
    _forced.append(_resolve(_check_mode(mode), build=True))
    try:
        yield
    finally:
        _forced.pop()


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: Sequence[int] = (1, 1),
    padding: str | Sequence[tuple[int, int]] = "SAME",
) -> jax.Array:
    """y[n, i, j, o] = sum_{h, w, c} x[n, s*i + h, s*j + w, c] * kernel[h, w, c, o] (NHWC x HWIO)."""
    return implementation("conv2d")(x, kernel, strides=strides, padding=padding)


def group_norm(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    *,
    num_groups: int,
    epsilon: float = 1e-5,
) -> jax.Array:
    """GroupNorm (Wu & He 2018) over NHWC; float32 statistics, output in x's dtype."""
    return implementation("group_norm")(x, scale, bias, num_groups=num_groups, epsilon=epsilon)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, *, epsilon: float = 1e-6) -> jax.Array:
    """LayerNorm over the last axis: (x - mean) rsqrt(var + epsilon) scale + bias, float32 statistics."""
    return implementation("layer_norm")(x, scale, bias, epsilon=epsilon)


def adaptive_layer_norm(
    x: jax.Array, shift: jax.Array, scale: jax.Array, *, epsilon: float = 1e-6
) -> jax.Array:
    """adaLN: LayerNorm(x)[b, t] * (1 + scale[b]) + shift[b] over x [B, L, D], no learned affine."""
    return implementation("adaptive_layer_norm")(x, shift, scale, epsilon=epsilon)


def gelu(x: jax.Array) -> jax.Array:
    """GELU, tanh approximation: x / 2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return implementation("gelu")(x)


def gated_residual(x: jax.Array, gate: jax.Array, h: jax.Array) -> jax.Array:
    """x + gate[b] * h over x, h [B, L, D] and gate [B, D] (adaLN-Zero's gated residual)."""
    return implementation("gated_residual")(x, gate, h)


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """y[..., o] = sum_i x[..., i] kernel[i, o] + bias[o]."""
    return implementation("dense")(x, kernel, bias)


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Multi-head softmax(q k^T / sqrt(D)) v over [B, L, H, D]; float32 logits and softmax."""
    return implementation("attention")(q, k, v)


def self_attention(qkv: jax.Array, num_heads: int) -> jax.Array:
    """`attention` of q, k, v packed as [B, L, 3 * num_heads * D] -> [B, L, num_heads * D]."""
    return implementation("self_attention")(qkv, num_heads)


__all__ = [
    "ENV_VAR",
    "IMPLEMENTATIONS",
    "MODES",
    "adaptive_layer_norm",
    "adaptive_layer_norm_fast",
    "adaptive_layer_norm_native",
    "adaptive_layer_norm_reference",
    "attention",
    "attention_native",
    "attention_reference",
    "conv2d",
    "conv2d_fast",
    "conv2d_native",
    "conv2d_reference",
    "dense",
    "dense_native",
    "dense_reference",
    "forced",
    "gated_residual",
    "gated_residual_native",
    "gated_residual_reference",
    "gelu",
    "gelu_native",
    "gelu_reference",
    "group_norm",
    "group_norm_fast",
    "group_norm_native",
    "group_norm_reference",
    "implementation",
    "layer_norm",
    "layer_norm_fast",
    "layer_norm_reference",
    "native",
    "prepare",
    "selected",
    "self_attention",
    "self_attention_native",
    "self_attention_reference",
]
