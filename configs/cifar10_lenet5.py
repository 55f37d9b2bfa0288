"""LeNet-5 on CIFAR-10 (3 channels, 32×32; VALID first convolution as in the original LeNet-5).

CIFAR-10 is not bundled: --config.data_dir=<the cifar-10-batches-py folder>.

    python -m experiments.run --config configs/cifar10_lenet5.py --workdir runs/cifar10_lenet5 \
        --config.data_dir=/path/to/cifar-10-batches-py
"""

from configs import mnist_lenet5


def get_config():
    c = mnist_lenet5.get_config()
    c.dataset = "cifar10"
    c.normalize = True
    c.layers = "conv:6:5,pool:2,conv:16:5,pool:2,dense:120,dense:84"
    return c
