"""Paper experiment: MNIST 784-300-10, ReLU, lifted (Fenchel) training, 10 epochs.

    python -m experiments.run --config configs/mnist_mlp.py --workdir runs/mnist_mlp

Expected: test accuracy about 97.5% from the lifted weights alone after 10
epochs (README has the measured table). Baselines on the same harness:
--config.trainer=adam | sgd | lnn.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.hidden = (300,)
    return c
