"""The one place for convolution and normalisation in every network.

`Conv`, `GroupNorm`, `LayerNorm` and `Dense` hold the parameters (float32)
and delegate the arithmetic to `diffusion_jax.ops.conv2d` /
`diffusion_jax.ops.group_norm` / `diffusion_jax.ops.layer_norm` / `diffusion_jax.ops.dense`, so a faster kernel
for one backend, swapped in inside `diffusion_jax.ops`, reaches the UNet and
the DiT at once. The parameter-free ops (attention, adaLN, GELU, the gated
residual) are called from the networks directly (`ops.self_attention` etc.).

Compute dtype: parameters are always stored in float32; `dtype` ("float32" or
"bfloat16") is the dtype the activations and the cast kernels are computed in.
Normalisation statistics are taken in float32 by `ops.group_norm` and `ops.layer_norm` whatever the
input dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax import ops

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def to_dtype(name_or_dtype: Any) -> Any:
    """Maps a config string ("float32" | "bfloat16") or a dtype to a jnp dtype."""
    if isinstance(name_or_dtype, str):
        if name_or_dtype not in DTYPES:
            raise ValueError(
                f"dtype must be one of {tuple(DTYPES)}, got {name_or_dtype!r}"
            )
        return DTYPES[name_or_dtype]
    return name_or_dtype


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
    """DDPM's initialiser: variance scaling, fan_avg, uniform (Ho et al. 2020).

    `scale=0` gives zeros (the zero-initialised layers of DDPM/ADM/DiT).
    """
    if scale == 0.0:
        return nn.initializers.zeros_init()
    return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def num_groups_for(channels: int, max_groups: int = 32) -> int:
    """Largest group count <= max_groups that divides `channels` with >= 2 channels per group.

    32 groups (Wu & He 2018; DDPM) for wide layers, fewer when channels are few
    or not a multiple of 32 (e.g. 8 channels -> 4 groups, 48 -> 24, 64 -> 32).
    At least two channels per group: DDPM adds the time embedding as a
    per-channel constant right before a GroupNorm, and a group of one channel
    would subtract that constant away entirely.
    """
    for g in range(min(max_groups, max(channels // 2, 1)), 0, -1):
        if channels % g == 0:
            return g
    return 1


class Conv(nn.Module):
    """2-D convolution NHWC x HWIO + bias, through `ops.conv2d`.

    Parameters: "kernel" [kh, kw, C_in, features] and "bias" [features], float32.
    """

    features: int
    kernel_size: Sequence[int] = (3, 3)
    strides: Sequence[int] = (1, 1)
    padding: str | Sequence[tuple[int, int]] = "SAME"
    use_bias: bool = True
    init_scale: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = to_dtype(self.dtype)
        kshape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", default_init(self.init_scale), kshape, jnp.float32)
        y = ops.conv2d(
            x.astype(dtype),
            kernel.astype(dtype),
            strides=tuple(self.strides),
            padding=self.padding,
        )
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
            y = y + bias.astype(dtype)
        return y


class GroupNorm(nn.Module):
    """Group normalisation (Wu & He 2018) over NHWC, through `ops.group_norm`.

    `num_groups` is an upper bound: the layer uses `num_groups_for(C, num_groups)`
    groups so that it divides the channel count. Parameters "scale" (ones) and
    "bias" (zeros), [C], float32.
    """

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
        y = ops.group_norm(
            x.astype(to_dtype(self.dtype)),
            scale,
            bias,
            num_groups=num_groups_for(c, self.num_groups),
            epsilon=self.epsilon,
        )
        return y.astype(to_dtype(self.dtype))


class LayerNorm(nn.Module):
    """Layer normalisation over the last axis of [..., D], through `ops.layer_norm`.

    `use_scale=False, use_bias=False` gives the parameter-free norm of DiT's
    adaLN blocks (Peebles & Xie 2023).
    """

    epsilon: float = 1e-6
    use_scale: bool = True
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        if self.use_scale:
            scale = self.param("scale", nn.initializers.ones_init(), (d,), jnp.float32)
        else:
            scale = jnp.ones((d,), jnp.float32)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros_init(), (d,), jnp.float32)
        else:
            bias = jnp.zeros((d,), jnp.float32)
        y = ops.layer_norm(x.astype(to_dtype(self.dtype)), scale, bias, epsilon=self.epsilon)
        return y.astype(to_dtype(self.dtype))


class Dense(nn.Module):
    """y = x @ kernel + bias over the last axis, through `ops.dense`.

    Parameters "kernel" [in, features] and "bias" [features], float32, named
    as in Flax's `nn.Dense` (checkpoints are interchangeable); computed in `dtype`.
    """

    features: int
    use_bias: bool = True
    init_scale: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = to_dtype(self.dtype)
        kernel = self.param("kernel", default_init(self.init_scale), (x.shape[-1], self.features), jnp.float32)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
            bias = bias.astype(dtype)
        return ops.dense(x.astype(dtype), kernel.astype(dtype), bias)


def dense(features: int, dtype: Any, init_scale: float = 1.0, name: str | None = None) -> Dense:
    """A `Dense` with float32 parameters, compute `dtype` and DDPM's initialiser."""
    return Dense(features, init_scale=init_scale, dtype=dtype, name=name)
