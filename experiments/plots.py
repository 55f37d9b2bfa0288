"""Training curves from run workdirs, as PNG.

    python -m experiments.plots runs/sweep/mnist_mlp/* --out runs/plots

Writes accuracy_vs_epoch.png, accuracy_vs_time.png and lifted_bound.png (the
lifted objective below the network loss on the same batch, per epoch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.workdir import Workdir, WorkdirError  # noqa: E402


def load(workdirs):
    """(label, trainer, metric records) of every workdir with a config and metrics; corrupt files are errors."""
    runs = []
    for d in dict.fromkeys(Path(d).resolve() for d in workdirs):
        wd = Workdir(d)
        cfg = wd.read_config() if wd.path.is_dir() else None
        records = wd.read_metrics() if cfg is not None else []
        if cfg is None or not records:
            print(f"note: {d} has no config.json or metrics, skipped")
            continue
        runs.append((f"{cfg['trainer']} seed {cfg['seed']}", cfg["trainer"], records))
    if not runs:
        raise ValueError("no runs with metrics among the given workdirs")
    return runs


def make_plots(workdirs, out_dir) -> list[Path]:
    runs = load(workdirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    colors = {t: f"C{i}" for i, t in enumerate(sorted({t for _, t, _ in runs}))}
    written = []
    for x_key, name, xlabel in (("epoch", "accuracy_vs_epoch.png", "epoch"),
                                ("wall_time", "accuracy_vs_time.png", "training wall time (s)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        seen = set()
        for _label, trainer, recs in runs:
            ax.plot([r[x_key] for r in recs], [100 * r["test_accuracy"] for r in recs], "-o", ms=3,
                    color=colors[trainer], label=None if trainer in seen else trainer, alpha=0.8)
            seen.add(trainer)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(out / name)
    lifted = [(lbl, t, r) for lbl, t, r in runs if "lifted_objective" in r[0]]
    if lifted:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, (label, _, recs) in enumerate(lifted):
            ep = [r["epoch"] for r in recs]
            ax.plot(ep, [r["network_loss_same_batch"] + r["regulariser"] for r in recs], "-", color=f"C{i}",
                    label=f"{label}: network loss + reg")
            ax.plot(ep, [r["lifted_objective"] for r in recs], "--", color=f"C{i}", label=f"{label}: lifted objective")
        ax.set_xlabel("epoch")
        ax.set_ylabel("objective on the logged batch")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "lifted_bound.png", dpi=120)
        plt.close(fig)
        written.append(out / "lifted_bound.png")
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdirs", nargs="+")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        paths = make_plots(args.workdirs, args.out)
    except (ValueError, WorkdirError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
