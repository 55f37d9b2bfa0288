"""experiments.tables on synthetic workdirs: cells never mix configs, seeds are counted once, errors are clear."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from experiments import tables
from experiments.workdir import WorkdirError

WARM = ("Fenchel + warm start", "warm_start_test_accuracy")


def _spec(title, fields, extra=()):
    return SimpleNamespace(title=title, fields=fields, columns=((title, "test_accuracy"), *extra))


REGISTRY = {
    "adam": _spec("Adam", {"learning_rate": 0.0, "momentum": 0.9}),
    "sgd": _spec("SGD", {"learning_rate": 0.0, "momentum": 0.9}),
    "fenchel": _spec("Fenchel", {"lambda_": 3.0, "rho": 1e-5, "warm_start_epochs": 1, "momentum": 0.9}, (WARM,)),
}


@pytest.fixture(autouse=True)
def fake_registry(monkeypatch):
    monkeypatch.setattr(tables, "registry", lambda: REGISTRY)


def make_run(root, name, trainer, seed, acc, wall=10.0, warm=None, summary_extra=None, **config):
    """A finished workdir: a full config.json (every trainer's fields) and summary.json."""
    d = root / name
    d.mkdir(parents=True)
    cfg = {"dataset": "mnist", "layers": "dense:300", "batch_size": 100, "total_epochs": 10, "progress": True,
           "trainer": trainer, "seed": seed, "learning_rate": 0.0, "momentum": 0.9, "lambda_": 3.0, "rho": 1e-5,
           "warm_start_epochs": 1, **config}
    summary = {"trainer": trainer, "dataset": cfg["dataset"], "architecture": "784-300-10", "seed": seed,
               "epochs": cfg["total_epochs"], "wall_time": wall, "test_accuracy": acc, **(summary_extra or {})}
    if warm is not None:
        summary.update(warm_start_test_accuracy=warm, warm_start_wall_time=1.5)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "summary.json").write_text(json.dumps(summary))
    return d


def _pct(values):
    v = 100.0 * np.asarray(values)
    return v.mean(), v.std(ddof=1)


def test_means_stds_and_outputs(tmp_path, capsys):
    adam, fen, fen_warm = [0.97, 0.982, 0.99], [0.95, 0.972], [0.961, 0.975]
    dirs = [make_run(tmp_path, f"adam{s}", "adam", s, a, wall=10.0 + s) for s, a in enumerate(adam)]
    dirs += [make_run(tmp_path, f"fen{s}", "fenchel", s, a, wall=20.0 + s, warm=w)
             for s, (a, w) in enumerate(zip(fen, fen_warm))]
    md = tables.write_tables(dirs, tmp_path / "out" / "table")
    table = tables.aggregate(tables.load_runs(dirs))
    assert table.columns == ["Adam", "Fenchel", "Fenchel + warm start"]
    row = table.rows[("mnist", "784-300-10", "")]
    for column, values in (("Adam", adam), ("Fenchel", fen), ("Fenchel + warm start", fen_warm)):
        mean, std = _pct(values)
        assert row[column].mean == pytest.approx(mean) and row[column].std == pytest.approx(std)
        assert row[column].n == len(values)
    assert row["Adam"].wall == pytest.approx(11.0)
    assert row["Fenchel + warm start"].wall == pytest.approx(20.5 + 1.5)  # lifted training + fine-tune
    assert row["Fenchel"].seeds == (0, 1) and row["Fenchel"].epochs == "10"
    mean, std = _pct(adam)
    assert f"{mean:.2f} ± {std:.2f} (n=3)" in md and "| 10, 11.0 |" in md
    assert (tmp_path / "out" / "table.md").read_text() == md
    assert (tmp_path / "out" / "table.csv").read_text().count("\n") == 4
    assert f"{mean:.2f} \\pm {std:.2f}" in (tmp_path / "out" / "table.tex").read_text()
    out = capsys.readouterr().out
    assert "grouped:" in out and f"Fenchel: n=2, seeds 0, 1: {dirs[3]}, {dirs[4]}" in out


def test_different_lambda_gives_two_columns_never_one_mean(tmp_path):
    lam1, lam3 = [0.90, 0.92], [0.97, 0.98]
    dirs = [make_run(tmp_path, f"l1_{s}", "fenchel", s, a, lambda_=1.0) for s, a in enumerate(lam1)]
    dirs += [make_run(tmp_path, f"l3_{s}", "fenchel", s, a, lambda_=3.0) for s, a in enumerate(lam3)]
    # Adam runs launched with different lambda_ values: not Adam's field, so still one cell
    dirs += [make_run(tmp_path, f"adam{s}", "adam", s, 0.98, lambda_=float(s + 1)) for s in range(2)]
    table = tables.aggregate(tables.load_runs(dirs))
    assert table.columns == ["Adam", "Fenchel (lambda_=1.0)", "Fenchel (lambda_=3.0)"]
    row = table.rows[("mnist", "784-300-10", "")]
    assert row["Fenchel (lambda_=1.0)"].mean == pytest.approx(_pct(lam1)[0]) and row["Fenchel (lambda_=1.0)"].n == 2
    assert row["Fenchel (lambda_=3.0)"].mean == pytest.approx(_pct(lam3)[0]) and row["Fenchel (lambda_=3.0)"].n == 2
    assert row["Adam"].n == 2


def test_numeric_variants_sort_by_value(tmp_path):
    dirs = [make_run(tmp_path, f"l{lam}", "fenchel", 0, 0.9, lambda_=lam) for lam in (10.0, 3.0)]
    assert tables.aggregate(tables.load_runs(dirs)).columns == ["Fenchel (lambda_=3.0)", "Fenchel (lambda_=10.0)"]


def test_different_total_epochs_gives_two_rows(tmp_path):
    dirs = [make_run(tmp_path, f"e10_{s}", "adam", s, 0.98, total_epochs=10) for s in range(2)]
    dirs += [make_run(tmp_path, f"e5_{s}", "adam", s, 0.90, total_epochs=5) for s in range(2)]
    dirs += [make_run(tmp_path, "fen_e5", "fenchel", 0, 0.80, total_epochs=5)]
    table = tables.aggregate(tables.load_runs(dirs))
    assert list(table.rows) == [("mnist", "784-300-10", "total_epochs=5"), ("mnist", "784-300-10", "total_epochs=10")]
    five, ten = table.rows.values()
    assert five["Adam"].mean == pytest.approx(90.0) and five["Adam"].n == 2 and five["Adam"].epochs == "5"
    assert ten["Adam"].mean == pytest.approx(98.0) and ten["Adam"].n == 2
    assert five["Fenchel"].n == 1 and "Fenchel" not in ten
    md = tables.to_markdown(table)
    assert "| mnist | 784-300-10 (total_epochs=5) | 90.00 ± 0.00 (n=2) | 80.00 ± 0.00 (n=1) |" in md
    assert "| mnist | 784-300-10 (total_epochs=10) | 98.00 ± 0.00 (n=2) | – |" in md


def test_progress_flag_does_not_split(tmp_path):
    dirs = [make_run(tmp_path, f"a{s}", "adam", s, 0.9, progress=bool(s)) for s in range(2)]
    assert tables.aggregate(tables.load_runs(dirs)).rows[("mnist", "784-300-10", "")]["Adam"].n == 2


def test_same_workdir_twice_counts_once(tmp_path, capsys):
    a = make_run(tmp_path, "a", "adam", 0, 0.90)
    b = make_run(tmp_path, "b", "adam", 1, 0.96)
    md = tables.write_tables([a, b, tmp_path / "a" / ".." / "a"])
    assert "given more than once" in capsys.readouterr().out
    assert "93.00 ± 4.24 (n=2)" in md


def test_two_workdirs_with_the_same_run_count_once(tmp_path, capsys):
    a = make_run(tmp_path, "a", "adam", 0, 0.90)
    copy = make_run(tmp_path, "copy", "adam", 0, 0.90, progress=False)
    b = make_run(tmp_path, "b", "adam", 1, 0.96)
    md = tables.write_tables([a, copy, b])
    out = capsys.readouterr().out
    assert f"{a} and {copy} hold the same run" in out and "counted once" in out
    assert "93.00 ± 4.24 (n=2)" in md


def test_unregistered_trainer_gets_its_name_and_accuracy_only(tmp_path):
    d = make_run(tmp_path, "n", "newton", 0, 0.5, summary_extra={"warm_start_test_accuracy": 0.6})
    table = tables.aggregate(tables.load_runs([d]))
    assert table.columns == ["newton"] and table.rows[("mnist", "784-300-10", "")]["newton"].mean == 50.0


def test_missing_own_field_takes_the_trainer_default(tmp_path):
    new = make_run(tmp_path, "new", "fenchel", 0, 0.9)
    old = make_run(tmp_path, "old", "fenchel", 1, 0.8)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["lambda_"]  # an older config: the default (3.0) applies
    (old / "config.json").write_text(json.dumps(cfg))
    assert tables.aggregate(tables.load_runs([new, old])).columns == ["Fenchel"]


def test_corrupt_or_missing_files_name_the_file(tmp_path):
    good = make_run(tmp_path, "good", "adam", 0, 0.9)
    bad = make_run(tmp_path, "bad", "adam", 1, 0.9)
    (bad / "summary.json").write_text('{"test_accuracy": 0.9')
    with pytest.raises(WorkdirError, match=rf"{bad / 'summary.json'} is corrupted"):
        tables.load_runs([good, bad])
    (bad / "summary.json").write_text(json.dumps({"trainer": "adam", "dataset": "mnist"}))
    with pytest.raises(WorkdirError, match=rf"{bad / 'summary.json'} has no 'architecture'"):
        tables.load_runs([bad])
    nocfg = make_run(tmp_path, "nocfg", "adam", 2, 0.9)
    (nocfg / "config.json").unlink()
    with pytest.raises(WorkdirError, match=rf"{nocfg / 'config.json'} is missing"):
        tables.load_runs([nocfg])


def test_no_finished_runs(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="no finished runs among the 2 given workdirs"):
        tables.load_runs([tmp_path / "a", tmp_path / "missing"], notes := [])
    assert any("a has no summary.json" in n for n in notes) and any("not a directory" in n for n in notes)


@pytest.mark.parametrize("case", ["no_runs", "corrupt", "no_args", "bad_option"])
def test_cli_errors_exit_2_with_one_line(tmp_path, capsys, case):
    d = make_run(tmp_path, "a", "adam", 0, 0.9)
    if case == "corrupt":
        (d / "config.json").write_text("{")
    argv = {"no_runs": [str(tmp_path / "nothing")], "corrupt": [str(d)], "no_args": [],
            "bad_option": [str(d), "--bogus"]}[case]
    with pytest.raises(SystemExit) as exc:
        tables.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    if case == "corrupt":
        assert str(d / "config.json") in err


def test_cli_writes_tables(tmp_path, capsys):
    d = make_run(tmp_path, "a", "adam", 0, 0.9)
    tables.main([str(d), "--out", str(tmp_path / "t")])
    assert "90.00 ± 0.00 (n=1)" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.glob("t.*")) == ["t.csv", "t.md", "t.tex"]
