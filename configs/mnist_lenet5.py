"""LeNet-5 on MNIST, lifted (Fenchel) training: conv 6@5×5 (SAME, i.e. MNIST's 28×28 as the padded 32×32)
→ avgpool 2 → conv 16@5×5 → avgpool 2 → 120 → 84 → 10, ReLU.

    python -m experiments.run --config configs/mnist_lenet5.py --workdir runs/mnist_lenet5

Pooling is folded into the next layer's linear map (the lifted X hold the un-pooled maps). Baselines on the
same flax CNN: --config.trainer=adam | sgd. Figures: see docs/lenet5.md.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.layers = "conv:6:5:same,pool:2,conv:16:5,pool:2,dense:120,dense:84"
    c.batch_size = 100
    c.total_epochs = 3
    # No relaxation bound in the per-epoch metrics: for this CNN one X sweep to tolerance on the 1,000-image
    # objective batch costs about 40 s on the 2-core CPU (up to 200 iterations per block), 50 sweeps up to half an
    # hour. --config.bound_max_sweeps=K turns it back on.
    c.bound_max_sweeps = 0
    c.w_max_steps = 3  # the W budget its measured figures (docs/lenet5.md) were taken with
    return c
