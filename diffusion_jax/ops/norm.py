"""Group normalisation over NHWC activations (Wu & He 2018)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def group_norm(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    *,
    num_groups: int,
    epsilon: float = 1e-5,
) -> jax.Array:
    """y = (x - mean_g) / sqrt(var_g + epsilon) * scale + bias.

    mean_g and var_g are taken per example over H, W and the C / num_groups
    channels of each group. Statistics are computed in float32 whatever the
    input dtype; the result has the input's dtype.
    """
    n, h, w, c = x.shape
    if c % num_groups:
        raise ValueError(
            f"group_norm: channels ({c}) must be divisible by num_groups ({num_groups})"
        )
    xg = x.astype(jnp.float32).reshape(n, h, w, num_groups, c // num_groups)
    mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 4), keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + epsilon)).reshape(n, h, w, c)
    return (y * scale + bias).astype(x.dtype)
