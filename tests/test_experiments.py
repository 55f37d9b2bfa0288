"""Experiment system: configs, launcher end to end, resume, divergence stop, sweeps, tables."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import tables
from experiments.configs_util import apply_overrides, load_config
from experiments.sweep import plan
from experiments.train import TRAINERS, _Job, atomic_write_bytes, read_metrics, train_and_evaluate, validate_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.py"))
CONFIGS = [c for c in CONFIGS if c.name != "__init__.py"]


def tiny(**overrides):
    return apply_overrides(load_config(ROOT / "configs" / "tiny.py"), [f"{k}={v!r}" for k, v in overrides.items()])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads_and_validates(path):
    config = load_config(path)
    validate_config(config)
    text = path.read_text()
    assert "python -m experiments.run --config" in text, "each config documents its command"


@pytest.mark.parametrize("override,message", [
    ("lambda_=-1.0", "lambda_"),
    ("batch_size=0", "batch_size"),
    ("activation='gelu'", "activation"),
    ("trainer='rmsprop'", "trainer"),
    ("rho_prox=-0.1", "rho_prox"),
    ("total_steps=10", "exactly one of total_epochs"),
    ("rho_prox_per_layer=(0.1, 0.2, 0.3)", "rho_prox_per_layer needs 2 values"),
    ("lambda_per_layer=(1.0, -2.0)", "lambda_per_layer"),
])
def test_bad_values_fail_before_compute(override, message):
    with pytest.raises(ValueError, match=message):
        validate_config(apply_overrides(load_config(ROOT / "configs" / "default.py"), [override]))


def test_unknown_keys_and_wrong_types_are_clear_errors():
    with pytest.raises(ValueError, match="unknown config key 'lamda'"):
        apply_overrides(load_config(ROOT / "configs" / "default.py"), ["lamda=2"])
    with pytest.raises(ValueError, match="bad value for batch_size"):
        apply_overrides(load_config(ROOT / "configs" / "default.py"), ["batch_size='big'"])
    config = load_config(ROOT / "configs" / "default.py")
    config.unlock()
    config.typo_key = 1
    with pytest.raises(ValueError, match="unknown config key"):
        validate_config(config)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_tiny_run_writes_the_workdir(trainer, tmp_path):
    summary = train_and_evaluate(tiny(trainer=trainer), tmp_path)
    for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoint.msgpack"):
        assert (tmp_path / name).exists(), name
    records = read_metrics(tmp_path)
    assert [r["epoch"] for r in records] == [1, 2]
    assert summary["test_accuracy"] > 0.6  # learns something on 2,000 images in 2 epochs
    if trainer in ("fenchel", "lnn"):
        assert "lifted_objective" in records[-1] and len(records[-1]["penalties"]) == 1
        assert "warm_start_test_accuracy" in summary
    if trainer == "fenchel":  # the lifted objective lower-bounds the network loss on its batch
        r = records[-1]
        assert r["lifted_objective"] <= r["network_loss_same_batch"] + r["regulariser"] + 1e-6
    assert json.loads((tmp_path / "config.json").read_text())["trainer"] == trainer


@pytest.mark.parametrize("trainer", ["fenchel", "adam"])
def test_resume_after_interruption_matches_an_uninterrupted_run(trainer, tmp_path):
    config = tiny(trainer=trainer, warm_start_epochs=0, total_epochs=3)
    full = train_and_evaluate(config, tmp_path / "full")
    assert train_and_evaluate(config, tmp_path / "cut", max_epochs_this_run=1) == {"interrupted_after_epoch": 1}
    assert len(read_metrics(tmp_path / "cut")) == 1
    resumed = train_and_evaluate(config, tmp_path / "cut")
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["epoch"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("test_accuracy", "train_loss", "lifted_objective"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-7), key
    assert full["test_accuracy"] == pytest.approx(resumed["test_accuracy"], abs=1e-9)


def test_relaunch_with_another_config_is_refused(tmp_path):
    train_and_evaluate(tiny(trainer="adam", total_epochs=1), tmp_path)
    with pytest.raises(ValueError, match="another config"):
        train_and_evaluate(tiny(trainer="adam", total_epochs=1, learning_rate=0.5), tmp_path)


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = tiny(trainer="fenchel", warm_start_epochs=0, total_epochs=3)
    original = _Job.run_epoch

    def poisoned(self, state, epoch, progress):
        state, seconds, flagged = original(self, state, epoch, progress)
        if epoch == 2:
            state = {**state, "params": [{k: v * jnp.nan for k, v in layer.items()} for layer in state["params"]]}
        return state, seconds, flagged

    monkeypatch.setattr(_Job, "run_epoch", poisoned)
    with pytest.raises(FloatingPointError, match="epoch 2 .*last good checkpoint"):
        train_and_evaluate(config, tmp_path)
    monkeypatch.setattr(_Job, "run_epoch", original)
    job = _Job(config, tmp_path)
    state = job.restore()
    assert int(state["epoch"]) == 1
    assert all(bool(jnp.all(jnp.isfinite(leaf["kernel"]))) for leaf in state["params"])
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1]


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old")

    with pytest.raises(TypeError):
        atomic_write_bytes(target, object())  # the write fails midway
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]  # no temporary file left behind


def test_sweep_plan_expands_configs_trainers_and_seeds(tmp_path):
    runs = plan([ROOT / "configs" / "tiny.py"], ["adam", "fenchel"], [0, 1], tmp_path, ["total_epochs=1"])
    assert [str(d.relative_to(tmp_path)) for _, d in runs] == [
        "tiny/adam_seed0", "tiny/adam_seed1", "tiny/fenchel_seed0", "tiny/fenchel_seed1"]
    assert all(c.total_epochs == 1 for c, _ in runs)
    with pytest.raises(ValueError, match="unknown trainer"):
        plan([ROOT / "configs" / "tiny.py"], ["newton"], [0], tmp_path)


def test_table_means_and_stds_on_synthetic_workdirs(tmp_path):
    accs = {"adam": [0.97, 0.98, 0.99], "fenchel": [0.95, 0.97]}
    dirs = []
    for trainer, values in accs.items():
        for seed, acc in enumerate(values):
            d = tmp_path / f"{trainer}_{seed}"
            d.mkdir()
            summary = {"trainer": trainer, "dataset": "mnist", "architecture": "784-300-10", "seed": seed,
                       "epochs": 10, "wall_time": 10.0 + seed, "test_accuracy": acc}
            if trainer == "fenchel":
                summary.update(warm_start_test_accuracy=acc + 0.01, warm_start_wall_time=1.0)
            (d / "summary.json").write_text(json.dumps(summary))
            dirs.append(d)
    agg = tables.aggregate(tables.load_runs(dirs))[("mnist", "784-300-10")]
    assert agg["Adam"][0] == pytest.approx(98.0) and agg["Adam"][1] == pytest.approx(1.0)
    assert agg["Fenchel"][0] == pytest.approx(96.0) and agg["Fenchel"][1] == pytest.approx(np.sqrt(2.0))
    assert agg["Fenchel + warm start"][0] == pytest.approx(97.0)
    assert agg["Fenchel + warm start"][4] == pytest.approx(11.5)  # lifted + fine-tune time
    assert "SGD" not in agg
    md = tables.write_tables(dirs, tmp_path / "out" / "table")
    assert "98.00 ± 1.00 (n=3)" in md and "96.00 ± 1.41 (n=2)" in md
    assert (tmp_path / "out" / "table.csv").read_text().count("\n") == 4
    assert r"98.00 \pm 1.00" in (tmp_path / "out" / "table.tex").read_text()
