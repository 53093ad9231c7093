"""Array-level kernels behind the models' convolution and normalisation layers.

This package is the single place where the convolution and GroupNorm arithmetic
lives; `diffusion_jax.models.layers` wraps these functions in Flax modules. A
faster implementation for one backend is chosen here and every network picks
it up.

Dispatch (decided when a function is traced):

* ``DIFFUSION_JAX_OPS`` unset or ``auto``: the fast implementations
  (`conv2d_fast`, `group_norm_fast`: custom VJPs tuned for XLA:CPU) when
  ``jax.default_backend() == "cpu"``, the plain XLA reference ones on GPU/TPU.
* ``DIFFUSION_JAX_OPS=reference``: always the reference (plain `lax` + autodiff),
  for debugging and for speed comparisons.
* ``DIFFUSION_JAX_OPS=fast``: always the fast implementations.

The variable is read at trace time, so a benchmark can set it in
``os.environ`` before tracing each variant; functions already jitted keep the
path they were traced with.

Layout convention: images are NHWC, convolution kernels HWIO.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax

from diffusion_jax.ops.conv import conv2d_fast, conv2d_reference
from diffusion_jax.ops.norm import group_norm_fast, group_norm_reference

ENV_VAR = "DIFFUSION_JAX_OPS"
MODES = ("auto", "reference", "fast")


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR} / ops mode must be one of {MODES}, got {mode!r}")
    return mode


def use_fast() -> bool:
    """True when the fast (CPU-tuned) kernels are selected for the next trace."""
    mode = _check_mode(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto")
    if mode == "auto":
        return jax.default_backend() == "cpu"
    return mode == "fast"


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: Sequence[int] = (1, 1),
    padding: str | Sequence[tuple[int, int]] = "SAME",
) -> jax.Array:
    """y[n, i, j, o] = sum_{h, w, c} x[n, s*i + h, s*j + w, c] * kernel[h, w, c, o] (NHWC x HWIO)."""
    impl = conv2d_fast if use_fast() else conv2d_reference
    return impl(x, kernel, strides=strides, padding=padding)


def group_norm(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    *,
    num_groups: int,
    epsilon: float = 1e-5,
) -> jax.Array:
    """GroupNorm (Wu & He 2018) over NHWC; float32 statistics, output in x's dtype."""
    impl = group_norm_fast if use_fast() else group_norm_reference
    return impl(x, scale, bias, num_groups=num_groups, epsilon=epsilon)


__all__ = [
    "ENV_VAR",
    "MODES",
    "conv2d",
    "conv2d_fast",
    "conv2d_reference",
    "group_norm",
    "group_norm_fast",
    "group_norm_reference",
    "use_fast",
]
