"""Default configuration: every field the launcher understands.

    python -m experiments.run --config configs/default.py --workdir runs/default

Lifted (Fenchel) training of MNIST 784-300-10 for 10 epochs; expected test
accuracy 97.8% for the lifted weights (measured 97.75 ± 0.15% over seeds 0-2,
see README).
Override any field on the command line: --config.trainer=adam --config.lambda_=2
"""

import ml_collections

TRAINERS = ("fenchel", "lnn", "sgd", "adam")


def get_config():
    c = ml_collections.ConfigDict()
    # data
    c.dataset = "mnist"  # mnist | fashion_mnist | cifar10
    c.data_dir = ""  # empty: bundled MNIST / Debian's Fashion-MNIST; required for cifar10
    c.val_size = 0  # seeded validation split taken from the training set
    c.train_size = 0  # 0: all training examples (after the validation split)
    c.test_size = 0  # 0: all test examples
    c.normalize = False  # per-channel standardisation
    # model
    c.hidden = (300,)  # hidden widths of the MLP
    c.activation = "relu"  # relu | leaky_relu | sigmoid | tanh
    c.negative_slope = 0.01  # leaky_relu only
    c.loss = "softmax"  # softmax | squared
    # training
    c.trainer = "fenchel"  # fenchel | lnn | sgd | adam
    c.seed = 0
    c.batch_size = 100
    c.total_epochs = 10  # training length; set exactly one of total_epochs / total_steps
    c.total_steps = 0  # minibatch steps; rounded up to whole epochs
    # lifted trainers (fenchel, lnn)
    c.lambda_ = 3.0  # λ, the multiplier of every penalty
    c.lambda_per_layer = ()  # optional: one λ per hidden layer, overrides lambda_
    c.rho = 1e-5  # ρ, weight decay Σ ρ‖W‖²
    c.rho_per_layer = ()  # optional: one ρ per layer (hidden layers + output), overrides rho
    c.rho_prox = 0.1  # ρ', proximal term to the minibatch's starting weights
    c.rho_prox_per_layer = ()  # optional: one ρ' per layer, overrides rho_prox
    c.lbd_coef = 1.0  # κ, weight of the downstream term in X steps (1: exact BCD)
    c.alternations = 1  # (X step, W step) rounds per minibatch
    c.schedule = "sequential"  # sequential | parallel
    c.x_mode = "batched"  # batched | vmap
    c.w_mode = "auto"  # auto | primal | kernel | kernel_mm
    c.x_tol = 1e-4
    c.x_max_steps = 10
    c.w_tol = 1e-4
    c.w_max_steps = 3
    # gradient trainers (sgd, adam)
    c.learning_rate = 0.0  # 0: the trainer's default (adam 1e-3, sgd 0.05)
    c.momentum = 0.9  # sgd only
    # warm start: lifted weights → flax model → this many epochs of an optax optimiser
    c.warm_start_epochs = 1  # 0 disables
    c.warm_start_optimizer = "adam"
    c.warm_start_lr = 1e-4
    # evaluation and logging
    c.eval_every_epochs = 1
    c.objective_batch = 1000  # training examples on which the lifted objective is logged
    c.progress = True  # tqdm progress bar with ETA
    return c
