"""MNIST MeanFlow on the DiT of experiments/mnist_dit.py instead of the UNet: the comparison of
issue #23 ("the UNet or the DiT, whichever is better per CPU-second").

experiments/mnist_meanflow.py's objective, (t, r) draws, guidance (omega = 1.5) and sampler on
the 0.57M-parameter DiT (4x4 patches, width 64, 6 blocks, U-ViT long skips, a 16-channel conv
stem) with its optimiser (Muon on the Dense kernels, lr 2e-3, 300 warm-up steps, cosine decay)
and the interval input. Measured with the MeanFlow settings of 2026-12-03 (conditional tangent,
logit-normal (-0.4, 1) draws), before mnist_meanflow.py changed them (docs/flow_maps.md, "The DiT
against the UNet"): a step costs half the UNet's (0.27 s against 0.56 s, bench/bench_train.py),
but per step it learns the average velocity more slowly: after 2,000 steps (the wall of ~1,000
UNet steps) one call was at 17.6x the floor and two at 3.0x, where the UNet on the same settings
was at 9.0x and 1.8x after 1,400 (the first goal run: another day's VM and classifier). Hence the UNet in experiments/mnist_meanflow.py. That run:

    python launch.py --config experiments/mnist_meanflow_dit.py --config.training.num_steps=2000 \
        --config.diffusion.meanflow.tangent=conditional \
        --config.diffusion.flow.t_sampling=logit_normal --config.diffusion.flow.logit_mean=-0.4
"""

from experiments import mnist_dit, mnist_meanflow


def get_config():
    config = mnist_meanflow.get_config()
    dit = mnist_dit.get_config()
    config.experiment = "mnist_meanflow_dit"
    with config.unlocked():
        config.model = dit.model
    config.model.interval_input = True  # h = t - r through its own embedding, added to t's
    t, t_dit = config.training, dit.training
    for field in ("optimizer", "weight_decay", "learning_rate", "muon_lr_scale", "lr_schedule", "warmup_steps"):
        t[field] = t_dit[field]
    return config
