"""Dense (fully connected) layer arithmetic: y = x @ kernel + bias over the last axis.

* `dense_reference`: `lax.dot_general` plus a broadcast bias, differentiated by
  autodiff; the path on GPU/TPU and the one Flax's `nn.Dense` computes.
  XLA:CPU's dot is already its best pure-XLA form, so the "fast" mode uses it
  too (`dense_fast`).
* `dense_native`: the same function with a `jax.custom_vjp` whose three
  matrix products are oneDNN matmuls (XLA:CPU custom calls,
  `diffusion_jax.ops.native`); with X = x flattened to [M, K],

      forward          Y  = X W + b          (bias fused into the product)
      backward data    dX = dY W^T
      backward weights dW = X^T dY,   db = sum_rows dY   (one custom call for both)

  (transposes are stride swaps inside oneDNN, no copies). On this CPU the
  products run at 205-235 GFLOP/s for the DiT's shapes where XLA's dots reach
  105-190 (bench/bench_ops.py). Float32 only; other dtypes and hosts without
  the native kernels take the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from diffusion_jax.ops import native


def _check(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> None:
    if kernel.ndim != 2 or x.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"dense: kernel must be [in_features, out_features] with in_features = x.shape[-1] "
            f"({x.shape[-1]}), got kernel shape {kernel.shape}"
        )
    if bias is not None and bias.shape != kernel.shape[1:]:
        raise ValueError(f"dense: bias must have shape ({kernel.shape[1]},), got {bias.shape}")


def dense_reference(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """y[..., o] = sum_i x[..., i] kernel[i, o] + bias[o]."""
    _check(x, kernel, bias)
    y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return y if bias is None else y + bias


@jax.custom_vjp
def _dense_native(x2, kernel, bias):
    return native.dense_forward(x2, kernel, bias)


def _dense_native_fwd(x2, kernel, bias):
    return _dense_native(x2, kernel, bias), (x2, kernel)


def _dense_native_bwd(residuals, dy):
    x2, kernel = residuals
    return native.dense_backward(x2, kernel, dy)


_dense_native.defvjp(_dense_native_fwd, _dense_native_bwd)


def dense_native(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """Same function as `dense_reference`, its products as oneDNN matmuls (float32, XLA:CPU)."""
    _check(x, kernel, bias)
    if x.ndim < 2 or not native.usable(x, kernel, *([] if bias is None else [bias])):
        return dense_reference(x, kernel, bias)
    k, o = kernel.shape
    b = jnp.zeros((o,), jnp.float32) if bias is None else bias
    y = _dense_native(x.reshape(-1, k), kernel, b)
    return y.reshape(*x.shape[:-1], o)
