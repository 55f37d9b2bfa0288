"""Paper-style tables from run workdirs: mean ± std over seeds, as Markdown, CSV and LaTeX.

    python -m experiments.tables runs/sweep/mnist_mlp/* [--out runs/table]

A cell averages only runs whose config.json are equal except for `seed`
(and `progress`); the fields owned by other trainers than the run's own are
not compared. Rows are dataset × architecture; a base field (owned by no
trainer, e.g. total_epochs) that differs between runs of a row splits the row,
and the row is labelled with it. A trainer's own field (e.g. lambda_) that
differs between its runs of a row splits its columns: `Fenchel (lambda_=1.0)`.
Columns are the registered trainers' (`experiments.trainers.TRAINERS`) in
registry order, test accuracy in %; a second table gives epochs and mean
training wall time (a warm-start column's time includes the lifted training
before it). A workdir given twice is counted once; two workdirs holding the
same config and seed are the same run: the first given is counted, with a
note naming both. Notes and a "grouped:" report (each cell's seeds and
workdirs) are printed before the table.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import statistics
import sys
from pathlib import Path
from typing import NamedTuple

from experiments.workdir import Workdir, WorkdirError, atomic_write_bytes, config_hash

NOT_COMPARED = ("seed", "progress")  # config fields that do not change a run's result
ACCURACY = "test_accuracy"
_MISSING = "<unset>"


def registry() -> dict:
    """The trainer registry, name → spec with .title, .columns and .fields (imported lazily: it imports jax)."""
    from experiments.trainers import TRAINERS
    return TRAINERS


@dataclasses.dataclass
class Run:
    """One finished workdir: its resolved path, config.json and summary.json."""

    path: Path
    config: dict
    summary: dict

    @property
    def trainer(self) -> str:
        return self.config.get("trainer", self.summary["trainer"])

    @property
    def seed(self):
        return self.config.get("seed", self.summary.get("seed"))


class Cell(NamedTuple):
    """One table cell: accuracy mean and sample std in %, seeds, epochs, mean wall time (s), where from."""

    mean: float
    std: float
    n: int
    epochs: str
    wall: float
    seeds: tuple
    workdirs: tuple


@dataclasses.dataclass
class Table:
    """rows: (dataset, architecture, setting) → {column title: Cell}; columns in display order."""

    rows: dict
    columns: list


def _note(notes, text):
    notes.append(f"note: {text}")


def load_runs(workdirs, notes: list | None = None) -> list[Run]:
    """The finished runs among `workdirs` (each distinct one once); unfinished ones are skipped with a note.

    Corrupt or missing config.json / summary.json of a finished run is a WorkdirError naming the file.
    """
    notes = [] if notes is None else notes
    seen = {}
    for d in workdirs:
        path = Path(d).resolve()
        if path in seen:
            _note(notes, f"{d} is given more than once (as {seen[path]} before), counted once")
            continue
        seen[path] = d
    runs = []
    for path, given in seen.items():
        wd = Workdir(path)
        if not path.is_dir():
            _note(notes, f"{given} is not a directory, skipped")
            continue
        summary = wd.read_summary()
        if summary is None:
            _note(notes, f"{given} has no summary.json (unfinished?), skipped")
            continue
        config = wd.read_config()
        if config is None:
            raise WorkdirError(f"{wd.config_path} is missing although {wd.summary_path} exists; without the config "
                               "the run cannot be grouped: restore it or rerun into a fresh workdir")
        for key in ("trainer", "dataset", "architecture", ACCURACY, "wall_time", "epochs"):
            if key not in summary:
                raise WorkdirError(f"{wd.summary_path} has no {key!r}; delete it and relaunch the run to rewrite it")
        runs.append(Run(path, config, summary))
    if not runs:
        raise ValueError(f"no finished runs among the {len(seen)} given workdirs")
    return runs


def _fmt(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _label(values: dict) -> str:
    """`k=v, …` in key order ('' for no keys)."""
    return ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(values.items()))


def _order(values: dict) -> tuple:
    """Sort key of a label's values: numbers by value (10 after 5), then everything else by its JSON."""
    def one(v):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return (0, float(v), "")
        return (1, 0.0, json.dumps(v, sort_keys=True))
    return tuple((k, one(v)) for k, v in sorted(values.items()))


def _varying(configs) -> set:
    """Keys whose value is not the same in every config (a missing key counts as a value)."""
    configs = list(configs)
    keys = set().union(*configs) if configs else set()
    return {k for k in keys if len({json.dumps(c.get(k, _MISSING), sort_keys=True) for c in configs}) > 1}


class _Grouping:
    """The comparable part of each run's config, split into base fields and the run's trainer's fields."""

    def __init__(self, specs: dict):
        self.specs = specs
        self.owned = set().union(*(set(s.fields) for s in specs.values())) if specs else set()

    def rank(self, trainer) -> int:
        """Registry order; unregistered trainers last."""
        names = list(self.specs)
        return names.index(trainer) if trainer in self.specs else len(names)

    def columns(self, trainer):
        spec = self.specs.get(trainer)
        return tuple(spec.columns) if spec is not None else ((trainer, ACCURACY),)

    def base(self, run: Run) -> dict:
        """Fields owned by no trainer, less seed, progress and the trainer name itself."""
        return {k: v for k, v in run.config.items() if k not in self.owned and k not in NOT_COMPARED
                and k != "trainer"}

    def own(self, run: Run) -> dict:
        """The run's trainer's fields (a field missing from an older config takes the trainer's default)."""
        spec = self.specs.get(run.trainer)
        if spec is None:
            return {}
        return {k: run.config.get(k, default) for k, default in spec.fields.items() if k not in NOT_COMPARED}

    def identity(self, run: Run) -> str:
        return config_hash({"trainer": run.trainer, "seed": run.seed, **self.base(run), **self.own(run)})


def _dedupe_same_runs(runs, grouping, notes) -> list[Run]:
    """Two workdirs with the same config and seed hold the same run: keep the first, note both."""
    first, kept = {}, []
    for run in runs:
        key = grouping.identity(run)
        if key in first:
            other = first[key]
            a_sha, b_sha = other.summary.get("data_sha256"), run.summary.get("data_sha256")
            if a_sha is not None and b_sha is not None and a_sha != b_sha:
                raise WorkdirError(f"{other.path / 'summary.json'} and {run.path / 'summary.json'} hold the same run "
                                   f"(same config, seed {run.seed}) computed on different data (sha256 {a_sha[:12]}… "
                                   f"and {b_sha[:12]}…): rerun the stale one on the current data, in a fresh workdir")
            a, b = other.summary.get(ACCURACY), run.summary.get(ACCURACY)
            differ = "" if a == b else f" (their test accuracies differ: {a} vs {b})"
            _note(notes, f"{other.path} and {run.path} hold the same run (same config, seed {run.seed}); "
                         f"counted once, from {other.path}{differ}")
            continue
        first[key] = run
        kept.append(run)
    return kept


def _mean_std(values):
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _extra_wall_key(key: str):
    """warm_start_test_accuracy → warm_start_wall_time: the time of what ran after the main training."""
    if key != ACCURACY and key.endswith(ACCURACY):
        return key[:-len(ACCURACY)] + "wall_time"
    return None


class Series(NamedTuple):
    """Where a run belongs: its table row (dataset, architecture, setting), its trainer and column variant."""

    row: tuple
    trainer: str
    variant: str


def assign(runs, grouping: _Grouping | None = None) -> tuple[dict, dict, dict]:
    """Each run's Series (by id(run)), with sort keys of the rows and of the (trainer, variant) columns.

    Rows are dataset × architecture split by the base fields that vary inside; a trainer's own fields that vary
    between its runs of some row split its columns. Tables and plots both group by this.
    """
    grouping = _Grouping(registry()) if grouping is None else grouping
    by_arch = {}
    for run in runs:
        by_arch.setdefault((run.summary["dataset"], run.summary["architecture"]), []).append(run)
    row_of, row_order = {}, {}
    for (dataset, arch), group in by_arch.items():
        split = _varying(grouping.base(r) for r in group)
        for run in group:
            values = {k: grouping.base(run).get(k, _MISSING) for k in split}
            row = (dataset, arch, _label(values))
            row_of[id(run)], row_order[row] = row, (dataset, arch, _order(values))
    data_of = {}  # row → (sha256, run) of the first run that recorded its data
    for run in runs:
        sha = run.summary.get("data_sha256")
        first = data_of.setdefault(row_of[id(run)], (sha, run)) if sha is not None else None
        if first is not None and first[0] != sha:
            raise WorkdirError(f"{first[1].path / 'summary.json'} and {run.path / 'summary.json'} share a table row "
                               f"but were computed on different data (sha256 {first[0][:12]}… and {sha[:12]}…): "
                               "rerun the stale one on the current data, in a fresh workdir")

    per_row_trainer = {}
    for run in runs:
        per_row_trainer.setdefault((row_of[id(run)], run.trainer), []).append(grouping.own(run))
    variant_keys = {}
    for (_, trainer), owns in per_row_trainer.items():
        variant_keys.setdefault(trainer, set()).update(_varying(owns))

    series, variant_order = {}, {}
    for run in runs:
        values = {k: grouping.own(run).get(k, _MISSING) for k in variant_keys.get(run.trainer, ())}
        series[id(run)] = Series(row_of[id(run)], run.trainer, _label(values))
        variant_order[(run.trainer, _label(values))] = (grouping.rank(run.trainer), run.trainer, _order(values))
    return series, row_order, variant_order


def aggregate(runs, notes: list | None = None) -> Table:
    """Group runs into cells of identical configs (seed aside) and average each cell."""
    notes = [] if notes is None else notes
    grouping = _Grouping(registry())
    runs = _dedupe_same_runs(runs, grouping, notes)
    series, row_order, variant_order = assign(runs, grouping)
    cells = {}  # (row, trainer, variant label) → runs
    for run in runs:
        cells.setdefault(tuple(series[id(run)]), []).append(run)

    columns, rows = [], {}
    for trainer, variant in sorted(variant_order, key=variant_order.get):
        for title, key in grouping.columns(trainer):
            column = f"{title} ({variant})" if variant else title
            for row in sorted(row_order, key=row_order.get):
                members = cells.get((row, trainer, variant))
                if not members:
                    continue
                if len({config_hash({**grouping.base(r), **grouping.own(r)}) for r in members}) != 1:
                    raise AssertionError(f"{row} / {column} would mix configs: {[str(r.path) for r in members]}")
                cell = _cell(members, key, column, notes)
                if cell is not None:
                    rows.setdefault(row, {})[column] = cell
                    if column not in columns:
                        columns.append(column)
    return Table({row: rows[row] for row in sorted(rows, key=row_order.get)}, columns)


def series_labels(runs) -> dict:
    """id(run) → (label, sort key) of the run's table cell: its column title, after its row where `runs` span
    several rows. Runs differing only in their seed share a label."""
    grouping = _Grouping(registry())
    series, row_order, variant_order = assign(runs, grouping)
    several_rows = len({s.row for s in series.values()}) > 1
    out = {}
    for run in runs:
        s = series[id(run)]
        title = grouping.columns(s.trainer)[0][0]
        label = f"{title} ({s.variant})" if s.variant else title
        if several_rows:
            label = " ".join(_row_title(s.row)) + ": " + label
        out[id(run)] = (label, (row_order[s.row], variant_order[(s.trainer, s.variant)]))
    return out


def _cell(members, key, column, notes) -> Cell | None:
    """Mean ± std of summary[key] (in %) over the runs that have it; wall time includes a run's earlier stage."""
    have = sorted((r for r in members if r.summary.get(key) is not None), key=lambda r: (str(r.seed), str(r.path)))
    if len(have) < len(members):
        lacking = ", ".join(str(r.path) for r in members if r.summary.get(key) is None)
        _note(notes, f"{column}: {lacking} lack {key!r} in summary.json, not counted there")
    if not have:
        return None
    mean, std = _mean_std(100.0 * r.summary[key] for r in have)
    extra = _extra_wall_key(key)
    wall = statistics.fmean(r.summary["wall_time"] + (r.summary.get(extra, 0.0) if extra else 0.0) for r in have)
    epochs = "/".join(sorted({str(r.summary["epochs"]) for r in have}))
    return Cell(mean, std, len(have), epochs, wall, tuple(r.seed for r in have), tuple(str(r.path) for r in have))


# ---------------------------------------------------------------- output
def _row_title(row) -> tuple[str, str]:
    dataset, arch, setting = row
    return dataset, (f"{arch} ({setting})" if setting else arch)


def grouped_report(table: Table) -> str:
    """For every cell: its seeds and the workdirs it averages."""
    lines = ["grouped:"]
    for row, cols in table.rows.items():
        dataset, arch = _row_title(row)
        for column in table.columns:
            if column in cols:
                cell = cols[column]
                seeds = ", ".join(str(s) for s in cell.seeds)
                lines.append(f"  {dataset} | {arch} | {column}: n={cell.n}, seeds {seeds}: {', '.join(cell.workdirs)}")
    return "\n".join(lines) + "\n"


def to_markdown(table: Table) -> str:
    cols = table.columns
    head = "|---|---|" + "---|" * len(cols)
    lines = ["| dataset | architecture | " + " | ".join(cols) + " |", head]
    for row, cells in table.rows.items():
        values = [f"{cells[c].mean:.2f} ± {cells[c].std:.2f} (n={cells[c].n})" if c in cells else "–" for c in cols]
        lines.append("| " + " | ".join(_row_title(row)) + " | " + " | ".join(values) + " |")
    lines += ["", "| dataset | architecture | " + " | ".join(f"{c}: epochs, wall s" for c in cols) + " |", head]
    for row, cells in table.rows.items():
        values = [f"{cells[c].epochs}, {cells[c].wall:.1f}" if c in cells else "–" for c in cols]
        lines.append("| " + " | ".join(_row_title(row)) + " | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["dataset", "architecture", "setting", "method", "mean_test_acc_pct", "std_test_acc_pct", "n",
                "epochs", "mean_wall_s", "seeds"])
    for (dataset, arch, setting), cells in table.rows.items():
        for column in table.columns:
            if column in cells:
                c = cells[column]
                w.writerow([dataset, arch, setting, column, f"{c.mean:.4f}", f"{c.std:.4f}", c.n, c.epochs,
                            f"{c.wall:.2f}", " ".join(str(s) for s in c.seeds)])
    return buf.getvalue()


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in text)


def to_latex(table: Table) -> str:
    cols = table.columns
    lines = [r"\begin{tabular}{ll" + "c" * len(cols) + "}", r"\toprule",
             "Dataset & Architecture & " + " & ".join(_tex(c) for c in cols) + r" \\", r"\midrule"]
    for row, cells in table.rows.items():
        values = [f"${cells[c].mean:.2f} \\pm {cells[c].std:.2f}$" if c in cells else "--" for c in cols]
        dataset, arch = _row_title(row)
        lines.append(f"{_tex(dataset)} & {_tex(arch)} & " + " & ".join(values) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_tables(workdirs, out_prefix=None, out=None) -> str:
    """Print notes and the grouped report to `out` (stdout), write <out_prefix>.{md,csv,tex}; returns the Markdown."""
    out = sys.stdout if out is None else out
    notes = []
    table = aggregate(load_runs(workdirs, notes), notes)
    for note in notes:
        print(note, file=out)
    print(grouped_report(table), file=out)
    md = to_markdown(table)
    if out_prefix:
        prefix = Path(out_prefix)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(prefix.with_name(prefix.name + ".md"), md.encode())
        atomic_write_bytes(prefix.with_name(prefix.name + ".csv"), to_csv(table).encode())
        atomic_write_bytes(prefix.with_name(prefix.name + ".tex"), to_latex(table).encode())
    return md


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    p = _Parser(prog="python -m experiments.tables", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdirs", nargs="+")
    p.add_argument("--out", default=None, help="write <out>.md, <out>.csv and <out>.tex")
    args = p.parse_args(argv)
    try:
        print(write_tables(args.workdirs, args.out))
    except (WorkdirError, ValueError, OSError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
