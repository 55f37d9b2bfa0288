"""Default configuration: every field the launcher understands.

    python -m experiments.run --config configs/default.py --workdir runs/default

Lifted (Fenchel) training of MNIST 784-300-10 for 10 epochs (see
configs/mnist_mlp.py for measured figures). Override any field on the
command line: --config.trainer=adam --config.lambda_=2

The base fields below belong to the launcher; each registered trainer
(`experiments.trainers.TRAINERS`) adds the fields it owns, with their one
default (the lifted ones come from `fenchel.LiftedConfig`).
"""

import ml_collections

from experiments.trainers import all_fields


def get_config():
    c = ml_collections.ConfigDict()
    # data
    c.dataset = "mnist"  # mnist | fashion_mnist | cifar10 | npz
    c.data_dir = ""  # empty: bundled MNIST / Debian's Fashion-MNIST; required for cifar10
    c.data_file = ""  # dataset=npz: the .npz file with x_train, y_train, x_test, y_test
    c.val_size = 0  # seeded validation split taken from the training set
    c.train_size = 0  # 0: all training examples (after the validation split)
    c.test_size = 0  # 0: all test examples
    c.normalize = False  # per-channel standardisation
    # model: hidden layers in order; the output layer (one unit per class) is added
    c.layers = "dense:300"  # e.g. "dense:300,dense:100"
    c.activation = "relu"  # relu | leaky_relu | sigmoid | tanh
    c.negative_slope = 0.01  # leaky_relu only
    c.loss = "softmax"  # softmax | squared
    # training
    c.trainer = "fenchel"  # a name in experiments.trainers.TRAINERS: fenchel | lnn | sgd | adam
    c.seed = 0
    c.batch_size = 100
    c.total_epochs = 10  # training length; set exactly one of total_epochs / total_steps
    c.total_steps = 0  # minibatch steps; rounded up to whole epochs
    # evaluation, logging, safety
    c.eval_every_epochs = 1
    c.divergence_factor = 10.0  # stop when the training loss exceeds this multiple of its initial value
    c.record_every = 0  # save the parameters every this many steps to <workdir>/history (0: off)
    c.history_max_mb = 512.0  # recording stops once the history reaches this size
    c.record_staircase = False  # lifted, alternations=1, record_every=1: also θ after each W block (see docs/lca.md)
    c.progress = True  # tqdm progress bar with ETA
    # devices (see fenchel/sharding.py; results equal the one-device run's up to float rounding)
    c.mesh_data = 1  # devices on the data-parallel mesh axis (0: all); batch_size must be a multiple
    c.mesh_model = 1  # devices on the model axis: hidden layers' neurons split over them (a width must divide)
    c.distributed = False  # multi-host: jax.distributed.initialize() first; process 0 alone writes the workdir
    c.coordinator_address = ""  # distributed: "host:port" of process 0 ("": detected from the cluster)
    c.num_processes = 0  # distributed: 0 = detected
    c.process_id = -1  # distributed: -1 = detected
    for key, value in all_fields().items():
        setattr(c, key, value)
    return c
