"""diffusion_jax: denoising diffusion models in JAX/Flax: discrete DDPM, continuous VP,
EDM and flow matching, their objectives and samplers.

Layers, each importable alone (arrows point one way):
schedules -> processes -> diffusion (DDPM's posteriors, VLB), objectives -> samplers -> oracles
ops -> models -> data -> training / evaluation -> launch.py
"""

__version__ = "0.1.0"
