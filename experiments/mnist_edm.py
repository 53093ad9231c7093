"""MNIST, class-conditional, under EDM (Karras et al. 2022): the UNet of experiments/mnist.py
preconditioned by Table 1 (sigma_data = 0.5, ln sigma ~ N(-1.2, 1.2^2), EDM's loss weight),
sampled with DPM-Solver++(2M), 20 steps = 20 network calls (on the oracles of
docs/samplers.md it beats Heun on EDM's rho grid at this budget; `--config.sample.method=heun
--config.sample.num_steps=18` is EDM's own 35-call setting).

Only the diffusion process, its objective and the sampler differ from experiments/mnist.py,
so the two train the same network at the same cost per step. Not yet measured end to end
against the ddpm recipe (issue #16); docs/samplers.md has the samplers' oracle errors.
"""

from experiments import mnist


def get_config():
    config = mnist.get_config()
    config.experiment = "mnist_edm"
    d = config.diffusion
    d.process = "edm"
    d.prediction = "edm"  # the network predicts F of D = c_skip x + c_out F
    d.loss_weighting = "edm"  # lambda(sigma) = 1 / c_out^2: unit weight on F
    s = config.sample
    s.method = "dpm_solver_pp"
    s.num_steps = 20  # 20 NFE
    return config
