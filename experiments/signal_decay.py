"""How far one lifted minibatch update moves each layer from the forward pass: the downstream signal's decay.

For one minibatch at the initial weights, it prints ‖X_l^new − φ(U_{l−1})‖ / ‖φ(U_{l−1})‖ after the X step (X
blocks from the forward pass, in the configured schedule) and ‖W_l^new − W_l‖ / ‖W_l‖ after the W step that
follows, per layer. In a sequential sweep the X blocks update from the output down; each X_l moves only as far as
the mismatch B(A(X_l) + b, X_{l+1}) above it pulls it against λ_{l−1} B(U_{l−1}, X_l), so the moves shrink layer by
layer, and a layer whose X barely moves keeps its weights (its W block's target is its own forward pass).

    python -m experiments.signal_decay --config configs/mnist_lenet5.py
    python -m experiments.signal_decay --config configs/mnist_mlp.py --config.layers=dense:300,dense:100
"""

from __future__ import annotations

import sys

import jax.numpy as jnp
from absl import flags
from ml_collections import config_flags

from experiments.cli import USER_ERRORS, fail, parse_flags
from experiments.train import Job, validate_config
from fenchel import LiftedTrainer


def relative_moves(job: Job, batch: int = 0) -> dict:
    """{"x": per hidden layer ‖X_new − X_ff‖/‖X_ff‖, "w": per layer ‖W_new − W‖/‖W‖} for one minibatch update."""
    trainer, params = job.trainer, job.params0
    if not isinstance(trainer, LiftedTrainer):
        raise ValueError(f"signal_decay needs a lifted trainer, got trainer={job.config.trainer!r}")
    bs = job.config.batch_size
    x0, y = job.x_train[batch * bs:(batch + 1) * bs], job.y_train[batch * bs:(batch + 1) * bs]
    xs = trainer.forward(params, x0)
    new_xs, _ = trainer.x_step(params, xs, x0, y)
    new_params, _ = trainer.w_step(params, new_xs, x0, y, params)  # anchors = the weights, as in a minibatch

    def rel(a, b):
        return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))

    return {"x": [rel(a, b) for a, b in zip(new_xs, xs)],
            "w": [rel(a["kernel"], b["kernel"]) for a, b in zip(new_params, params)]}


def main(argv=None):
    """Parse --config (and its overrides) and --batch, then print the table. Flags are defined here, not at import,
    so that importing `relative_moves` defines no absl flag."""
    config_flags.DEFINE_config_file("config", None, "config file", lock_config=True)
    flags.DEFINE_integer("batch", 0, "minibatch index (of batch_size training images)")
    _, config = parse_flags(sys.argv if argv is None else argv)
    if config is None:
        fail("--config is required")
    try:
        validate_config(config)
        job = Job(config)
        moves = relative_moves(job, flags.FLAGS.batch)
    except USER_ERRORS as err:
        fail(str(err))
    print(f"{job.architecture}, one minibatch of {job.config.batch_size} at the initial weights (seed {config.seed})")
    print("| layer | X move | W move |")
    print("|---|---|---|")
    for l, w in enumerate(moves["w"]):
        x = f"{moves['x'][l - 1]:.2e}" if l >= 1 else ""
        print(f"| {l} | {x} | {w:.2e} |")


if __name__ == "__main__":
    main()
