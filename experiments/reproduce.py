"""Reproduce the paper table on the bundled MNIST: Adam, SGD, LNN, Fenchel, Fenchel + warm start.

    python -m experiments.reproduce            # 784-300-10, 10 epochs, 3 seeds (about 8 min on 2 cores)
    python -m experiments.reproduce --quick    # 2 epochs on 10,000 images, 2 seeds
    python -m experiments.reproduce --config configs/mnist_lenet5.py --trainers fenchel,adam,sgd   # LeNet-5 rows
    python -m experiments.reproduce --trainers adam,fenchel --set branches=3 --set merge=sum,mean,guide \
        --set dataset=mnist,fashion_mnist --workdir runs/guidebp_table     # GuideBP heads, docs/guidebp.md

Runs are resumable (rerun the same command after an interruption); results go
to runs/paper (or --workdir): one workdir per run, table.{md,csv,tex} and PNG
curves. The trainers are every registered one (`experiments.trainers`) unless
--trainers names some.

`--set KEY=V1[,V2...]` (repeatable) sweeps config fields on top of the
trainers: every combination of the values is a variant, whose runs go to
<workdir>/<config name>+KEY=V.../<trainer>_seed<k>. Values are parsed by the
field's type (a value holding a comma goes in brackets or quotes) and every
run is checked by the launcher's validation before any compute. A trainer that
ignores a field (Adam and lambda_) runs once for the variants it cannot tell
apart. The table holds every finished run under the workdir: fields that vary
become row labels (base fields) or column labels (a trainer's own fields).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import itertools
import json
import re
import sys
from pathlib import Path

import ml_collections
from absl import flags

from experiments.configs_util import load_config
from experiments.plots import make_plots
from experiments.sweep import plan, report_failures, run_sweep
from experiments.tables import write_tables
from experiments.train import current_fingerprint, data_source, identity, validate_config
from experiments.trainers import TRAINERS
from experiments.workdir import Workdir, WorkdirError
from fenchel.data import DataError

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "mnist_mlp.py"
_SAFE = re.compile(r"[A-Za-z0-9._-]+")
_CLOSE = {"(": ")", "[": "]"}


def split_values(text: str) -> list[str]:
    """Split at the commas outside brackets and quotes: 'a,(1, 2),"x,y"' → ['a', '(1, 2)', '"x,y"']."""
    parts, depth, quote, start = [], [], None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in _CLOSE:
            depth.append(_CLOSE[ch])
        elif depth and ch == depth[-1]:
            depth.pop()
        elif ch == "," and not depth:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def parse_value(config, key: str, text: str):
    """`text` as a value of config field `key` (by its default's type); an unknown key keeps the text."""
    if key not in config:
        return text
    default = config[key]
    unquoted = text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" else text
    try:
        if isinstance(default, bool):
            return flags.BooleanParser().parse(text)
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, tuple):
            value = ast.literal_eval(text)
            return tuple(value) if isinstance(value, (tuple, list)) else (value,)
    except (ValueError, SyntaxError):
        kind = {bool: "true or false", int: "an integer", float: "a number"}.get(type(default), "a tuple, e.g. (1, 2)")
        raise ValueError(f"--set {key}={text}: expected {kind}, as the field's default {default!r}") from None
    return unquoted


def parse_sets(items, config) -> dict:
    """{key: [values]} from `--set KEY=V1,V2` items, in the order given; errors name the item."""
    sets = {}
    for item in items:
        key, eq, values = item.partition("=")
        key = key.strip()
        if not eq or not key or not values.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE[,VALUE...]")
        if key in ("trainer", "seed"):
            raise ValueError(f"--set {key}=...: use --{key}s instead")
        if key in sets:
            raise ValueError(f"--set {key} is given twice; list its values in one --set {key}=V1,V2")
        parsed = [parse_value(config, key, v) for v in split_values(values)]
        if len({json.dumps(v) for v in parsed}) < len(parsed):
            raise ValueError(f"--set {item!r} repeats a value")
        sets[key] = parsed
    return sets


def variant_name(values: dict) -> str:
    """'KEY=V+KEY=V' in key order, for a workdir name; a value with other characters than [A-Za-z0-9._-] is
    sanitised and tagged with a hash of its JSON, so distinct variants never share a name."""
    parts = []
    for key, value in sorted(values.items()):
        text = value if isinstance(value, str) else json.dumps(value)
        if not _SAFE.fullmatch(text):
            digest = hashlib.sha256(json.dumps(value).encode()).hexdigest()[:8]
            text = re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:40] + "_h" + digest
        parts.append(f"{key}={text}")
    return "+".join(parts)


def plan_variants(config, name: str, sets: dict, trainers, seeds, workdir) -> list:
    """[(config, workdir name, trainers)] for every combination of the `--set` values, every run validated by
    the launcher before any compute. A trainer runs a variant only if its run identity is new."""
    keys = list(sets)
    out, seen, names = [], {}, set()
    for combo in itertools.product(*(sets[k] for k in keys)):
        values = dict(zip(keys, combo))
        run = ml_collections.ConfigDict(config.to_dict())
        for key, value in values.items():
            try:
                run[key] = value
            except TypeError as err:
                raise ValueError(f"--set {key}={value!r}: {err}") from None
        run_name = f"{name}+{variant_name(values)}" if values else name
        if run_name in names:
            raise AssertionError(f"two variants share the workdir name {run_name}")
        names.add(run_name)
        mine = []
        for trainer in trainers:
            try:
                first, _ = plan(run, run_name, [trainer], seeds[:1], workdir)[0]
            except ValueError as err:
                raise ValueError(f"--set {variant_name(values)}, trainer {trainer}: {err}") from None
            key = json.dumps(identity(first), sort_keys=True)
            if key in seen:
                print(f"note: {trainer} ignores {variant_name(values)}: its runs in {seen[key]} stand for it",
                      file=sys.stderr)
                continue
            seen[key] = run_name
            mine.append(trainer)
        plan(run, run_name, mine, seeds, workdir)  # every seed validated too
        out.append((run, run_name, mine))
    return out


def on_current_data(run_dirs, fingerprints: dict) -> list:
    """The run folders whose summary recorded the data their config reads now (or none: older runs); each other
    one is left out of the table with a note. `fingerprints` caches (dataset, data_dir, data_file) → sha256."""
    kept = []
    for run_dir in run_dirs:
        wd = Workdir(run_dir)
        recorded = (wd.read_summary() or {}).get("data_sha256")
        config = wd.read_config()
        if recorded is None or config is None:
            kept.append(run_dir)
            continue
        config = ml_collections.ConfigDict(config)
        try:
            now = current_fingerprint(config, fingerprints)
        except (DataError, ValueError):
            now = None  # the data is gone or broken: nothing on it is current
        if now == recorded:
            kept.append(run_dir)
        else:
            print(f"note: {wd.summary_path} was computed on other data than {data_source(config)} holds now; "
                  "left out of the table", file=sys.stderr)
    return kept


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 epochs on 10,000 training images, 2 seeds")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 2)")
    p.add_argument("--trainers", default=",".join(TRAINERS), help="comma-separated (default: every registered one)")
    p.add_argument("--config", default=str(CONFIG), help="config file of the table's row (default: MNIST MLP)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=V1[,V2...]",
                   help="sweep a config field (repeatable; every combination is a variant with its own workdirs)")
    args = p.parse_args(argv)
    seeds = list(range(args.seeds or (2 if args.quick else 3)))
    workdir = Path(args.workdir or ("runs/paper_quick" if args.quick else "runs/paper"))
    config_path = Path(args.config)
    config = load_config(config_path)
    if args.quick:
        config.train_size, config.total_epochs = 10000, 2
    trainers = []
    for name in (t for t in args.trainers.split(",") if t):
        trial = load_config(config_path)
        trial.trainer = name
        try:
            validate_config(trial)
            trainers.append(name)
        except ValueError as err:  # e.g. a dense-only trainer on a CNN config
            print(f"note: skipping trainer {name!r} for {config_path.name}: {err}", file=sys.stderr)
    if not trainers:
        print(f"error: none of the trainers {args.trainers!r} applies to {config_path}", file=sys.stderr)
        sys.exit(2)
    fingerprints = {}
    try:
        variants = plan_variants(config, config_path.stem, parse_sets(args.set, config), trainers, seeds, workdir)
        for run, _, _ in variants:
            current_fingerprint(run, fingerprints)  # every variant's data read and checked before any run
    except (ValueError, DataError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        sys.exit(2)
    done, failed = [], []
    for run, run_name, mine in variants:
        d, f = run_sweep(run, run_name, mine, seeds, workdir)
        done += d
        failed += f
    print()
    everything = sorted(p for p in workdir.glob("*/*") if (p / "summary.json").exists())  # every row run so far
    everything = on_current_data(everything, fingerprints)
    if everything:
        try:
            print(write_tables(everything, workdir / "table"))
            for path in make_plots(everything, workdir / "plots"):
                print(path)
            print(f"tables: {workdir / 'table'}.{{md,csv,tex}}")
        except WorkdirError as err:
            failed.append((workdir / "table", str(err)))
    else:
        print(f"no run finished, so no table was written in {workdir}", file=sys.stderr)
    report_failures(failed)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
