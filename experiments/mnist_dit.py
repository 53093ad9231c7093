"""MNIST with a small class-conditional DiT (Peebles & Xie 2023) instead of the UNet.

Patches of 4x4 pixels (49 tokens), width 64, 6 adaLN-Zero blocks, with U-ViT's long skips
(block i feeds block 5-i; Bao et al. 2023) and a 16-channel convolutional stem (one UNet
ResBlock at full resolution before the patches and one after the unpatchified output);
EDM preconditioning as experiments/mnist.py, with the noise levels of EDM2's ImageNet-64
preset, ln sigma ~ N(-0.8, 1.6^2) (Karras et al. 2024); Muon for the Dense kernels and AdamW
for the rest (training.optimizer = "muon"; Jordan et al. 2024, Liu et al. 2025), lr 2e-3
(the Dense kernels at twice that, training.muon_lr_scale = 2) with 300 warm-up steps and a
cosine decay over 2,600 steps, no weight decay; guidance w = 0.625.

What it reaches (docs/results_mnist.md, "Muon's own learning rate and 2,600 steps",
2026-12-04; DPM-Solver++(2M), 20 network calls, N = 1,000, the project's classifier, floor FD
0.347): from a fresh clone on the project's 2-core AMD EPYC VM, MNIST preparation and kernel
build included, 16 min 18 s wall, conditional accuracy 0.991 and classifier-FD 0.692 = 1.99x the train-vs-test floor. So issue
#22's 18 minutes hold with 9% to spare, not the 10% asked, and the 2x bound holds at the edge.
--config.training.num_steps=3600 (21-26 min here): 1.66x, accuracy 0.987 at w = 0.5. With
AdamW the network reached 2.37x at 3,600 steps; the width-128 AdamW recipe before it 1.96x in
5,600 steps (35 minutes).
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
    m.patch_size = 4  # 28 / 4 = 7x7 = 49 tokens (2x2 patches cost ~2.5x a step and learned slower per second)
    m.hidden_size = 64  # token width, divisible by num_heads and 4 (128: 1.96x in 5,600 steps, twice the wall)
    m.depth = 6  # transformer blocks
    m.num_heads = 4
    m.long_skip = True  # U-ViT long skips; with conv_head and lr 2e-3: 42x -> 2.8x the floor
    m.conv_stem = 16  # a 16-channel ResBlock at full resolution around the patches: 2.6x -> 2.37x (AdamW)
    m.conv_head = False  # the stem's output block replaces the 3x3 head
    m.label_init_std = 1.0  # as experiments/mnist.py: the class is learned early

    # EDM2's ImageNet-64 noise levels; EDM's (-1.2, 1.2) gave 2.2x at best (w = 0.75), these 1.96x
    # (w = 0.5) in the same run pair (docs/results_mnist.md, d2 and d3)
    config.diffusion.edm.p_mean = -0.8
    config.diffusion.edm.p_std = 1.6

    t = config.training
    t.optimizer = "muon"  # Dense kernels orthogonalised, AdamW elsewhere: 2.37x -> 1.68x at 3,600 steps (g1, g3)
    t.weight_decay = 0.0  # DiT: no weight decay
    t.learning_rate = 2e-3  # AdamW's best with the stem (5e-3: 2.9x); Muon's updates are scaled to AdamW's RMS
    t.muon_lr_scale = 2.0  # the Dense kernels at 4e-3: at 2,000 steps 2.95x -> 2.65x (4x: 3.2x; h1, h2)
    t.lr_schedule = "cosine"
    t.warmup_steps = 300
    t.num_steps = 2600  # 2,700: 16 min 21 s from a fresh clone, 1.89x at w = 0.625; 3,600: 21-26 min, 1.66x
    t.sample_every_steps = 2600  # the last step only: each grid compiles and runs the sampler

    config.sample.guidance_scale = 0.625  # best classifier-FD of w in {0.5, 0.625, 0.75, 1} at 2,700 steps
    return config
