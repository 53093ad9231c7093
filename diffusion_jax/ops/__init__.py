"""Array-level kernels behind the models' convolution and normalisation layers.

This package is the single place where the convolution and GroupNorm arithmetic
lives; `diffusion_jax.models.layers` wraps these functions in Flax modules. A
faster implementation for one backend replaces the function here and every
network picks it up.

Layout convention: images are NHWC, convolution kernels HWIO.
"""

from diffusion_jax.ops.conv import conv2d
from diffusion_jax.ops.norm import group_norm

__all__ = ["conv2d", "group_norm"]
