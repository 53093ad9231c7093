"""MNIST, class-conditional, in one to a few network calls: shortcut models (Frans et al. 2024)
on the flow process, beside experiments/mnist_meanflow.py (issue #23).

The same UNet with the interval input (here the step size d) learns flow matching at d = 0
on three quarters of each batch and, on the last quarter, the self-consistency target: one
step of size d equals two of d / 2 of the network itself (its current parameters, stop-gradient;
diffusion_jax/flow_maps.py says why not the EMA), d in {1, 1/2, ..., 1/128}. Guidance is trained
into the flow-matching target (omega = 1.5) and so carried up the ladder of step sizes.
`--mode sample` draws with the "shortcut" sampler in 1 call; `--config.sample.num_steps=2` (4, ...).

Measured (docs/flow_maps.md, 2026-12-04, the project's classifier, N = 1,000): after 3,400 steps
one call 7.0x the train-vs-test floor, two calls 2.1x, four 1.5x, conditional accuracy 0.99:
behind experiments/mnist_meanflow.py at one and two calls, ahead at four. A step costs
~1.1x a flow-matching step (bench/bench_flow_maps.py).
"""

from experiments import mnist_meanflow


def get_config():
    config = mnist_meanflow.get_config()
    config.experiment = "mnist_shortcut"
    d = config.diffusion
    d.objective = "shortcut"
    d.flow.t_sampling = "logit_normal"  # flow matching's t: logit-normal (0, 1), as experiments/mnist_flow.py
    d.flow.logit_mean = 0.0
    d.flow.time_scale = 1000.0  # the flow default: no derivative in t is taken here, and the step
    # sizes 1/128 .. 1 sit far apart on the embedding's scale
    s = d.shortcut
    s.bootstrap_fraction = 0.25  # the paper's 1/4 of the batch
    s.num_levels = 7  # d down to 1/128
    s.teacher = "current"
    s.omega = 1.5
    s.kappa = 0.0

    # a shortcut step costs 1.02x the wall (1.10x the CPU time) of a flow-matching step
    # (bench/bench_flow_maps.py, docs/flow_maps.md): ~0.41 s on a quiet machine, 3,400 steps ~ 23 minutes
    config.training.num_steps = 3400
    config.training.sample_every_steps = 1700
    config.sample.method = "shortcut"
    e = config.eval
    e.samplers = ("shortcut",)
    e.guidance_sampler = "shortcut"
    e.strip_sampler = "shortcut"
    return config
