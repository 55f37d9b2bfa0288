"""Paper-style tables from run workdirs: mean ± std over seeds, as Markdown, CSV and LaTeX.

    python -m experiments.tables runs/sweep/mnist_mlp/* [--out runs/table]

Rows: dataset × architecture. Columns: Adam, SGD, LNN, Fenchel, Fenchel +
warm start (test accuracy in %), then epochs and mean wall time per trainer.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
from pathlib import Path

COLUMNS = [  # (column title, trainer, summary key)
    ("Adam", "adam", "test_accuracy"),
    ("SGD", "sgd", "test_accuracy"),
    ("LNN", "lnn", "test_accuracy"),
    ("Fenchel", "fenchel", "test_accuracy"),
    ("Fenchel + warm start", "fenchel", "warm_start_test_accuracy"),
]


def load_runs(workdirs) -> list[dict]:
    """summary.json of every finished workdir (unfinished ones are skipped with a note)."""
    runs = []
    for d in workdirs:
        path = Path(d) / "summary.json"
        if not path.exists():
            print(f"note: {d} has no summary.json (unfinished?), skipped")
            continue
        runs.append(json.loads(path.read_text()))
    if not runs:
        raise ValueError("no finished runs among the given workdirs")
    return runs


def mean_std(values):
    """(mean, sample std); std is 0 for a single value."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(runs) -> dict:
    """{(dataset, architecture): {title: (mean %, std %, n, epochs, wall time)}}."""
    table = {}
    for run in runs:
        row = table.setdefault((run["dataset"], run["architecture"]), {})
        for title, trainer, key in COLUMNS:
            if run["trainer"] == trainer and run.get(key) is not None:
                row.setdefault(title, []).append(run)
    out = {}
    for row_key, cols in table.items():
        out[row_key] = {}
        for title, _, key in COLUMNS:
            if title in cols:
                rs = cols[title]
                m, s = mean_std(100.0 * r[key] for r in rs)
                # the warm-start column's time includes the lifted training before it
                extra = "warm_start_wall_time" if key == "warm_start_test_accuracy" else None
                wall = statistics.fmean(r["wall_time"] + (r[extra] if extra else 0.0) for r in rs)
                out[row_key][title] = (m, s, len(rs), rs[0]["epochs"], wall)
    return out


def to_markdown(agg) -> str:
    titles = [t for t, _, _ in COLUMNS]
    lines = ["| dataset | architecture | " + " | ".join(titles) + " |", "|---|---|" + "---|" * len(titles)]
    for (dataset, arch), cols in sorted(agg.items()):
        cells = [f"{cols[t][0]:.2f} ± {cols[t][1]:.2f} (n={cols[t][2]})" if t in cols else "–" for t in titles]
        lines.append(f"| {dataset} | {arch} | " + " | ".join(cells) + " |")
    lines += ["", "| dataset | architecture | " + " | ".join(f"{t}: epochs, wall s" for t in titles) + " |",
              "|---|---|" + "---|" * len(titles)]
    for (dataset, arch), cols in sorted(agg.items()):
        cells = [f"{cols[t][3]}, {cols[t][4]:.1f}" if t in cols else "–" for t in titles]
        lines.append(f"| {dataset} | {arch} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(agg) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["dataset", "architecture", "method", "mean_test_acc_pct", "std_test_acc_pct", "n", "epochs",
                "mean_wall_s"])
    for (dataset, arch), cols in sorted(agg.items()):
        for title, _, _ in COLUMNS:
            if title in cols:
                m, s, n, e, wall = cols[title]
                w.writerow([dataset, arch, title, f"{m:.4f}", f"{s:.4f}", n, e, f"{wall:.2f}"])
    return buf.getvalue()


def to_latex(agg) -> str:
    titles = [t for t, _, _ in COLUMNS]
    lines = [r"\begin{tabular}{ll" + "c" * len(titles) + "}", r"\toprule",
             "Dataset & Architecture & " + " & ".join(titles) + r" \\", r"\midrule"]
    for (dataset, arch), cols in sorted(agg.items()):
        cells = [f"${cols[t][0]:.2f} \\pm {cols[t][1]:.2f}$" if t in cols else "--" for t in titles]
        lines.append(f"{dataset.replace('_', '-')} & {arch} & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_tables(workdirs, out_prefix=None) -> str:
    agg = aggregate(load_runs(workdirs))
    md = to_markdown(agg)
    if out_prefix:
        out = Path(out_prefix)
        out.parent.mkdir(parents=True, exist_ok=True)
        from experiments.train import atomic_write_bytes
        atomic_write_bytes(out.with_suffix(".md"), md.encode())
        atomic_write_bytes(out.with_suffix(".csv"), to_csv(agg).encode())
        atomic_write_bytes(out.with_suffix(".tex"), to_latex(agg).encode())
    return md


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdirs", nargs="+")
    p.add_argument("--out", default=None, help="write <out>.md, <out>.csv and <out>.tex")
    args = p.parse_args(argv)
    print(write_tables(args.workdirs, args.out))


if __name__ == "__main__":
    main()
