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
    # 2,400 steps took 19 min here beside the test suite (docs/results_mnist.md: far behind the
    # UNet); alone its step is faster than the UNet's (4.0 against 2.8 steps/s), so ~4,000 fit
    # the UNet's 20 minutes: --config.training.num_steps=4000 (not measured yet)
    t.num_steps = 2400
    t.sample_every_steps = 1200
    return config
