"""Tiny config that trains in seconds, for tests and CI: 8x8 synthetic images, a one-level
UNet with 8 base channels, a few steps. Not a real experiment."""

from experiments import default


def get_config():
    config = default.get_config("unet")
    config.experiment = "smoke"
    config.data.dataset = "synthetic"  # deterministic test patterns (diffusion_jax.train.synthetic)

    m = config.model
    m.image_size = 8  # pixels
    m.in_channels = 1
    m.num_classes = 3  # synthetic classes (one bar position each)
    m.ch = 8  # base width
    m.ch_mult = (1,)  # one level, no resampling: the fastest compile
    m.num_res_blocks = 1
    m.attn_resolutions = ()  # no attention
    m.norm_groups = 4
    m.dropout = 0.0  # deterministic, so runs can be compared exactly

    config.diffusion.num_timesteps = 100  # T
    config.diffusion.schedule_kwargs.beta_end = 0.2  # T = 100 needs larger betas to reach noise

    t = config.training
    t.batch_size = 8  # global
    t.num_steps = 6
    t.learning_rate = 1e-3
    t.warmup_steps = 2
    t.ema_decay = 0.9
    t.log_every_steps = 2
    t.checkpoint_every_steps = 3
    t.keep_checkpoints = 2
    t.sample_every_steps = 0  # grid at the end only
    t.progress_bar = False

    s = config.sample
    s.num_steps = 4
    s.grid_per_class = 2
    s.num_images = 6
    s.batch_size = 6
    config.eval.num_samples = 16
    config.eval.batch_size = 16
    return config
