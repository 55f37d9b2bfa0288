"""Reproduce the paper table on the bundled MNIST: Adam, SGD, LNN, Fenchel, Fenchel + warm start.

    python -m experiments.reproduce            # 784-300-10, 10 epochs, 3 seeds (about 8 min on 2 cores)
    python -m experiments.reproduce --quick    # 2 epochs on 10,000 images, 2 seeds
    python -m experiments.reproduce --config configs/mnist_lenet5.py --trainers fenchel,adam,sgd   # LeNet-5 rows

Runs are resumable (rerun the same command after an interruption); results go
to runs/paper (or --workdir): one workdir per run, table.{md,csv,tex} and PNG
curves. The trainers are every registered one (`experiments.trainers`) unless
--trainers names some.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.configs_util import load_config
from experiments.plots import make_plots
from experiments.sweep import report_failures, run_sweep
from experiments.tables import write_tables
from experiments.train import validate_config
from experiments.trainers import TRAINERS

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "mnist_mlp.py"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 epochs on 10,000 training images, 2 seeds")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 2)")
    p.add_argument("--trainers", default=",".join(TRAINERS), help="comma-separated (default: every registered one)")
    p.add_argument("--config", default=str(CONFIG), help="config file of the table's row (default: MNIST MLP)")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    seeds = list(range(args.seeds or (2 if args.quick else 3)))
    workdir = Path(args.workdir or ("runs/paper_quick" if args.quick else "runs/paper"))
    config_path = Path(args.config)
    config = load_config(config_path)
    if args.quick:
        config.train_size, config.total_epochs = 10000, 2
    trainers = []
    for name in (t for t in args.trainers.split(",") if t):
        trial = load_config(config_path)
        trial.trainer = name
        try:
            validate_config(trial)
            trainers.append(name)
        except ValueError as err:  # e.g. a dense-only trainer on a CNN config
            print(f"note: skipping trainer {name!r} for {config_path.name}: {err}", file=sys.stderr)
    if not trainers:
        print(f"error: none of the trainers {args.trainers!r} applies to {config_path}", file=sys.stderr)
        sys.exit(2)
    done, failed = run_sweep(config, config_path.stem, trainers, seeds, workdir)
    print()
    everything = sorted(p for p in workdir.glob("*/*") if (p / "summary.json").exists())  # every row run so far
    print(write_tables(everything or done, workdir / "table"))
    for path in make_plots(everything or done, workdir / "plots"):
        print(path)
    print(f"tables: {workdir / 'table'}.{{md,csv,tex}}")
    report_failures(failed)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
