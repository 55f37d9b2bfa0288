"""Paper experiment: Fashion-MNIST 784-300-10, ReLU, lifted (Fenchel) training, 10 epochs.

Needs Fashion-MNIST: `apt-get install dataset-fashion-mnist` (Debian) or
--config.data_dir=<folder with the four IDX files>.

    python -m experiments.run --config configs/fashion_mnist_mlp.py --workdir runs/fmnist_mlp

Expected: test accuracy in the high 80% range from the lifted weights.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.dataset = "fashion_mnist"
    c.hidden = (300,)
    return c
