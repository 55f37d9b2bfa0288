"""Sweep: one config × trainers × seeds, one workdir each (resumable).

    python -m experiments.sweep --config configs/mnist_mlp.py --trainers fenchel,adam --seeds 0,1,2 \
        --workdir runs/sweep [--config.total_epochs=3 ...]

Overrides use ml_collections' own `--config.key=value` flags, as in
`experiments.run`. Workdirs are <workdir>/<config name>/<trainer>_seed<k>. A
finished run with the same config is reused, an interrupted one resumes, and
a workdir holding another config is refused (use another --workdir). Every run
is validated before any compute; a failing run is reported and the sweep goes
on, exiting non-zero at the end with a summary of the failures.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import ml_collections
from absl import flags
from ml_collections import config_flags

from experiments.cli import USER_ERRORS, fail, parse_flags

FLAGS = flags.FLAGS


def plan(config: ml_collections.ConfigDict, name: str, trainers, seeds, workdir) -> list:
    """[(config, run workdir)] for every trainer × seed, all validated before any compute."""
    from experiments.train import validate_config
    from experiments.trainers import TRAINERS

    runs = []
    for trainer in trainers:
        if trainer not in TRAINERS:
            raise ValueError(f"unknown trainer {trainer!r}; known: {', '.join(TRAINERS)}")
        for seed in seeds:
            run = ml_collections.ConfigDict(config.to_dict())
            run.trainer, run.seed = trainer, int(seed)
            validate_config(run)
            runs.append((run, Path(workdir) / name / f"{trainer}_seed{seed}"))
    return runs


def run_sweep(config: ml_collections.ConfigDict, name: str, trainers, seeds, workdir) -> tuple[list, list]:
    """Run every planned job; returns (finished workdirs, [(workdir, error message)] of the failed ones)."""
    from experiments.train import check_data, config_differences, current_fingerprint, train_and_evaluate
    from experiments.workdir import Workdir

    runs = plan(config, name, trainers, seeds, workdir)
    done, failed = [], []
    fingerprints = {}  # one read of each dataset, for the finished runs' checks
    for i, (run, run_dir) in enumerate(runs, 1):
        wd = Workdir(run_dir)
        try:
            saved = wd.read_config() if wd.path.is_dir() else None
            diff = config_differences(saved, run) if saved is not None else []
            if diff:
                raise ValueError(f"{run_dir} holds a run with another config (differs in {', '.join(diff)}); "
                                 "use another --workdir for this sweep")
            summary = wd.read_summary() if saved is not None else None
            if summary is not None:
                check_data(summary.get("data_sha256"), current_fingerprint(run, fingerprints), wd.summary_path, run)
                print(f"[{i}/{len(runs)}] {run_dir}: finished already with this config, reused", flush=True)
                done.append(run_dir)
                continue
            print(f"[{i}/{len(runs)}] {run_dir}", flush=True)
            summary = train_and_evaluate(run, run_dir)
        except KeyboardInterrupt:
            raise
        except USER_ERRORS as err:
            print(f"    failed: {err}", flush=True)
            failed.append((run_dir, str(err)))
            continue
        except Exception as err:  # noqa: BLE001 - a bug in one run must not lose the others
            traceback.print_exc()
            failed.append((run_dir, f"{type(err).__name__}: {err}"))
            continue
        print(f"    test accuracy {summary['test_accuracy']:.4f}"
              + (f", warm start {summary['warm_start_test_accuracy']:.4f}" if "warm_start_test_accuracy" in summary
                 else "") + f", {summary['wall_time']:.1f}s", flush=True)
        done.append(run_dir)
    return done, failed


def report_failures(failed) -> None:
    if failed:
        print(f"{len(failed)} run(s) failed:", file=sys.stderr)
        for run_dir, message in failed:
            print(f"  {run_dir}: {message}", file=sys.stderr)


def parse_list(text, cast=str):
    return [cast(t) for t in text.split(",") if t.strip()]


def main(argv=None):
    config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
    flags.DEFINE_string("trainers", "fenchel,lnn,sgd,adam", "Comma-separated trainer names.")
    flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds.")
    flags.DEFINE_string("workdir", None, "Root folder of the sweep's workdirs.")
    rest, config = parse_flags(sys.argv if argv is None else argv)
    if len(rest) > 1:
        fail(f"unexpected arguments: {rest[1:]}")
    if config is None or not FLAGS.workdir:
        fail("usage: python -m experiments.sweep --config configs/<name>.py --workdir <dir> "
             "[--trainers a,b] [--seeds 0,1,2] [--config.key=value ...]")
    try:
        seeds = parse_list(FLAGS.seeds, int)
    except ValueError:
        fail(f"--seeds={FLAGS.seeds!r} must be comma-separated integers")
    name = Path(config_flags.get_config_filename(flags.FLAGS["config"])).stem
    try:
        done, failed = run_sweep(config, name, parse_list(FLAGS.trainers), seeds, FLAGS.workdir)
    except KeyboardInterrupt:
        fail("interrupted; relaunch the same command to resume", 130)
    except USER_ERRORS as err:
        fail(str(err))
    for d in done:
        print(d)
    report_failures(failed)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
