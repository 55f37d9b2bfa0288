"""Fashion-MNIST 784-300-10, lifted training with outer momentum: the settings of `configs/mnist_mlp_momentum.py`
(β = 0.9, ρ' = 1 hidden / 10 output), unchanged.

    python -m experiments.run --config configs/fashion_mnist_mlp_momentum.py --workdir runs/fmnist_momentum

Measured results: docs/outer_momentum.md.
"""

from configs import fashion_mnist_mlp


def get_config():
    c = fashion_mnist_mlp.get_config()
    c.outer_momentum = 0.9
    c.rho_prox_per_layer = (1.0, 10.0)
    c.w_max_steps = 3  # the W budget its measured figures (docs/outer_momentum.md) were taken with
    return c
