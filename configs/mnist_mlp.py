"""Paper experiment: MNIST 784-300-10, ReLU, lifted (Fenchel) training, 10 epochs.

    python -m experiments.run --config configs/mnist_mlp.py --workdir runs/mnist_mlp

Expected (measured, seeds 0-2, `python -m experiments.reproduce`): test accuracy
97.75 ± 0.15% from the lifted weights alone after 10 epochs, 97.82 ± 0.10% after
warm start + 1 Adam epoch, about 33 s on 2 CPU cores. Baselines on the same
harness: --config.trainer=adam | sgd | lnn.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.layers = "dense:300"
    return c
