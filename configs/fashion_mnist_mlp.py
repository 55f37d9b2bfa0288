"""Paper experiment: Fashion-MNIST 784-300-10, ReLU, lifted (Fenchel) training, 10 epochs.

Needs Fashion-MNIST: `apt-get install dataset-fashion-mnist` (Debian) or
--config.data_dir=<folder with the four IDX files>.

    python -m experiments.run --config configs/fashion_mnist_mlp.py --workdir runs/fmnist_mlp

Expected (measured, seeds 0-2, 2026-11-27): test accuracy 86.99 ± 0.45% from the lifted weights after
10 epochs, 86.76 ± 0.86% after warm start + 1 Adam epoch; 85.77 ± 0.45% and 85.65 ± 1.37% with 3 W
iterations per block, the default before (docs/benchmarks.md, "One W iteration").
"""

from configs import default


def get_config():
    c = default.get_config()
    c.dataset = "fashion_mnist"
    c.layers = "dense:300"
    return c
