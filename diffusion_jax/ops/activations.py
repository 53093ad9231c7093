"""GELU activation, tanh approximation (Hendrycks & Gimpel 2016), as in DiT's MLPs.

    gelu(x) = x / 2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))

* `gelu_reference`: `jax.nn.gelu(x, approximate=True)` and its autodiff
  gradient; the path on GPU/TPU ("fast" uses it too).
* `gelu_native`: forward and backward as one vectorised C++ loop each
  (XLA:CPU custom calls, `cpu_kernels.cc`), using 1 + tanh(u) = 2 sigmoid(2u);
  XLA:CPU splits the same work over several passes of its own. Float32 only;
  other dtypes and hosts without the native kernels take the reference.
"""

from __future__ import annotations

import jax

from diffusion_jax.ops import native


def gelu_reference(x: jax.Array) -> jax.Array:
    """x / 2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return jax.nn.gelu(x, approximate=True)


@jax.custom_vjp
def _gelu_native(x):
    return native.gelu_forward(x)


def _gelu_native_fwd(x):
    return native.gelu_forward(x), x


def _gelu_native_bwd(x, dy):
    return (native.gelu_backward(x, dy),)


_gelu_native.defvjp(_gelu_native_fwd, _gelu_native_bwd)


def gelu_native(x: jax.Array) -> jax.Array:
    """Same function as `gelu_reference` as native XLA:CPU custom calls (float32)."""
    if not native.usable(x):
        return gelu_reference(x)
    return _gelu_native(x)
