"""Launcher: python -m experiments.run --config configs/<name>.py --workdir <dir> [--config.x=v ...]"""

import sys

from absl import app, flags
from ml_collections import config_flags

from experiments.train import train_and_evaluate
from fenchel.data import DataError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where config.json, metrics.jsonl, checkpoints and summary.json go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        summary = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (ValueError, DataError, FileNotFoundError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()
                   if not isinstance(v, list)))


if __name__ == "__main__":
    app.run(main)
