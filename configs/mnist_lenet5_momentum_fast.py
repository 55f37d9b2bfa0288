"""LeNet-5 on MNIST, lifted training with outer momentum and cheaper block solves: the settings of
`configs/mnist_lenet5_momentum.py` (β = 0.9, ρ' = 1 hidden / 10 output, 18 epochs) with 3 FISTA iterations per X
block and 2 per W block instead of 10 and 3, as `configs/mnist_mlp_momentum_fast.py` does for the MLP. The
minibatch update takes about 30% less time (`python -m experiments.bench_lenet --x-steps 3 --w-steps 2`); accuracy
over 3 seeds: docs/lenet5.md.

    python -m experiments.run --config configs/mnist_lenet5_momentum_fast.py --workdir runs/mnist_lenet5_fast
"""

from configs import mnist_lenet5_momentum


def get_config():
    c = mnist_lenet5_momentum.get_config()
    c.x_max_steps = 3
    c.w_max_steps = 2
    return c
