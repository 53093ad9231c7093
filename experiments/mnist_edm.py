"""MNIST, class-conditional, under EDM (Karras et al. 2022): the UNet of experiments/mnist.py
preconditioned by Table 1 (sigma_data = 0.5, ln sigma ~ N(-1.2, 1.2^2), EDM's loss weight),
sampled with Heun (Algorithm 1) on the rho = 7 grid, 10 steps = 19 network calls.

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
    s.method = "heun"
    s.num_steps = 10  # 19 NFE
    return config
