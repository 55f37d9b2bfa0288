"""Reproduce the paper table on the bundled MNIST: Adam, SGD, LNN, Fenchel, Fenchel + warm start.

    python -m experiments.reproduce            # 784-300-10, 10 epochs, 3 seeds (about 7 min on 2 cores)
    python -m experiments.reproduce --quick    # 2 epochs on 10,000 images, 2 seeds (about 2 min)

Runs are resumable (rerun the same command after an interruption); results go
to runs/paper (or --workdir): one workdir per run, table.{md,csv,tex} and PNG
curves.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.plots import make_plots
from experiments.sweep import run_sweep
from experiments.tables import write_tables

CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "mnist_mlp.py")
TRAINERS = ["adam", "sgd", "lnn", "fenchel"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 2)")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    seeds = list(range(args.seeds or (2 if args.quick else 3)))
    workdir = Path(args.workdir or ("runs/paper_quick" if args.quick else "runs/paper"))
    overrides = ["train_size=10000", "total_epochs=2"] if args.quick else []
    dirs = run_sweep([CONFIG], TRAINERS, seeds, workdir, overrides)
    print()
    print(write_tables(dirs, workdir / "table"))
    for path in make_plots(dirs, workdir / "plots"):
        print(path)
    print(f"tables: {workdir / 'table'}.{{md,csv,tex}}")


if __name__ == "__main__":
    main()
