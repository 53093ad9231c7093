"""Fashion-MNIST: the mnist experiment's model and schedule on the 28x28 clothing images.

Clothes have more texture than digits, so the run is longer.
"""

from experiments import mnist


def get_config():
    config = mnist.use_previous_recipe(mnist.get_config())  # the recipe it was measured with
    config.experiment = "fashion_mnist"
    config.data.dataset = "fashion_mnist"
    config.data.random_flip = True  # bool; clothes are left-right symmetric enough
    return config
