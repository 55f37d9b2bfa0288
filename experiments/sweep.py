"""Sweep: configs × trainers × seeds, one workdir each (resumable).

    python -m experiments.sweep --configs configs/mnist_mlp.py --trainers fenchel,adam \
        --seeds 0,1,2 --workdir runs/sweep [--set total_epochs=3 ...]

Workdirs are <workdir>/<config>/<trainer>_seed<k>; an existing finished run is
skipped, an interrupted one resumes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments.configs_util import apply_overrides, load_config
from experiments.train import TRAINERS, train_and_evaluate, validate_config


def plan(configs, trainers, seeds, workdir, overrides=()):
    """[(config, run workdir)] for every combination, all validated before any compute."""
    runs = []
    for path in configs:
        base = apply_overrides(load_config(path), overrides)
        for trainer in trainers:
            if trainer not in TRAINERS:
                raise ValueError(f"unknown trainer {trainer!r}; known: {', '.join(TRAINERS)}")
            for seed in seeds:
                config = apply_overrides(base, [f"trainer={trainer!r}", f"seed={seed}"])
                validate_config(config)
                runs.append((config, Path(workdir) / Path(path).stem / f"{trainer}_seed{seed}"))
    return runs


def run_sweep(configs, trainers, seeds, workdir, overrides=()) -> list[Path]:
    runs = plan(configs, trainers, seeds, workdir, overrides)
    for i, (config, run_dir) in enumerate(runs, 1):
        if (run_dir / "summary.json").exists():
            print(f"[{i}/{len(runs)}] {run_dir}: done already", flush=True)
            continue
        print(f"[{i}/{len(runs)}] {run_dir}", flush=True)
        summary = train_and_evaluate(config, run_dir)
        print(f"    test accuracy {summary['test_accuracy']:.4f}"
              + (f", warm start {summary['warm_start_test_accuracy']:.4f}" if "warm_start_test_accuracy" in summary
                 else "") + f", {summary['wall_time']:.1f}s", flush=True)
    return [d for _, d in runs]


def parse_list(text, cast=str):
    return [cast(t) for t in text.split(",") if t]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", required=True, help="comma-separated config files")
    p.add_argument("--trainers", default="fenchel,lnn,sgd,adam")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workdir", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    args = p.parse_args(argv)
    dirs = run_sweep(parse_list(args.configs), parse_list(args.trainers), parse_list(args.seeds, int), args.workdir,
                     args.set)
    print(json.dumps([str(d) for d in dirs]))


if __name__ == "__main__":
    main()
