"""Old home of `diffusion_jax.data.synthetic` (kept for existing imports; new code imports that)."""

from diffusion_jax.data.synthetic import NAME, SyntheticIterator

__all__ = ["NAME", "SyntheticIterator"]
