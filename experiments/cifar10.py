"""CIFAR-10, the DDPM paper's setup (Ho et al. 2020, Sec. 4 and Appendix B), for accelerators.

Unconditional 35.7M-parameter UNet (ch 128, ch_mult (1, 2, 2, 2), 2 res blocks,
attention at 16x16, dropout 0.1), T = 1000 linear betas 1e-4 .. 0.02, eps
target with L_simple, Adam 2e-4, batch 128, 5,000 warm-up steps, gradient
clipping at 1, EMA 0.9999, random horizontal flips, 800k steps.
"""

from diffusion_jax import models
from experiments import default


def get_config():
    config = default.get_config("unet")
    config.experiment = "cifar10"
    config.data.dataset = "cifar10"
    config.data.random_flip = True
    with config.unlocked():
        config.model = models.ddpm_cifar10_config()  # 35.7M parameters, dropout 0.1

    config.diffusion.schedule = "linear"
    config.diffusion.num_timesteps = 1000
    config.diffusion.prediction = "eps"

    t = config.training
    t.batch_size = 128  # global
    t.num_steps = 800_000
    t.optimizer = "adam"
    t.learning_rate = 2e-4
    t.lr_schedule = "constant"
    t.warmup_steps = 5000
    t.grad_clip_norm = 1.0
    t.ema_decay = 0.9999
    t.cond_drop_prob = 0.0  # unconditional
    t.log_every_steps = 100
    t.checkpoint_every_steps = 10_000
    t.sample_every_steps = 10_000

    s = config.sample
    s.method = "ddim"
    s.num_steps = 100
    s.guidance_scale = 0.0  # unconditional model
    s.grid_per_class = 8  # 8 x 8 grids
    return config
