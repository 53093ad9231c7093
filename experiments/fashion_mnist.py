"""Fashion-MNIST: the mnist experiment's model and schedule on the 28x28 clothing images.

Clothes have more texture than digits, so the run is longer.
"""

from experiments import mnist


def get_config():
    config = mnist.get_config()
    config.experiment = "fashion_mnist"
    # EDM's noise levels and 2,800 steps, as measured; experiments/mnist.py moved to EDM2's levels
    config.diffusion.edm.p_mean = -1.2
    config.diffusion.edm.p_std = 1.2
    config.training.num_steps = 2800
    config.training.sample_every_steps = 1400
    config.sample.guidance_scale = 0.5
    config.data.dataset = "fashion_mnist"
    config.data.random_flip = True  # bool; clothes are left-right symmetric enough
    return config
