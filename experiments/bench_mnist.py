"""Benchmark: lifted BCD against Adam on MNIST 784-300-10, measured in one run.

Prints test accuracy of the feed-forward network with lifted weights after
selected epochs, after warm start + 1 Adam epoch, Adam from scratch at the same
epochs, and the median wall time of one epoch of each (compilation excluded:
the first epoch of each trainer is preceded by a warm-up call on one batch).

    python -m experiments.bench_mnist                  # the full 10-epoch run
    python -m experiments.bench_mnist --epochs 2       # quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from configs import default as default_config
from experiments.configs_util import apply_overrides
from experiments.train import lifted_config
from fenchel import LiftedTrainer
from fenchel.data import load_dataset
from fenchel.models import OptaxTrainer, evaluate, init_params, make_mlp, make_optimizer, to_flax


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--report-epochs", type=str, default="1,5,10")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--hidden", type=str, default="300", help="comma-separated hidden widths")
    d = default_config.get_config()
    p.add_argument("--lambdas", type=float, default=d.lambda_)
    p.add_argument("--rho", type=float, default=d.rho)
    p.add_argument("--rho-prox", type=float, default=d.rho_prox)
    p.add_argument("--x-steps", type=int, default=d.x_max_steps)
    p.add_argument("--w-steps", type=int, default=d.w_max_steps)
    p.add_argument("--w-mode", type=str, default=d.w_mode)
    p.add_argument("--alternations", type=int, default=d.alternations)
    p.add_argument("--schedule", type=str, default=d.schedule)
    p.add_argument("--adam-lr", type=float, default=1e-3)
    p.add_argument("--finetune-lr", type=float, default=d.warm_start_lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=str, default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    report = sorted({int(e) for e in args.report_epochs.split(",") if int(e) <= args.epochs} | {args.epochs})
    data = load_dataset("mnist")
    x_train, labels_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    y_train = jax.nn.one_hot(labels_train, 10)
    sizes = (784, *[int(h) for h in args.hidden.split(",")], 10)
    model = make_mlp(sizes)
    params0 = init_params(model, jax.random.PRNGKey(args.seed), sizes[0])

    def test_acc(variables):
        return evaluate(model, variables, data.x_test, data.y_test)

    # ---- lifted
    cfg = lifted_config(apply_overrides(default_config.get_config(), [
        f"lambda_={args.lambdas}", f"rho={args.rho}", f"rho_prox={args.rho_prox}", f"schedule={args.schedule!r}",
        f"alternations={args.alternations}", f"w_mode={args.w_mode!r}", f"x_max_steps={args.x_steps}",
        f"w_max_steps={args.w_steps}"]))
    lifted = LiftedTrainer(cfg, len(sizes) - 1)
    bs = args.batch_size
    jax.block_until_ready(lifted.minibatch_update(params0, x_train[:bs], y_train[:bs]))  # compile
    params, key = params0, jax.random.PRNGKey(args.seed + 1)
    lifted_acc, lifted_times, lifted_params = {}, [], {}
    for epoch in range(1, args.epochs + 1):
        key, sub = jax.random.split(key)
        params, metrics, seconds = lifted.run_epoch(params, x_train, y_train, bs, sub)
        lifted_times.append(seconds)
        if epoch in report:
            lifted_acc[epoch] = test_acc(to_flax(params))
            lifted_params[epoch] = params
        acc = f"  test acc {lifted_acc[epoch]:.4f}" if epoch in lifted_acc else ""
        print(f"lifted epoch {epoch}: {seconds:.2f}s  worst residuals: X {float(metrics.x_residual):.2e}, "
              f"W {float(metrics.w_residual):.2e}{acc}", flush=True)

    # ---- Adam from scratch, and warm start + 1 Adam epoch
    adam = OptaxTrainer(model, make_optimizer("adam", args.adam_lr))
    variables, opt_state = adam.init(params0)
    jax.block_until_ready(adam.step(variables, opt_state, x_train[:bs], labels_train[:bs]))  # compile
    adam_acc, adam_times = {}, []
    key = jax.random.PRNGKey(args.seed + 1)
    for epoch in range(1, args.epochs + 1):
        key, sub = jax.random.split(key)
        variables, opt_state, _, seconds = adam.run_epoch(variables, opt_state, x_train, labels_train, bs, sub)
        adam_times.append(seconds)
        if epoch in report:
            adam_acc[epoch] = test_acc(variables)
        print(f"adam epoch {epoch}: {seconds:.2f}s" + (f"  test acc {adam_acc[epoch]:.4f}" if epoch in adam_acc
                                                         else ""), flush=True)
    finetune = OptaxTrainer(model, make_optimizer("adam", args.finetune_lr))
    warm = {}
    for epoch, p in lifted_params.items():
        v, s = finetune.init(p)
        v, s, _, _ = finetune.run_epoch(v, s, x_train, labels_train, bs, jax.random.PRNGKey(args.seed + 2))
        warm[epoch] = test_acc(v)

    med_l, med_a = statistics.median(lifted_times), statistics.median(adam_times)
    print()
    print(f"MNIST {'-'.join(map(str, sizes))}, batch {bs}, {jax.devices()[0].platform}, "
          f"{platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}")
    print(f"lifted: lambda={args.lambdas} rho={args.rho} rho'={args.rho_prox} x_steps={args.x_steps} "
          f"w_steps={args.w_steps} w_mode={args.w_mode} schedule={args.schedule} alternations={args.alternations}")
    print("| epoch | lifted | lifted + 1 Adam epoch | Adam |")
    print("|---|---|---|---|")
    for e in report:
        print(f"| {e} | {lifted_acc[e]:.4f} | {warm[e]:.4f} | {adam_acc[e]:.4f} |")
    print(f"median epoch wall time: lifted {med_l:.2f}s, Adam {med_a:.2f}s, ratio {med_l / med_a:.2f}")
    result = {"sizes": sizes, "args": vars(args), "lifted_acc": lifted_acc, "warm_start_acc": warm,
              "adam_acc": adam_acc, "lifted_epoch_s": lifted_times, "adam_epoch_s": adam_times,
              "median_ratio": med_l / med_a}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
