"""Multi-head softmax attention.

    out[b, i, h] = sum_j softmax_j(s <q[b, i, h], k[b, j, h]>) v[b, j, h],   s = D^-1/2

(Vaswani et al. 2017), logits and softmax in float32. Two entry points:
`attention(q, k, v)` over [B, L, H, D] arrays, and `self_attention(qkv,
num_heads)` over one projection's packed output [B, L, 3 * H * D] (q, k, v
in that order, each split into heads), which is what the UNet's and DiT's
attention layers compute.

* `*_reference`: `jax.nn.dot_product_attention` (float32 logits), so GPUs
  and TPUs get XLA's fused attention kernels; differentiated by autodiff.
  The path on GPU/TPU ("fast" uses it too).
* `self_attention_native`: two XLA:CPU custom calls (`cpu_kernels.cc`) that
  copy each image's q, k and v heads out of the packed array into head-major
  buffers (one image per thread). The forward pass keeps
  only the output and the per-row log-sum-exp; the backward pass recomputes
  the probabilities from them (as FlashAttention does, Dao et al. 2022) and
  writes dq, dk, dv straight into one packed gradient. Working one image at a
  time per thread keeps its [H, L, L] score blocks in cache, and the
  [B, H, L, L] tensor is never stored; the products are oneDNN matmuls.
  Float32 only; other dtypes and hosts without the native kernels take the
  reference. `attention_native` packs q, k, v and calls it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from diffusion_jax.ops import native


def _check(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    if q.ndim != 4 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:] or k.shape != v.shape:
        raise ValueError(
            f"attention: q [B, Lq, H, D], k and v [B, Lk, H, D] expected, got {q.shape}, {k.shape}, {v.shape}"
        )


def _head_dim(qkv: jax.Array, num_heads: int) -> int:
    """D of a packed qkv [B, L, 3 * num_heads * D]; raises on any other shape."""
    if qkv.ndim != 3 or num_heads < 1 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(
            f"self_attention: qkv must be [B, L, 3 * num_heads * head_dim], got shape {qkv.shape} "
            f"with num_heads={num_heads}"
        )
    return qkv.shape[-1] // (3 * num_heads)


def _split(qkv: jax.Array, num_heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    b, n, _ = qkv.shape
    d = _head_dim(qkv, num_heads)
    return tuple(a.reshape(b, n, num_heads, d) for a in jnp.split(qkv, 3, axis=-1))


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v per head, logits and softmax in float32; output in v's dtype."""
    _check(q, k, v)
    return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), scale=q.shape[-1] ** -0.5).astype(v.dtype)


def self_attention_reference(qkv: jax.Array, num_heads: int) -> jax.Array:
    """attention_reference of the packed q, k, v; [B, L, 3*H*D] -> [B, L, H*D]."""
    q, k, v = _split(qkv, num_heads)
    return attention_reference(q, k, v).reshape(*qkv.shape[:2], -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _self_attention_native(qkv, num_heads):
    return _self_attention_native_fwd(qkv, num_heads)[0]


def _self_attention_native_fwd(qkv, num_heads):
    o, lse = native.attention_forward(qkv, num_heads, _head_dim(qkv, num_heads) ** -0.5)
    return o, (qkv, o, lse)


def _self_attention_native_bwd(num_heads, residuals, do):
    qkv, o, lse = residuals
    return (native.attention_backward(qkv, o, lse, do, num_heads, _head_dim(qkv, num_heads) ** -0.5),)


_self_attention_native.defvjp(_self_attention_native_fwd, _self_attention_native_bwd)


def self_attention_native(qkv: jax.Array, num_heads: int) -> jax.Array:
    """Same function as `self_attention_reference` as native XLA:CPU custom calls (float32)."""
    _head_dim(qkv, num_heads)  # validates the shape
    if not native.usable(qkv):
        return self_attention_reference(qkv, num_heads)
    return _self_attention_native(qkv, int(num_heads))


def attention_native(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Same function as `attention_reference`; natively when q, k, v share one shape (packs them)."""
    _check(q, k, v)
    if q.shape != k.shape:
        return attention_reference(q, k, v)
    b, n, h, d = q.shape
    qkv = jnp.concatenate([a.reshape(b, n, h * d) for a in (q, k, v)], axis=-1)
    return self_attention_native(qkv, h).reshape(b, n, h, d)
