"""MNIST with a small class-conditional DiT (Peebles & Xie 2023) instead of the UNet.

Patches of 4x4 pixels (49 tokens), width 128, 6 adaLN-Zero blocks; AdamW
without weight decay as in the DiT paper, with a higher rate for the short run.
"""

from diffusion_jax import models
from experiments import mnist


def get_config():
    config = mnist.get_config()
    config.experiment = "mnist_dit"
    with config.unlocked():
        config.model = models.default_config("dit")
    m = config.model
    m.image_size = 28  # pixels
    m.in_channels = 1
    m.num_classes = 10  # label 10 = null label of guidance
    m.patch_size = 4  # 28 / 4 = 7x7 = 49 tokens
    m.hidden_size = 128  # token width, divisible by num_heads and 4
    m.depth = 6  # transformer blocks
    m.num_heads = 4
    m.label_init_std = 1.0  # as experiments/mnist.py: the class is learned early

    t = config.training
    t.optimizer = "adamw"
    t.weight_decay = 0.0  # DiT: no weight decay
    t.learning_rate = 5e-4
    t.num_steps = 2400  # ~1.2x the UNet's step time here: the same ~20-minute budget as mnist.py
    t.sample_every_steps = 1200
    return config
