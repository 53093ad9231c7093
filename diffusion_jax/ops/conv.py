"""2-D convolution, NHWC x HWIO -> NHWC."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax import lax


def conv2d(
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
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
