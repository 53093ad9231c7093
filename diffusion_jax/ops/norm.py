"""Group normalisation over NHWC activations (Wu & He 2018).

    y[n, h, w, c] = (x - mu[n, g]) * rsqrt(var[n, g] + epsilon) * scale[c] + bias[c],

with mu and var taken over H, W and the C / G channels of group g = c // (C / G).

* `group_norm_reference`: the textbook formula on a [N, H, W, G, C/G] view,
  differentiated by autodiff.
* `group_norm_fast`: the same function with a `jax.custom_vjp`. Both passes
  reduce over H*W into per-(n, c) sums first (contiguous channels, vectorised),
  fold the tiny [N, C] sums into groups, and finish with one fused
  y = x * a[n, c] + b[n, c]. The backward pass uses the closed form of the
  normalisation's gradient (e.g. Ioffe & Szegedy 2015, sec. 3, applied per
  group): with g = dy * scale, x_hat = (x - mu) * r, r = rsqrt(var + eps) and
  M = H * W * C / G elements per group,

      dx = r * (g - mean_group(g) - x_hat * mean_group(g * x_hat)),
      dscale[c] = sum_{n, h, w} dy * x_hat,   dbias[c] = sum_{n, h, w} dy,

  which needs two per-(n, c) sums, sum_hw dy and sum_hw dy * (x - mu), from
  one read of x and dy.
* `group_norm_native`: the same forward and closed-form backward pass as
  hand-written C++ loops behind XLA FFI custom calls
  (`diffusion_jax.ops.native`, `cpu_kernels.cc`), for float32 on XLA:CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from diffusion_jax.ops import native


def _check_groups(c: int, num_groups: int) -> None:
    if num_groups < 1 or c % num_groups:
        raise ValueError(
            f"group_norm: channels ({c}) must be divisible by num_groups ({num_groups})"
        )


def group_norm_reference(
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
    _check_groups(c, num_groups)
    xg = x.astype(jnp.float32).reshape(n, h, w, num_groups, c // num_groups)
    mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 4), keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + epsilon)).reshape(n, h, w, c)
    return (y * scale + bias).astype(x.dtype)


def _group_sum(per_channel: jax.Array, num_groups: int) -> jax.Array:
    """[N, C] -> [N, C]: each channel gets the sum over its group."""
    n, c = per_channel.shape
    g = per_channel.reshape(n, num_groups, c // num_groups).sum(axis=2, keepdims=True)
    return jnp.broadcast_to(g, (n, num_groups, c // num_groups)).reshape(n, c)


def _statistics(x32: jax.Array, num_groups: int, epsilon: float):
    """Per-(n, c) broadcast group mean and rsqrt(var + eps), both [N, C]."""
    n, h, w, c = x32.shape
    m = h * w * (c // num_groups)
    mean = _group_sum(jnp.sum(x32, axis=(1, 2)), num_groups) / m
    centred = x32 - mean[:, None, None, :]
    var = _group_sum(jnp.sum(centred * centred, axis=(1, 2)), num_groups) / m
    return mean, jax.lax.rsqrt(var + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _group_norm_fast(x, scale, bias, num_groups, epsilon):
    x32 = x.astype(jnp.float32)
    mean, rstd = _statistics(x32, num_groups, epsilon)
    a = rstd * scale.astype(jnp.float32)  # [N, C]
    b = bias.astype(jnp.float32) - mean * a
    return (x32 * a[:, None, None, :] + b[:, None, None, :]).astype(x.dtype)


def _group_norm_fast_fwd(x, scale, bias, num_groups, epsilon):
    x32 = x.astype(jnp.float32)
    mean, rstd = _statistics(x32, num_groups, epsilon)
    a = rstd * scale.astype(jnp.float32)
    b = bias.astype(jnp.float32) - mean * a
    y = (x32 * a[:, None, None, :] + b[:, None, None, :]).astype(x.dtype)
    return y, (x, scale, bias, mean, rstd)


def _group_norm_fast_bwd(num_groups, epsilon, residuals, dy):
    x, scale, bias, mean, rstd = residuals
    n, h, w, c = x.shape
    m = h * w * (c // num_groups)
    x32 = x.astype(jnp.float32)
    dy32 = dy.astype(jnp.float32)
    scale32 = scale.astype(jnp.float32)
    sum_dy = jnp.sum(dy32, axis=(1, 2))  # [N, C]
    sum_dy_xc = jnp.sum(dy32 * (x32 - mean[:, None, None, :]), axis=(1, 2))  # [N, C]
    dbias = jnp.sum(sum_dy, axis=0)
    dscale = jnp.sum(sum_dy_xc * rstd, axis=0)
    # mean_group(g) and mean_group(g * x_hat), broadcast to channels.
    mean_g = _group_sum(sum_dy * scale32, num_groups) / m
    mean_gx = _group_sum(sum_dy_xc * scale32, num_groups) * rstd / m
    # dx = r*scale*dy - r*mean_g - r*(x - mu)*r*mean_gx  =  k_dy*dy + k_x*x + k_0
    k_dy = rstd * scale32
    k_x = -rstd * rstd * mean_gx
    k_0 = -rstd * mean_g - mean * k_x
    dx = dy32 * k_dy[:, None, None, :] + x32 * k_x[:, None, None, :] + k_0[:, None, None, :]
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


_group_norm_fast.defvjp(_group_norm_fast_fwd, _group_norm_fast_bwd)


def group_norm_fast(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    *,
    num_groups: int,
    epsilon: float = 1e-5,
) -> jax.Array:
    """Same function as `group_norm_reference` with a closed-form backward pass.

    Works under jit, vmap and grad (`jax.custom_vjp`).
    """
    if x.ndim != 4:
        raise ValueError(f"group_norm: x must be NHWC (4-D), got shape {x.shape}")
    _check_groups(x.shape[-1], num_groups)
    return _group_norm_fast(x, scale, bias, int(num_groups), float(epsilon))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _group_norm_native(x, scale, bias, num_groups, epsilon):
    return native.group_norm_forward(x, scale, bias, num_groups, epsilon)[0]


def _group_norm_native_fwd(x, scale, bias, num_groups, epsilon):
    y, mean, rstd = native.group_norm_forward(x, scale, bias, num_groups, epsilon)
    return y, (x, scale, mean, rstd)


def _group_norm_native_bwd(num_groups, epsilon, residuals, dy):
    x, scale, mean, rstd = residuals
    return native.group_norm_backward(x, scale, mean, rstd, dy, num_groups)


_group_norm_native.defvjp(_group_norm_native_fwd, _group_norm_native_bwd)


def group_norm_native(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    *,
    num_groups: int,
    epsilon: float = 1e-5,
) -> jax.Array:
    """Same function as `group_norm_reference` as native XLA:CPU custom calls.

    Float32 with [C] scale and bias on maps larger than 1x1 only; anything else
    (a LayerNorm as [tokens, 1, 1, D], measured faster as XLA's fusion),
    or a host without loaded native kernels, takes `group_norm_fast`.
    """
    if x.ndim != 4:
        raise ValueError(f"group_norm: x must be NHWC (4-D), got shape {x.shape}")
    _check_groups(x.shape[-1], num_groups)
    c = x.shape[-1]
    if (
        x.shape[1] * x.shape[2] == 1  # LayerNorm ([tokens, 1, 1, D]): XLA's fusion is faster
        or scale.shape != (c,)
        or bias.shape != (c,)
        or x.dtype != jnp.float32
        or scale.dtype != jnp.float32
        or bias.dtype != jnp.float32
        or not native.loaded()
    ):
        return group_norm_fast(x, scale, bias, num_groups=num_groups, epsilon=epsilon)
    return _group_norm_native(x, scale, bias, int(num_groups), float(epsilon))


# ---------------------------------------------------------------------------
# LayerNorm (Ba et al. 2016) over the last axis of [..., D]:
#     y = (x - mean(x)) * rsqrt(var(x) + epsilon) * scale + bias,   statistics per token.


def layer_norm_reference(x: jax.Array, scale: jax.Array, bias: jax.Array, *, epsilon: float = 1e-6) -> jax.Array:
    """The formula above in float32 over the last axis; one XLA fusion on every backend."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias).astype(x.dtype)


def layer_norm_fast(x: jax.Array, scale: jax.Array, bias: jax.Array, *, epsilon: float = 1e-6) -> jax.Array:
    """`group_norm_fast` with one group on each token ([N, 1, 1, D]): its closed-form backward
    pass, measured faster on XLA:CPU than autodiff's (also the "native" path: XLA's fusion
    beats the C++ GroupNorm on 1x1 maps)."""
    d = x.shape[-1]
    y = group_norm_fast(x.reshape(-1, 1, 1, d), scale, bias, num_groups=1, epsilon=epsilon)
    return y.reshape(x.shape)


# ---------------------------------------------------------------------------
# Adaptive LayerNorm (adaLN; Peebles & Xie 2023): a parameter-free LayerNorm
# of every token followed by a per-example modulation,
#     y[b, t] = LN(x[b, t]) * (1 + scale[b]) + shift[b],   x [B, L, D], shift, scale [B, D].


def _check_adaln(x: jax.Array, shift: jax.Array, scale: jax.Array) -> None:
    if x.ndim != 3 or shift.shape != (x.shape[0], x.shape[2]) or scale.shape != shift.shape:
        raise ValueError(
            f"adaptive_layer_norm: x must be [B, L, D] and shift, scale [B, D]; got {x.shape}, "
            f"{shift.shape}, {scale.shape}"
        )


def _adaln_with(norm, x, shift, scale, epsilon):
    _check_adaln(x, shift, scale)
    d = x.shape[-1]
    y = norm(x, jnp.ones((d,), jnp.float32), jnp.zeros((d,), jnp.float32), epsilon=epsilon)
    return y * (1 + scale[:, None, :]) + shift[:, None, :]


def adaptive_layer_norm_reference(x, shift, scale, *, epsilon: float = 1e-6):
    """LN(x) (1 + scale) + shift with `layer_norm_reference`."""
    return _adaln_with(layer_norm_reference, x, shift, scale, epsilon)


def adaptive_layer_norm_fast(x, shift, scale, *, epsilon: float = 1e-6):
    """LN(x) (1 + scale) + shift with `layer_norm_fast` (`group_norm_fast`, one group per token)."""
    return _adaln_with(layer_norm_fast, x, shift, scale, epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _adaln_native(x, shift, scale, epsilon):
    return native.adaptive_layer_norm_forward(x, shift, scale, epsilon)[0]


def _adaln_native_fwd(x, shift, scale, epsilon):
    y, mean, rstd = native.adaptive_layer_norm_forward(x, shift, scale, epsilon)
    return y, (x, scale, mean, rstd)


def _adaln_native_bwd(epsilon, residuals, dy):
    return native.adaptive_layer_norm_backward(*residuals, dy)


_adaln_native.defvjp(_adaln_native_fwd, _adaln_native_bwd)


def adaptive_layer_norm_native(x, shift, scale, *, epsilon: float = 1e-6):
    """Same function as `adaptive_layer_norm_reference`, both passes one C++ loop each.

    Float32 only; other dtypes and hosts without the native kernels take
    `adaptive_layer_norm_fast`.
    """
    _check_adaln(x, shift, scale)
    if not native.usable(x, shift, scale):
        return adaptive_layer_norm_fast(x, shift, scale, epsilon=epsilon)
    return _adaln_native(x, shift, scale, float(epsilon))
