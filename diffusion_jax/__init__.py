"""diffusion_jax: denoising diffusion models (DDPM and fast samplers) in JAX/Flax.

Layers, each importable alone (arrows point one way):
schedules -> diffusion (process math, losses, likelihood) -> samplers
ops -> models -> data -> training / evaluation -> launch.py
"""

__version__ = "0.1.0"
