"""Training curves from run workdirs, as PNG.

    python -m experiments.plots runs/sweep/mnist_mlp/* --out runs/plots

Writes accuracy_vs_epoch.png, accuracy_vs_time.png and lifted_bound.png (the
lifted objective below the network loss on the same batch, per epoch). Curves
are grouped as `experiments.tables` groups its cells: one colour and legend
entry per table row and column (trainer and the config fields that vary, e.g.
`Adam (merge=guide)`), shared by the seeds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.tables import Run, series_labels  # noqa: E402
from experiments.workdir import Workdir, WorkdirError  # noqa: E402


class Curve(NamedTuple):
    """One run's curve: its table cell's label and colour (shared by its seeds), seed and metric records."""

    label: str
    color: str
    seed: object
    records: list


def _palette(n: int) -> list:
    """n distinct colours: tab10, tab20, then evenly spaced hues."""
    if n <= 10:
        return [f"C{i}" for i in range(n)]
    cmap = matplotlib.colormaps["tab20" if n <= 20 else "hsv"]
    return [matplotlib.colors.to_hex(cmap(i if n <= 20 else i / n)) for i in range(n)]


def load(workdirs) -> list[Curve]:
    """A Curve per workdir with a config and metrics, grouped as `experiments.tables` groups its cells (an
    unfinished run takes the architecture of a finished one with its dataset and layers); corrupt files are errors."""
    runs = []
    for d in dict.fromkeys(Path(d).resolve() for d in workdirs):
        wd = Workdir(d)
        cfg = wd.read_config() if wd.path.is_dir() else None
        records = wd.read_metrics() if cfg is not None else []
        if cfg is None or not records:
            print(f"note: {d} has no config.json or metrics, skipped")
            continue
        runs.append((Run(d, cfg, wd.read_summary() or {}), records))
    if not runs:
        raise ValueError("no runs with metrics among the given workdirs")
    arch = {(r.config.get("dataset"), r.config.get("layers")): r.summary["architecture"]
            for r, _ in runs if "architecture" in r.summary}
    for run, _ in runs:
        if "architecture" not in run.summary:  # unfinished: no summary.json yet
            key = (run.config.get("dataset"), run.config.get("layers"))
            run.summary = {"trainer": run.config["trainer"], "dataset": key[0], "architecture": arch.get(key, key[1])}
    labels = series_labels([r for r, _ in runs])
    order = sorted({labels[id(r)] for r, _ in runs}, key=lambda lo: lo[1])
    color = dict(zip((label for label, _ in order), _palette(len(order))))
    runs.sort(key=lambda rr: (labels[id(rr[0])][1], str(rr[0].seed)))
    return [Curve(labels[id(r)][0], color[labels[id(r)][0]], r.seed, records) for r, records in runs]


def make_plots(workdirs, out_dir) -> list[Path]:
    """accuracy_vs_epoch.png, accuracy_vs_time.png and (lifted runs) lifted_bound.png in `out_dir`: one colour
    and legend entry per table cell."""
    curves = load(workdirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for x_key, name, xlabel in (("epoch", "accuracy_vs_epoch.png", "epoch"),
                                ("wall_time", "accuracy_vs_time.png", "training wall time (s)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        seen = set()
        for c in curves:
            ax.plot([r[x_key] for r in c.records], [100 * r["test_accuracy"] for r in c.records], "-o", ms=3,
                    color=c.color, label=None if c.label in seen else c.label, alpha=0.8)
            seen.add(c.label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        if len(seen) > 6:  # many cells: the legend goes to the right of the axes
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.legend()
            fig.tight_layout()
        fig.savefig(out / name, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(out / name)
    lifted = [c for c in curves if "lifted_objective" in c.records[0]]
    if lifted:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        seen = set()
        for c in lifted:
            ep = [r["epoch"] for r in c.records]
            first = c.label not in seen
            seen.add(c.label)
            ax.plot(ep, [r["network_loss_same_batch"] + r["regulariser"] for r in c.records], "-", color=c.color,
                    label=f"{c.label}: network loss + reg" if first else None)
            ax.plot(ep, [r["lifted_objective"] for r in c.records], "--", color=c.color,
                    label=f"{c.label}: lifted objective" if first else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel("objective on the logged batch")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.savefig(out / "lifted_bound.png", dpi=120, bbox_inches="tight")
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
