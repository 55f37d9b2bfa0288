"""LeNet-5 on Fashion-MNIST (as configs/mnist_lenet5.py). Needs `apt-get install dataset-fashion-mnist`.

    python -m experiments.run --config configs/fashion_lenet5.py --workdir runs/fashion_lenet5
"""

from configs import mnist_lenet5


def get_config():
    c = mnist_lenet5.get_config()
    c.dataset = "fashion_mnist"
    return c
