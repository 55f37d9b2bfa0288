"""Where lifted training starts from: random weights, a short backprop (SGD) warm-up, or a readout-first phase.

    python -m experiments.start_study --activation tanh --sgd-examples 10000 --epochs 3
    python -m experiments.start_study --activation tanh --readout-examples 60000 --epochs 2
    python -m experiments.start_study --activation sigmoid --sgd-examples 180000 --epochs 1   # 3 SGD epochs first

The start phase runs on the first N training examples (batch 100, one pass; N above the training-set size runs
whole epochs and then the rest): `--sgd-examples N` trains every layer by SGD (lr 0.05, momentum 0.9);
`--readout-examples N` trains lifted with the hidden layers held in place by ρ' = 1e4 (only the output layer
learns). Then `--epochs` lifted epochs with the config's settings. Prints test accuracy and training loss after
the start phase and after each lifted epoch (docs/time_to_accuracy.md, "Sigmoid and tanh accuracy").
"""

from __future__ import annotations

import argparse

import ml_collections

from experiments import loop
from experiments.configs_util import load_config
from experiments.train import Job
from experiments.trainers import TRAINERS

HOLD_RHO_PROX = 1e4  # ρ' of the hidden layers in the readout-first phase: they barely move


def _examples(job: Job, trainer, state, n: int):
    """One pass of `trainer` over the first n training examples (whole epochs first where n exceeds the set)."""
    size = int(job.x_train.shape[0])
    epoch = 0
    while n > 0:
        k = min(n, size)
        state, _ = loop.run_epoch(trainer, state, job.x_train[:k], job.y_train[:k], seed=job.config.seed,
                                  epoch=1000 + epoch, batch_size=job.config.batch_size)
        n, epoch = n - k, epoch + 1
    return state


def run(config: ml_collections.ConfigDict, sgd_examples: int = 0, readout_examples: int = 0, epochs: int = 3,
        log=print) -> list[dict]:
    """[{"phase", "test_accuracy", "train_loss"}]: after the start phase, then after each lifted epoch."""
    if sgd_examples < 0 or readout_examples < 0 or epochs < 0:
        raise ValueError("--sgd-examples, --readout-examples and --epochs must be ≥ 0")
    if sgd_examples and readout_examples:
        raise ValueError("choose one start: --sgd-examples or --readout-examples")
    base = ml_collections.ConfigDict(config.to_dict())
    base.trainer = "fenchel"
    base.progress = False
    job = Job(base)
    params = job.params0
    if sgd_examples:
        sgd_config = ml_collections.ConfigDict(base.to_dict())
        sgd_config.trainer = "sgd"
        sgd = TRAINERS["sgd"].build(sgd_config, job.layers, job.penalty)
        params = sgd.params(_examples(job, sgd, sgd.init(params), sgd_examples))
        phase = f"SGD on {sgd_examples} examples"
    elif readout_examples:
        hold = ml_collections.ConfigDict(base.to_dict())
        hold.rho_prox_per_layer = (HOLD_RHO_PROX,) * (len(job.layers) - 1) + (base.rho_prox,)
        readout = TRAINERS["fenchel"].build(hold, job.layers, job.penalty)
        params = readout.params(_examples(job, readout, readout.init(params), readout_examples))
        phase = f"readout first on {readout_examples} examples"
    else:
        phase = "random initialisation"
    records = [{"phase": phase, "test_accuracy": job.test_accuracy(params), "train_loss": job.train_loss(params)}]
    log(f"{phase}: test accuracy {records[-1]['test_accuracy']:.4f}, train loss {records[-1]['train_loss']:.4f}")
    lifted = job.trainer
    state = lifted.init(params)
    for e in range(epochs):
        state, _ = job.fit_epoch(lifted, state, e)
        params = lifted.params(state)
        records.append({"phase": f"lifted epoch {e + 1}", "test_accuracy": job.test_accuracy(params),
                        "train_loss": job.train_loss(params)})
        log(f"  lifted epoch {e + 1}: test accuracy {records[-1]['test_accuracy']:.4f}, "
            f"train loss {records[-1]['train_loss']:.4f}")
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.start_study", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mnist_mlp.py")
    parser.add_argument("--activation", default=None, help="overrides the config's activation")
    parser.add_argument("--sgd-examples", type=int, default=0)
    parser.add_argument("--readout-examples", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    from experiments.cli import USER_ERRORS, fail

    try:
        config = load_config(args.config)
        if args.activation:
            config.activation = args.activation
        run(config, args.sgd_examples, args.readout_examples, args.epochs)
    except USER_ERRORS as err:
        fail(str(err).splitlines()[0] if str(err) else type(err).__name__)


if __name__ == "__main__":
    main()
