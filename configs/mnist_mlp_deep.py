"""Paper experiment: MNIST 784-300-100-10, ReLU, lifted (Fenchel) training, 10 epochs.

    python -m experiments.run --config configs/mnist_mlp_deep.py --workdir runs/mnist_mlp_deep

Expected: test accuracy in the 97% range from the lifted weights (README).
"""

from configs import default


def get_config():
    c = default.get_config()
    c.hidden = (300, 100)
    return c
