"""MNIST, class-conditional discrete DDPM (eps prediction) with classifier-free guidance: the
main recipe until 2026-12-01, kept for its bits/dim (the VLB is ddpm's) and as the baseline of
docs/results_mnist.md's ablation (experiments/mnist.py, EDM, beats it at equal wall time).

A small UNet (0.69M parameters: widths 16 / 32 / 64 at 28 / 14 / 7 pixels,
attention at 7x7) predicts eps under the DDPM linear schedule (T = 1000,
beta 1e-4 .. 0.02); labels are dropped with probability 0.1 so the same
network is also unconditional, and the EMA grids are drawn with DDIM
(25 steps) and guidance w = 2.
"""

from experiments import default


def get_config():
    config = default.get_config("unet")
    config.experiment = "mnist_ddpm"
    config.data.dataset = "mnist"

    m = config.model
    m.image_size = 28  # pixels
    m.in_channels = 1
    m.num_classes = 10  # digits; label 10 is the null label of guidance
    m.ch = 16  # base width (channels at 28x28)
    m.ch_mult = (1, 2, 4)  # 28 -> 14 -> 7 with 16 / 32 / 64 channels: equal FLOPs per level
    m.norm_groups = 8  # GroupNorm groups (at most)
    m.num_res_blocks = 1  # residual blocks per level (one more on the way up)
    m.attn_resolutions = (7,)  # self-attention at 7x7 (and in the middle block)
    m.dropout = 0.0  # too few steps to overfit 60k digits

    config.diffusion.schedule = "linear"
    config.diffusion.prediction = "eps"

    t = config.training
    t.batch_size = 64  # global
    t.num_steps = 2400  # ~0.6 s/step measured on this 2-core CPU when quiet: ~25 min + grids
    t.learning_rate = 1e-3
    t.warmup_steps = 100
    t.lr_schedule = "cosine"  # decays to 0 at num_steps
    t.ema_decay = 0.995  # ~200-step average: the run is short
    t.ema_warmup = True
    t.cond_drop_prob = 0.1
    t.log_every_steps = 50
    t.checkpoint_every_steps = 250
    t.sample_every_steps = 800  # a 10 x 10 grid costs ~50 train steps

    s = config.sample
    s.method = "ddim"
    s.num_steps = 25  # DDIM steps
    s.guidance_scale = 2.0
    s.grid_per_class = 10  # training grids: 10 x 10
    s.num_images = 100
    s.batch_size = 100
    return config
