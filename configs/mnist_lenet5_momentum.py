"""LeNet-5 on MNIST (configs/mnist_lenet5.py), lifted training with outer momentum at the authors' budget:
heavy-ball momentum β = 0.9 on the minibatch updates, ρ' = 1 on the four hidden layers and 10 on the output
layer (the MLP settings of configs/mnist_mlp_momentum.py, not tuned for the CNN), 18 epochs, no warm start.

    python -m experiments.run --config configs/mnist_lenet5_momentum.py --workdir runs/mnist_lenet5_momentum
    python -m experiments.reproduce --config configs/mnist_lenet5_momentum.py --trainers fenchel,adam,sgd \
        --seeds 3 --workdir runs/lenet18_momentum

About 36 minutes per lifted run on one core of the 2-core CPU; results: docs/lenet5.md.
"""

from configs import mnist_lenet5


def get_config():
    c = mnist_lenet5.get_config()
    c.outer_momentum = 0.9
    c.rho_prox_per_layer = (1.0, 1.0, 1.0, 1.0, 10.0)
    c.total_epochs = 18
    c.warm_start_epochs = 0
    return c
