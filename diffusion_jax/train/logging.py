"""Old home of `diffusion_jax.train.writers` (its name shadowed the stdlib's `logging`).

Kept only so existing imports (tests/test_train.py) work until they move to
`diffusion_jax.train.writers` and `diffusion_jax.images`; new code must not import it.
"""

from diffusion_jax.images import tile as make_grid
from diffusion_jax.images import to_uint8
from diffusion_jax.train.writers import MetricWriter, save_image_grid

__all__ = ["MetricWriter", "make_grid", "save_image_grid", "to_uint8"]
