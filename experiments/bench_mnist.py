"""Benchmark: lifted BCD against Adam on MNIST 784-300-10, measured in one run.

Prints test accuracy of the feed-forward network with lifted weights after
selected epochs, after warm start + 1 Adam epoch, Adam from scratch at the same
epochs, and the median wall time of one epoch of each (compilation excluded:
each trainer first takes one warm-up step through the epoch's own program). Both trainers run through the
launcher's own pieces: the trainer registry and the shared epoch loop.

    python -m experiments.bench_mnist                  # the full 10-epoch run
    python -m experiments.bench_mnist --epochs 2       # quick look
    python -m experiments.bench_mnist --dataset fashion_mnist --lambda-update continuation   # time to 87%
    python -m experiments.bench_mnist --outer-momentum 0.9 --rho-prox-per-layer 1.0,10.0     # outer momentum

Time to accuracy: the training seconds (evaluation excluded) until the first epoch whose test accuracy reaches
--target (default 97.5% on MNIST, 87% on Fashion-MNIST), for each trainer in the same run; test accuracy is
evaluated after every epoch for it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax

from configs import default as default_config
from experiments import loop
from experiments.train import Job
from experiments.trainers import warm_start


def parse_args(argv=None):
    d = default_config.get_config()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=str, default=d.dataset, help="mnist | fashion_mnist | …")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--report-epochs", type=str, default="1,5,10")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--layers", type=str, default=d.layers)
    p.add_argument("--lambdas", type=float, default=d.lambda_)
    p.add_argument("--rho", type=float, default=d.rho)
    p.add_argument("--rho-prox", type=float, default=d.rho_prox)
    p.add_argument("--rho-prox-per-layer", type=str, default="",
                   help="comma-separated ρ', one per layer (overrides --rho-prox), e.g. 1.0,10.0")
    p.add_argument("--x-steps", type=int, default=d.x_max_steps)
    p.add_argument("--w-steps", type=int, default=d.w_max_steps)
    p.add_argument("--w-mode", type=str, default=d.w_mode)
    p.add_argument("--alternations", type=int, default=d.alternations)
    p.add_argument("--schedule", type=str, default=d.schedule)
    p.add_argument("--adam-lr", type=float, default=1e-3)
    p.add_argument("--finetune-lr", type=float, default=d.warm_start_lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--activation", type=str, default=d.activation)
    p.add_argument("--lambda-update", type=str, default=d.lambda_update, help="fixed | continuation | dual")
    p.add_argument("--outer-momentum", type=float, default=d.outer_momentum,
                   help="heavy-ball momentum on the lifted updates (0: none)")
    p.add_argument("--target", type=float, default=None,
                   help="test accuracy for the time-to-accuracy figure (default 0.975 MNIST, 0.87 otherwise)")
    p.add_argument("--json", type=str, default=None, help="also write the results here")
    return p.parse_args(argv)


def configs(args):
    """The lifted and Adam launcher configs of this benchmark, built directly."""
    lifted = default_config.get_config()
    lifted.update(dict(trainer="fenchel", dataset=args.dataset, layers=args.layers, batch_size=args.batch_size,
                       seed=args.seed, total_epochs=args.epochs, lambda_=args.lambdas, rho=args.rho,
                       rho_prox=args.rho_prox, x_max_steps=args.x_steps, w_max_steps=args.w_steps, w_mode=args.w_mode,
                       alternations=args.alternations, schedule=args.schedule, warm_start_epochs=1,
                       warm_start_lr=args.finetune_lr, progress=False, activation=args.activation,
                       lambda_update=args.lambda_update, outer_momentum=args.outer_momentum,
                       rho_prox_per_layer=tuple(float(v) for v in args.rho_prox_per_layer.split(",") if v.strip())))
    adam = default_config.get_config()
    adam.update(dict(trainer="adam", dataset=args.dataset, layers=args.layers, batch_size=args.batch_size,
                     seed=args.seed, total_epochs=args.epochs, learning_rate=args.adam_lr, progress=False,
                     activation=args.activation))
    return lifted, adam


def train(job: Job, report) -> tuple[dict, list, dict]:
    """Train job.trainer for its epochs; (test accuracy at the report epochs, epoch seconds, states there)."""
    trainer, bs = job.trainer, job.config.batch_size
    state = trainer.init(job.params0)
    loop.warm_up(trainer, state, job.x_train, job.y_train, bs)  # compile the epoch's own step program
    accs, times, states = {}, [], {}
    for epoch in range(1, job.total_epochs + 1):
        state, result = job.fit_epoch(trainer, state, epoch)
        times.append(result.seconds)
        if epoch in report:
            accs[epoch], states[epoch] = job.test_accuracy(trainer.params(state)), state
        acc = f"  test acc {accs[epoch]:.4f}" if epoch in accs else ""
        print(f"{job.config.trainer} epoch {epoch}: {result.seconds:.2f}s{acc}", flush=True)
    return accs, times, states


def time_to(accs: dict, seconds: list, target: float) -> tuple:
    """(first epoch with test accuracy ≥ target, training seconds summed up to it), or (None, None)."""
    for epoch in sorted(accs):
        if accs[epoch] >= target:
            return epoch, float(sum(seconds[:epoch]))
    return None, None


def main(argv=None):
    args = parse_args(argv)
    report = sorted({int(e) for e in args.report_epochs.split(",") if int(e) <= args.epochs} | {args.epochs})
    target = args.target if args.target is not None else (0.975 if args.dataset == "mnist" else 0.87)
    every = list(range(1, args.epochs + 1))  # accuracy after every epoch, for the time to target
    lifted_cfg, adam_cfg = configs(args)
    lifted_job, adam_job = Job(lifted_cfg), Job(adam_cfg)
    lifted_acc, lifted_times, lifted_states = train(lifted_job, every)
    adam_acc, adam_times, _ = train(adam_job, every)
    warm = {e: warm_start(lifted_job, s)["warm_start_test_accuracy"] for e, s in lifted_states.items() if e in report}
    reach = {name: time_to(acc, times, target) for name, acc, times in
             (("lifted", lifted_acc, lifted_times), ("adam", adam_acc, adam_times))}

    med_l, med_a = statistics.median(lifted_times), statistics.median(adam_times)
    print()
    print(f"{args.dataset} {lifted_job.architecture}, batch {args.batch_size}, {jax.devices()[0].platform}, "
          f"{platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}")
    print(f"lifted: lambda={args.lambdas} rho={args.rho} rho'={args.rho_prox_per_layer or args.rho_prox} "
          f"x_steps={args.x_steps} w_steps={args.w_steps} w_mode={args.w_mode} schedule={args.schedule} "
          f"alternations={args.alternations} outer_momentum={args.outer_momentum}")
    print("| epoch | lifted | lifted + 1 Adam epoch | Adam |")
    print("|---|---|---|---|")
    for e in report:
        print(f"| {e} | {lifted_acc[e]:.4f} | {warm[e]:.4f} | {adam_acc[e]:.4f} |")
    print(f"median epoch wall time: lifted {med_l:.2f}s, Adam {med_a:.2f}s, ratio {med_l / med_a:.2f}")
    for name, (epoch, seconds) in reach.items():
        print(f"time to {100 * target:.1f}% test accuracy, {name}: " + (
            f"{seconds:.1f}s (epoch {epoch})" if epoch else f"not reached in {args.epochs} epochs"))
    result = {"target": target, "time_to_target": reach,
              "architecture": lifted_job.architecture, "args": vars(args), "lifted_acc": lifted_acc,
              "warm_start_acc": warm, "adam_acc": adam_acc, "lifted_epoch_s": lifted_times,
              "adam_epoch_s": adam_times, "median_ratio": med_l / med_a}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
