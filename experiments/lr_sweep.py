"""Learning-rate sweep: final test accuracy against learning rate, one curve per trainer (ProxProp's stability).

    python -m experiments.lr_sweep --config configs/mnist_mlp.py --workdir runs/lr_sweep \
        --trainers sgd:learning_rate,proxprop:proxprop_lr --lrs 0.01,0.03,0.1,0.3,1,3,10 --seeds 0 \
        --config.total_epochs=2

Each (trainer, learning rate, seed) is one launcher run in <workdir>/<trainer>_lr<lr>_seed<k> (resumable; a
finished run is reused). A run that diverges (`experiments.train.TrainingDiverged`: a non-finite or exploding
loss) is recorded as diverged, not dropped. Writes <workdir>/lr_sweep.json, lr_sweep.md and lr_sweep.png.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from experiments.cli import USER_ERRORS, fail
from experiments.workdir import atomic_write_bytes, atomic_write_json

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "config file (python, get_config())", lock_config=True)
flags.DEFINE_string("workdir", None, "folder of the runs and the outputs")
flags.DEFINE_string("trainers", "sgd:learning_rate,proxprop:proxprop_lr",
                    "comma-separated TRAINER:LR_FIELD pairs (the config field that holds that trainer's rate)")
flags.DEFINE_string("lrs", "0.01,0.03,0.1,0.3,1,3,10", "comma-separated learning rates")
flags.DEFINE_string("seeds", "0", "comma-separated seeds")


def sweep(config, workdir: Path, trainers, lrs, seeds) -> list[dict]:
    """Run (or reuse) every run; returns one row per run: trainer, lr, seed, test accuracy or diverged."""
    from experiments.train import TrainingDiverged, train_and_evaluate, validate_config

    planned = []
    for trainer, field in trainers:
        for lr in lrs:
            for seed in seeds:
                run = config.copy_and_resolve_references()
                run.trainer, run.seed = trainer, seed
                if field not in run:
                    raise ValueError(f"trainer {trainer!r}: unknown config field {field!r} for its learning rate")
                run[field] = lr
                validate_config(run)
                planned.append((trainer, lr, seed, run, workdir / f"{trainer}_lr{lr:g}_seed{seed}"))
    rows = []
    for i, (trainer, lr, seed, run, path) in enumerate(planned, 1):
        print(f"[{i}/{len(planned)}] {path}", file=sys.stderr, flush=True)
        row = {"trainer": trainer, "lr": lr, "seed": seed, "workdir": str(path)}
        try:
            row["test_accuracy"] = train_and_evaluate(run, path)["test_accuracy"]
        except TrainingDiverged as err:
            row["diverged"] = str(err).split(";")[0]
        rows.append(row)
    return rows


def report(rows: list[dict], out: Path) -> None:
    """lr_sweep.json, a markdown table (mean accuracy over seeds, or 'diverged') and the plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    atomic_write_json(out / "lr_sweep.json", rows)
    trainers = list(dict.fromkeys(r["trainer"] for r in rows))
    lrs = sorted({r["lr"] for r in rows})

    def cell(trainer, lr):
        runs = [r for r in rows if r["trainer"] == trainer and r["lr"] == lr]
        accs = [r["test_accuracy"] for r in runs if "test_accuracy" in r]
        diverged = len(runs) - len(accs)
        text = f"{100 * sum(accs) / len(accs):.2f}" if accs else ""
        return (text + (f" ({diverged} diverged)" if accs and diverged else "diverged" if diverged else "")), accs

    lines = ["| learning rate | " + " | ".join(trainers) + " |", "|---|" + "---|" * len(trainers)]
    for lr in lrs:
        lines.append(f"| {lr:g} | " + " | ".join(cell(t, lr)[0] for t in trainers) + " |")
    atomic_write_bytes(out / "lr_sweep.md", ("\n".join(lines) + "\n").encode())
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for trainer in trainers:
        points = [(lr, sum(a) / len(a)) for lr in lrs for a in [cell(trainer, lr)[1]] if a]
        bad = [lr for lr in lrs if cell(trainer, lr)[0] == "diverged"]
        line, = ax.plot([p[0] for p in points], [100 * p[1] for p in points], "o-", label=trainer)
        if bad:
            ax.plot(bad, [10.0] * len(bad), "x", color=line.get_color(), markersize=9)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final test accuracy (%)  [x: diverged]")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out / "lr_sweep.png.tmp"
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    tmp.replace(out / "lr_sweep.png")
    print("\n".join(lines))


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}")
    if FLAGS.config is None or FLAGS.workdir is None:
        fail("--config and --workdir are required")
    try:
        trainers = [tuple(item.split(":", 1)) for item in FLAGS.trainers.split(",") if item]
        if any(len(t) != 2 for t in trainers):
            raise ValueError(f"--trainers={FLAGS.trainers!r}: each item is TRAINER:LR_FIELD")
        lrs = [float(v) for v in FLAGS.lrs.split(",") if v]
        if not lrs or min(lrs) <= 0:
            raise ValueError(f"--lrs={FLAGS.lrs!r}: positive learning rates")
        seeds = [int(v) for v in FLAGS.seeds.split(",") if v]
        out = Path(FLAGS.workdir)
        out.mkdir(parents=True, exist_ok=True)
        rows = sweep(FLAGS.config, out, trainers, lrs, seeds)
        report(rows, out)
    except USER_ERRORS as err:
        fail(str(err))
    print(json.dumps({"runs": len(rows), "out": str(out)}))


if __name__ == "__main__":
    app.run(main)
