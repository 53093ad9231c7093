"""MNIST, class-conditional, under rectified flow / conditional flow matching (Liu et al. 2022;
Lipman et al. 2023): x_t = (1 - t) x0 + t eps, the UNet of experiments/mnist.py predicts the
velocity eps - x0, t logit-normal (Esser et al. 2024), sampled with Euler from t = 1 over the
uniform ("trailing") grid, 20 steps = 20 network calls.

Only the diffusion process, its objective and the sampler differ from experiments/mnist.py.
Not yet measured end to end against the ddpm recipe (issue #16).
"""

from experiments import mnist


def get_config():
    # the recipe it was measured with (EDM's noise levels are unused by flow, but part of the
    # config a checkpoint is checked against)
    config = mnist.use_previous_recipe(mnist.get_config())
    config.experiment = "mnist_flow"
    d = config.diffusion
    d.process = "flow"
    d.prediction = "velocity"
    d.loss_weighting = "none"  # the flow-matching loss: velocity MSE
    d.flow.t_sampling = "logit_normal"
    s = config.sample
    s.method = "euler"
    s.grid = "trailing"
    s.num_steps = 20
    return config
