"""How a trainer's update compares with the network's gradient, layer by layer, during training.

    python -m experiments.update_alignment --set activation=tanh
    python -m experiments.update_alignment --set activation=tanh --set outer_momentum=0.9 --set rho_prox=1.0
    python -m experiments.update_alignment --set trainer=sgd --set momentum=0.0

--config names the config file (default configs/mnist_mlp.py, trainer fenchel); each `--set KEY=VALUE` overrides
one field (parsed by its default's type).

Every `--every` steps of training (the launcher's config and trainer; batches from the epoch loop), one update
ΔW = step(W) − W on the next batch is compared with that batch's network gradient g = ∇_W L(W) (mean loss):
  cos_l   cos(ΔW_l, −g_l) of each layer's kernel (1 for plain SGD);
  norm_l  ‖ΔW_l‖ and ‖g_l‖;
  dL_l    L(W with layer l updated alone) − L(W) on that batch, and dL for the whole update;
  fresh   L(W) on the batch before the update (a batch the weights have not yet seen).
With outer momentum, ΔW includes the momentum term. See docs/outer_momentum.md, "Why it works".
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from experiments import loop
from experiments.cli import USER_ERRORS, fail
from experiments.configs_util import load_config
from experiments.reproduce import parse_value
from experiments.train import Job
from fenchel.lifted import forward, loss_per_sample


def _cos(a, b) -> float:
    return float(jnp.vdot(a, b) / jnp.maximum(jnp.linalg.norm(a) * jnp.linalg.norm(b), 1e-30))


def alignment(job: Job, state, idx) -> tuple:
    """(the record of one update on the training rows idx, the state after it)."""
    trainer = job.trainer
    x, y = job.x_train[idx], job.y_train[idx]

    def batch_loss(params):
        return jnp.mean(loss_per_sample(job.config.loss, y, forward(params, x, job.penalty, job.layers)[1]))

    params = trainer.params(state)
    grads = jax.grad(batch_loss)(params)
    state, _ = loop.step_on_rows(trainer)(state, job.x_train, job.y_train, idx)  # the training step itself
    new = trainer.params(state)
    before = float(batch_loss(params))
    record = {"fresh_loss": before, "dL": float(batch_loss(new)) - before, "layers": []}
    for l in range(len(params)):
        delta = new[l]["kernel"] - params[l]["kernel"]
        alone = [*params[:l], new[l], *params[l + 1:]]
        record["layers"].append({"cos": _cos(delta, -grads[l]["kernel"]), "update_norm": float(jnp.linalg.norm(delta)),
                                 "grad_norm": float(jnp.linalg.norm(grads[l]["kernel"])),
                                 "dL": float(batch_loss(alone)) - before})
    return record, state


def run(job: Job, steps: int, every: int, log=print) -> list:
    """Train `steps` steps; every `every` steps (from step 0) record one update (`alignment`)."""
    if steps < 1 or every < 1:
        raise ValueError(f"--steps and --every must be ≥ 1, got {steps} and {every}")
    c, trainer = job.config, job.trainer
    step = loop.step_on_rows(trainer)
    state = trainer.init(job.params0)
    records, done, epoch = [], 0, 0
    while done < steps:
        for idx in loop.epoch_batches(c.seed, epoch, job.x_train.shape[0], c.batch_size):
            if done == steps:
                break
            if done % every == 0:
                rec, state = alignment(job, state, idx)
                records.append({"step": done, **rec})
                layers = " | ".join(f"L{l} cos {r['cos']:+.3f} |ΔW| {r['update_norm']:.2e} |g| {r['grad_norm']:.2e} "
                                    f"dL {r['dL']:+.4f}" for l, r in enumerate(rec["layers"]))
                log(f"step {done:5d} fresh loss {rec['fresh_loss']:.3f} dL {rec['dL']:+.4f} | {layers}")
            else:
                state, _ = step(state, job.x_train, job.y_train, idx)
            done += 1
        epoch += 1
    params = trainer.params(state)
    log(f"after {steps} steps: test accuracy {job.test_accuracy(params):.4f}, train loss {job.train_loss(params):.4f}")
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.update_alignment", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mnist_mlp.py")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=100)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        config.progress = False
        for item in args.set:
            key, eq, value = item.partition("=")
            if not eq or key not in config:
                raise ValueError(f"--set {item!r}: expected KEY=VALUE with a config key")
            config[key] = parse_value(config, key, value.strip())
        run(Job(config), args.steps, args.every)
    except USER_ERRORS as err:
        fail(str(err).splitlines()[0] if str(err) else type(err).__name__)


if __name__ == "__main__":
    main()
