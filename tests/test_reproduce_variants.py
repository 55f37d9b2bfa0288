"""experiments.reproduce --set: config variants become their own workdirs, table cells and plot colours."""

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from experiments import plots, reproduce, sweep, tables
from experiments.configs_util import load_config

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.py")
MERGES = ("sum", "mean", "guide")
SETS = ["--set", "branches=3", "--set", "merge=" + ",".join(MERGES), "--set", "total_epochs=1",
        "--set", "train_size=400"]


def _argv(workdir, *extra):
    return ["--config", TINY, "--trainers", "adam", "--seeds", "2", "--workdir", str(workdir), *SETS, *extra]


@pytest.fixture(scope="module")
def guide_runs(tmp_path_factory):
    """Adam on the tiny config, K = 3, each merge, seeds 0 and 1 (6 runs of 1 epoch on 400 images)."""
    workdir = tmp_path_factory.mktemp("variants")
    reproduce.main(_argv(workdir))
    return workdir


def _summary(path):
    return json.loads((path / "summary.json").read_text())


def test_each_variant_has_its_own_workdirs_and_table_column(guide_runs):
    roots = sorted(p.name for p in guide_runs.iterdir() if p.is_dir() and p.name.startswith("tiny+"))
    assert roots == [f"tiny+branches=3+merge={m}+total_epochs=1+train_size=400" for m in sorted(MERGES)]
    md = (guide_runs / "table.md").read_text()
    header = md.splitlines()[0]
    for merge in MERGES:
        root = guide_runs / f"tiny+branches=3+merge={merge}+total_epochs=1+train_size=400"
        runs = [root / f"adam_seed{s}" for s in (0, 1)]
        for seed, run in enumerate(runs):
            config = json.loads((run / "config.json").read_text())
            assert (config["merge"], config["branches"], config["seed"], config["total_epochs"]) == (merge, 3, seed, 1)
        accs = 100 * np.array([_summary(r)["test_accuracy"] for r in runs])
        assert f"Adam (merge={merge})" in header  # merge is the label; branches is equal everywhere, so left out
        assert f"{accs.mean():.2f} ± {accs.std(ddof=1):.2f} (n=2)" in md  # one cell per merge, both seeds
    assert len(md.splitlines()[2].split("|")) == 2 + 3 + 1 + 1  # one row: dataset, architecture, 3 merges


def test_a_rerun_reuses_every_variant_run(guide_runs, monkeypatch, capsys):
    monkeypatch.setattr("experiments.train.train_and_evaluate",
                        lambda *a, **k: pytest.fail("a finished variant run was trained again"))
    reproduce.main(_argv(guide_runs))
    assert capsys.readouterr().out.count("finished already with this config, reused") == 6


def test_plots_give_each_cell_its_own_colour(guide_runs, monkeypatch):
    curves = plots.load(sorted(guide_runs.glob("*/*")))
    colour = {}
    for c in curves:
        assert colour.setdefault(c.label, c.color) == c.color  # the seeds of a cell share it
    assert sorted(colour) == sorted(f"Adam (merge={m})" for m in MERGES)
    assert len(set(colour.values())) == 3

    figures, close = [], plt.close
    monkeypatch.setattr(plots.plt, "close", figures.append)  # keep the figures to look at them
    plots.make_plots(sorted(guide_runs.glob("*/*")), guide_runs / "plots_again")
    monkeypatch.undo()
    ax = figures[0].axes[0]
    assert len(ax.get_lines()) == 6
    assert {line.get_color() for line in ax.get_lines()} == set(colour.values())
    assert sorted(ax.get_legend_handles_labels()[1]) == sorted(colour)
    for fig in figures:
        close(fig)


@pytest.mark.parametrize("option, message", [
    ("bogus_key=1", "unknown config key 'bogus_key' (every key, with its default, is in configs/default.py)"),
    ("epochs=3", "unknown config key 'epochs' (did you mean 'total_epochs'"),
    ("merge=sum,bogus", "merge='bogus', expected one of"),
    ("branches=0", "branches=0 must be an integer ≥ 1"),
    ("branches=three", "branches=three: expected an integer"),
    ("seed=1", "use --seeds"),
    ("merge", "expected KEY=VALUE"),
])
def test_a_bad_variant_fails_before_any_training(option, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reproduce, "run_sweep", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["--config", TINY, "--trainers", "adam,fenchel", "--workdir", str(tmp_path / "w"),
                        "--set", "total_epochs=1", "--set", option])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()


def test_a_trainer_that_ignores_a_field_runs_once(tmp_path):
    config = load_config(TINY)
    sets = reproduce.parse_sets(["lambda_=1,3", "merge=sum,mean"], config)
    planned = reproduce.plan_variants(config, "tiny", sets, ["adam", "fenchel"], [0], tmp_path)
    names = [name for _, name, _ in planned]
    assert names == ["tiny+lambda_=1.0+merge=sum", "tiny+lambda_=1.0+merge=mean", "tiny+lambda_=3.0+merge=sum",
                     "tiny+lambda_=3.0+merge=mean"]
    assert [trainers for _, _, trainers in planned] == [["adam", "fenchel"], ["adam", "fenchel"], ["fenchel"],
                                                        ["fenchel"]]
    assert [(c.lambda_, c.merge) for c, _, _ in planned] == [(1.0, "sum"), (1.0, "mean"), (3.0, "sum"), (3.0, "mean")]


def test_values_parse_by_type_and_never_share_a_workdir_name():
    config = load_config(TINY)
    assert reproduce.split_values("dense:32,'dense:32,dense:16', (1, 2)") == ["dense:32", "'dense:32,dense:16'",
                                                                               "(1, 2)"]
    sets = reproduce.parse_sets(["layers=dense:32,'dense:32,dense:16',dense_32", "lambda_per_layer=(1.0,),()",
                                 "normalize=true,false", "rho=1e-5"], config)
    assert sets == {"layers": ["dense:32", "dense:32,dense:16", "dense_32"], "lambda_per_layer": [(1.0,), ()],
                    "normalize": [True, False], "rho": [1e-5]}
    names = [reproduce.variant_name({key: v}) for key, values in sets.items() for v in values]
    assert len(set(names)) == len(names)
    assert all("/" not in n and "," not in n and ":" not in n for n in names)
    assert reproduce.variant_name({"merge": "guide", "branches": 3}) == "branches=3+merge=guide"


# ---------------------------------------------------------------- plots on synthetic workdirs (tables' grouping)
def _fake_run(root, name, trainer, seed, acc, summary=True, **config):
    d = root / name
    d.mkdir(parents=True)
    cfg = {"dataset": "mnist", "layers": "dense:300", "total_epochs": 10, "trainer": trainer, "seed": seed,
           "learning_rate": 0.0, "momentum": 0.9, "lambda_": 3.0, "branches": 1, "merge": "sum", **config}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "wall_time": 1.0 * e, "test_accuracy": acc})
                                             + "\n" for e in (1, 2)))
    if summary:
        (d / "summary.json").write_text(json.dumps({
            "trainer": trainer, "dataset": cfg["dataset"], "architecture": "784-300-10", "seed": seed, "epochs": 2,
            "wall_time": 2.0, "test_accuracy": acc}))
    return d


def test_plot_labels_follow_the_table_rows_and_columns(tmp_path):
    dirs = []
    for epochs in (5, 10):  # a base field: two table rows
        for merge in MERGES:  # a trainer's own field: three columns per trainer
            for trainer in ("adam", "fenchel"):
                for seed in (0, 1):
                    dirs.append(_fake_run(tmp_path, f"e{epochs}_{merge}_{trainer}_{seed}", trainer, seed, 0.9,
                                          summary=seed == 0, total_epochs=epochs, merge=merge, branches=3))
    table = tables.aggregate(tables.load_runs(dirs))
    assert len(table.rows) == 2 and len(table.columns) == 2 * 3
    curves = plots.load(dirs)
    labels = {c.label for c in curves}
    assert len(labels) == 12  # 2 rows × 2 trainers × 3 merges, seeds together, unfinished seed 1 included
    assert "mnist 784-300-10 (total_epochs=5): Fenchel (merge=guide)" in labels
    assert len({c.color for c in curves}) == 12  # more cells than the 10 default colours, still all distinct
    assert len({(c.label, c.color) for c in curves}) == 12


def test_reproduce_without_set_keeps_its_layout(tmp_path):
    config = load_config(TINY)
    [(run, name, trainers)] = reproduce.plan_variants(config, "tiny", {}, ["adam"], [0, 1], tmp_path)
    assert name == "tiny" and trainers == ["adam"]
    assert [d for _, d in sweep.plan(run, name, trainers, [0, 1], tmp_path)] == [tmp_path / "tiny" / "adam_seed0",
                                                                                tmp_path / "tiny" / "adam_seed1"]
