"""LeNet-5 on MNIST, lifted training with outer momentum and 4 FISTA iterations per X block and 2 per W block: the
settings of `configs/mnist_lenet5_momentum.py` (β = 0.9, ρ' = 1 hidden / 10 output, 18 epochs) between its 10 / 3
and the 3 / 2 of `configs/mnist_lenet5_momentum_fast.py`. Measured over seeds 0–2 (docs/lenet5.md):
98.85 ± 0.08% test accuracy after 18 epochs, and an epoch 4.68–4.74× an Adam epoch on the 2-core CPU (two runs
of `python -m experiments.bench --sections epoch --x-steps 4 --w-steps 2 --reps 21`).

    python -m experiments.run --config configs/mnist_lenet5_momentum_x4w2.py --workdir runs/mnist_lenet5_x4w2
"""

from configs import mnist_lenet5_momentum


def get_config():
    c = mnist_lenet5_momentum.get_config()
    c.x_max_steps = 4
    c.w_max_steps = 2
    return c
