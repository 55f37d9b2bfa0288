"""Launcher: python -m experiments.run --config configs/<name>.py --workdir <dir> [--config.key=value ...]"""

import sys

from absl import flags
from ml_collections import config_flags

from experiments.cli import USER_ERRORS, fail, parse_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where config.json, metrics.jsonl, checkpoints and summary.json go.")


def main(argv=None):
    rest, config = parse_flags(sys.argv if argv is None else argv)
    if len(rest) > 1:
        fail(f"unexpected arguments: {rest[1:]}")
    if config is None or not FLAGS.workdir:
        fail("usage: python -m experiments.run --config configs/<name>.py --workdir <dir> [--config.key=value ...]")
    from experiments.train import train_and_evaluate  # after flag parsing: errors there need no jax

    try:
        summary = train_and_evaluate(config, FLAGS.workdir)
    except KeyboardInterrupt:
        fail(f"interrupted; relaunch the same command to resume from the last finished epoch in {FLAGS.workdir}",
             130)
    except USER_ERRORS as err:
        fail(str(err))
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()
                   if not isinstance(v, list)))


if __name__ == "__main__":
    main()
