"""Gated residual connection of DiT's adaLN-Zero blocks (Peebles & Xie 2023).

    y[b, t] = x[b, t] + gate[b] * h[b, t],   x, h [B, L, D], gate [B, D]

The gate is regressed from the conditioning and initialised to zero, so each
block starts as the identity. Its gradient, dgate[b] = sum_t dy[b, t] h[b, t],
is a reduction over the tokens that XLA:CPU runs slowly (about 16 ms per call
at the DiT's [128, 196, 256]).

* `gated_residual_reference`: the expression above, differentiated by
  autodiff; the path on GPU/TPU ("fast" uses it too).
* `gated_residual_native`: the same forward (one XLA fusion) with a custom
  backward: dx = dy, and dh = gate dy with dgate in one C++ pass over dy and
  h (`cpu_kernels.cc`). Float32 only; other dtypes and hosts without the
  native kernels take the reference.
"""

from __future__ import annotations

import jax

from diffusion_jax.ops import native


def _check(x: jax.Array, gate: jax.Array, h: jax.Array) -> None:
    if x.ndim != 3 or h.shape != x.shape or gate.shape != (x.shape[0], x.shape[2]):
        raise ValueError(
            f"gated_residual: x and h must be [B, L, D] and gate [B, D]; got x {x.shape}, "
            f"gate {gate.shape}, h {h.shape}"
        )


def _apply(x, gate, h):
    return x + gate[:, None, :] * h


def gated_residual_reference(x: jax.Array, gate: jax.Array, h: jax.Array) -> jax.Array:
    """x + gate[:, None, :] * h."""
    _check(x, gate, h)
    return _apply(x, gate, h)


_gated_residual_native = jax.custom_vjp(_apply)


def _gated_residual_native_fwd(x, gate, h):
    return _apply(x, gate, h), (gate, h)


def _gated_residual_native_bwd(residuals, dy):
    gate, h = residuals
    dh, dgate = native.gated_residual_backward(gate, h, dy)
    return dy, dgate, dh


_gated_residual_native.defvjp(_gated_residual_native_fwd, _gated_residual_native_bwd)


def gated_residual_native(x: jax.Array, gate: jax.Array, h: jax.Array) -> jax.Array:
    """Same function as `gated_residual_reference`, its backward pass one C++ loop (float32)."""
    _check(x, gate, h)
    if not native.usable(x, gate, h):
        return gated_residual_reference(x, gate, h)
    return _gated_residual_native(x, gate, h)
