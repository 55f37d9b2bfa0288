"""Experiment system: configs, the trainer registry, the launcher end to end, resume, integrity, sweeps."""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import loop, plots, tables, trainers
from experiments.configs_util import load_config
from experiments.sweep import plan, run_sweep
from experiments.train import Job, TrainingDiverged, train_and_evaluate, validate_config
from experiments.workdir import Workdir, WorkdirBusy, WorkdirError
from fenchel import LiftedConfig, StepInfo, Trainer

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [c for c in sorted((ROOT / "configs").glob("*.py")) if c.name != "__init__.py"]


def tiny(**overrides):
    config = load_config(ROOT / "configs" / "tiny.py")
    config.update(overrides)
    return config


def records(path):
    return Workdir(path).read_metrics()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads_and_validates(path):
    config = load_config(path)
    validate_config(config)
    assert "python -m experiments.run --config" in path.read_text(), "each config documents its command"


@pytest.mark.parametrize("override,message", [
    ({"lambda_": -1.0}, "lambda_"),
    ({"lambda_": 1e12}, "lambda_=1000000000000.0: must be at most 1e\\+06"),
    ({"batch_size": 0}, "batch_size"),
    ({"activation": "gelu"}, "activation"),
    ({"trainer": "rmsprop"}, "trainer"),
    ({"rho_prox": -0.1}, "rho_prox"),
    ({"total_steps": 10}, "exactly one of total_epochs"),
    ({"rho_prox_per_layer": (0.1, 0.2, 0.3)}, "rho_prox_per_layer needs 2 values"),
    ({"lambda_per_layer": (1.0, -2.0)}, "lambda_per_layer"),
    ({"layers": "dense:32,dense:abc"}, "layers: 'dense:abc' needs an integer width"),
    ({"seed": -1}, "seed=-1"),
    ({"x_max_steps": 0}, "x_max_steps"),
    ({"learning_rate": -1.0, "trainer": "adam"}, "learning_rate"),
    ({"warm_start_lr": 0.0}, "warm_start_lr"),
    ({"dataset": "npz"}, "data_file"),
])
def test_bad_values_fail_before_compute(override, message):
    with pytest.raises(ValueError, match=message):
        validate_config(tiny(**override))


def test_unknown_keys_are_clear_errors():
    config = tiny()
    config.typo_key = 1
    with pytest.raises(ValueError, match="unknown config key.*typo_key"):
        validate_config(config)


# ---------------------------------------------------------------- the launcher end to end
@pytest.mark.parametrize("trainer", sorted(trainers.TRAINERS))
def test_tiny_run_writes_the_workdir(trainer, tmp_path):
    summary = train_and_evaluate(tiny(trainer=trainer), tmp_path)
    for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoint.msgpack"):
        assert (tmp_path / name).exists(), name
    recs = records(tmp_path)
    assert [r["epoch"] for r in recs] == [1, 2]
    assert summary["test_accuracy"] > 0.6  # learns something on 2,000 images in 2 epochs
    assert summary["architecture"] == "784-32-10"
    if trainer in ("fenchel", "lnn"):
        assert "lifted_objective" in recs[-1] and len(recs[-1]["penalties"]) == 1
        assert "warm_start_test_accuracy" in summary
    if trainer == "fenchel":  # the lifted objective lower-bounds the network loss on its batch
        r = recs[-1]
        assert r["lifted_objective"] <= r["network_loss_same_batch"] + r["regulariser"] + 1e-6
    assert json.loads((tmp_path / "config.json").read_text())["trainer"] == trainer
    assert stat_mode(tmp_path / "checkpoint.msgpack") == 0o666 & ~current_umask()


def stat_mode(path):
    return os.stat(path).st_mode & 0o777


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_warm_start_starts_from_the_lifted_weights(tmp_path):
    """With a vanishing fine-tuning step the warm-started network must predict as the lifted one does."""
    summary = train_and_evaluate(tiny(warm_start_lr=1e-12), tmp_path)
    assert summary["warm_start_test_accuracy"] == summary["test_accuracy"]
    assert summary["test_accuracy"] > 0.6  # far from the untrained network's accuracy


def test_flax_network_equals_the_lifted_forward_map():
    """The flax network loaded with lifted weights computes relu(X W0 + b0) W1 + b1 (numpy)."""
    job = Job(tiny(train_size=200, test_size=50))
    params = job.params0
    x = np.asarray(job.data.x_test, np.float64)
    p = [{k: np.asarray(v, np.float64) for k, v in layer.items()} for layer in params]
    expected = np.maximum(x @ p[0]["kernel"] + p[0]["bias"], 0) @ p[1]["kernel"] + p[1]["bias"]
    from fenchel.models import to_flax
    got = np.asarray(job.model.apply(to_flax(params), job.data.x_test))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    acc = float(np.mean(np.argmax(expected, 1) == job.data.y_test))
    assert job.test_accuracy(params) == pytest.approx(acc, abs=1e-9)


@pytest.mark.parametrize("trainer, extra", [("fenchel", {}), ("adam", {}), ("fenchel", {"outer_momentum": 0.9})],
                         ids=["fenchel", "adam", "fenchel_outer_momentum"])
def test_resume_after_interruption_matches_an_uninterrupted_run(trainer, extra, tmp_path):
    """The whole training state is checkpointed (with outer momentum: its velocity too)."""
    config = tiny(trainer=trainer, warm_start_epochs=0, total_epochs=3, **extra)
    full = train_and_evaluate(config, tmp_path / "full")
    assert train_and_evaluate(config, tmp_path / "cut", max_epochs_this_run=1) == {"interrupted_after_epoch": 1}
    assert len(records(tmp_path / "cut")) == 1
    resumed = train_and_evaluate(config, tmp_path / "cut")
    a, b = records(tmp_path / "full"), records(tmp_path / "cut")
    assert [r["epoch"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("test_accuracy", "train_loss", "lifted_objective"):
            if key in ra:
                assert ra[key] == rb[key], key
    assert full["test_accuracy"] == resumed["test_accuracy"]


def test_wall_time_counts_each_epoch_once(tmp_path, monkeypatch):
    """With a clock that ticks 1 s per reading, 3 epochs take 3 s whether or not the run was interrupted."""

    class Clock:
        now = 0.0

        def perf_counter(self):
            self.now += 1.0
            return self.now

    monkeypatch.setattr(loop, "time", Clock())
    config = tiny(trainer="adam", total_epochs=3, train_size=400)
    assert train_and_evaluate(config, tmp_path / "full")["wall_time"] == 3.0
    train_and_evaluate(config, tmp_path / "cut", max_epochs_this_run=2)
    assert train_and_evaluate(config, tmp_path / "cut")["wall_time"] == 3.0
    assert [r["wall_time"] for r in records(tmp_path / "cut")] == [1.0, 2.0, 3.0]


def test_relaunch_with_another_config_is_refused(tmp_path):
    train_and_evaluate(tiny(trainer="adam", total_epochs=1), tmp_path)
    with pytest.raises(WorkdirError, match="config.json holds a run with another config.*learning_rate"):
        train_and_evaluate(tiny(trainer="adam", total_epochs=1, learning_rate=0.5), tmp_path)


def test_missing_config_json_cannot_smuggle_in_another_config(tmp_path):
    config = tiny(trainer="fenchel", total_epochs=2, warm_start_epochs=0)
    train_and_evaluate(config, tmp_path, max_epochs_this_run=1)
    (tmp_path / "config.json").unlink()
    with pytest.raises(WorkdirError, match="checkpoint.msgpack was written under another config"):
        train_and_evaluate(tiny(trainer="fenchel", total_epochs=2, warm_start_epochs=0, lambda_=1.0), tmp_path)
    assert not (tmp_path / "config.json").exists()  # the refused command wrote nothing
    train_and_evaluate(config, tmp_path)  # the original config resumes and restores config.json
    assert [r["epoch"] for r in records(tmp_path)] == [1, 2]
    assert json.loads((tmp_path / "config.json").read_text())["lambda_"] == 3.0


def test_a_flipped_checkpoint_byte_is_an_error_naming_the_file(tmp_path):
    config = tiny(trainer="fenchel", total_epochs=2, warm_start_epochs=0)
    train_and_evaluate(config, tmp_path, max_epochs_this_run=1)
    path = tmp_path / "checkpoint.msgpack"
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x01  # same size, one bit of a weight changed
    path.write_bytes(bytes(data))
    with pytest.raises(WorkdirError, match="checkpoint.msgpack.*corrupted"):
        train_and_evaluate(config, tmp_path)


def test_a_corrupt_metrics_line_is_an_error_and_deletes_nothing(tmp_path):
    config = tiny(trainer="adam", total_epochs=3, train_size=400)
    train_and_evaluate(config, tmp_path, max_epochs_this_run=2)
    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0][:10] + "\n" + lines[1])  # a damaged first record, a good second one
    before = path.read_bytes()
    with pytest.raises(WorkdirError, match="metrics.jsonl:1"):
        train_and_evaluate(config, tmp_path)
    assert path.read_bytes() == before


def test_a_torn_last_line_is_set_aside_and_the_run_resumes(tmp_path):
    config = tiny(trainer="adam", total_epochs=2, train_size=400)
    train_and_evaluate(config, tmp_path, max_epochs_this_run=1)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "te')  # what a crash in the middle of an append leaves
    train_and_evaluate(config, tmp_path)
    assert [r["epoch"] for r in records(tmp_path)] == [1, 2]
    assert '{"epoch": 2, "te' in (tmp_path / "metrics.torn.txt").read_text()


def test_records_beyond_the_checkpoint_are_superseded_not_lost(tmp_path):
    config = tiny(trainer="adam", total_epochs=2, train_size=400)
    train_and_evaluate(config, tmp_path, max_epochs_this_run=1)
    extra = {"epoch": 2, "test_accuracy": 0.5}  # a crash between the metrics append and the checkpoint
    Workdir(tmp_path).append_metrics(extra)
    train_and_evaluate(config, tmp_path)
    assert [r["epoch"] for r in records(tmp_path)] == [1, 2]
    superseded = [json.loads(line) for line in (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()]
    assert superseded == [extra]


def test_a_second_launch_into_a_busy_workdir_is_refused(tmp_path):
    with Workdir(tmp_path).lock():
        with pytest.raises(WorkdirBusy, match="is using"):
            train_and_evaluate(tiny(trainer="adam", total_epochs=1), tmp_path)
    train_and_evaluate(tiny(trainer="adam", total_epochs=1), tmp_path)  # free again


def test_leftover_temporary_files_are_removed_on_start(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    leftover = tmp_path / ".checkpoint.msgpack.tmp-abc123"
    leftover.write_bytes(b"partial")
    train_and_evaluate(tiny(trainer="adam", total_epochs=1, train_size=400), tmp_path)
    assert not leftover.exists()


# ---------------------------------------------------------------- divergence
def _poison(monkeypatch, at_epoch):
    original = Job.fit_epoch

    def poisoned(self, trainer, state, epoch, fine_tune=False, on_step=None):
        state, result = original(self, trainer, state, epoch, fine_tune, on_step)
        if epoch == at_epoch:
            state = [{k: v * jnp.nan for k, v in layer.items()} for layer in state]
        return state, result

    monkeypatch.setattr(Job, "fit_epoch", poisoned)
    return original


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = tiny(trainer="fenchel", warm_start_epochs=0, total_epochs=3)
    original = _poison(monkeypatch, 2)
    with pytest.raises(TrainingDiverged, match="epoch 2 .*last good checkpoint .*\\(epoch 1\\) is kept"):
        train_and_evaluate(config, tmp_path)
    monkeypatch.setattr(Job, "fit_epoch", original)
    meta, _ = Workdir(tmp_path).load_checkpoint()
    assert meta["epoch"] == 1
    assert [r["epoch"] for r in records(tmp_path)] == [1]


def test_divergence_in_the_first_epoch_says_nothing_is_kept(tmp_path, monkeypatch):
    _poison(monkeypatch, 1)
    with pytest.raises(TrainingDiverged, match="no checkpoint was saved"):
        train_and_evaluate(tiny(trainer="fenchel", warm_start_epochs=0), tmp_path)
    assert Workdir(tmp_path).load_checkpoint() is None


def test_a_finite_blow_up_stops_the_run(tmp_path):
    """Adam with lr 1e6 ends near chance with finite weights; the loss-growth guard must stop it."""
    with pytest.raises(TrainingDiverged, match="divergence_factor|non-finite"):
        train_and_evaluate(tiny(trainer="adam", learning_rate=1e6, total_epochs=2), tmp_path)
    assert not (tmp_path / "summary.json").exists()


# ---------------------------------------------------------------- a trainer defined here, nowhere else
class PlainGradientDescent(Trainer):
    """θ ← θ − η ∇ mean softmax cross-entropy (a toy trainer for the registry test)."""

    def __init__(self, layers, penalty, lr):
        from fenchel.lifted import forward, loss_per_sample

        def loss(params, x, y):
            return jnp.mean(loss_per_sample("softmax", y, forward(params, x, penalty, layers)[1]))

        def step(params, x, y):
            value, grads = jax.value_and_grad(loss)(params, x, y)
            params = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)
            return params, StepInfo(value, ~jnp.isfinite(value))

        self._step = jax.jit(step)

    def init(self, params):
        return [dict(p) for p in params]

    def step(self, state, x, y):
        return self._step(state, x, y)

    def params(self, state):
        return state


@pytest.fixture
def toy_trainer():
    def check(c):
        if not c.toy_lr > 0:
            raise ValueError(f"bad config: toy_lr={c.toy_lr} must be > 0")

    spec = trainers.TrainerSpec(name="toy_gd", title="Toy GD", fields={"toy_lr": 0.5}, check=check,
                                build=lambda c, layers, penalty: PlainGradientDescent(layers, penalty, c.toy_lr))
    trainers.register(spec)
    yield spec
    trainers.unregister("toy_gd")


def test_a_trainer_registered_in_a_test_runs_through_launcher_tables_and_plots(toy_trainer, tmp_path):
    runs = []
    for seed in (0, 1):
        config = tiny(trainer="toy_gd", seed=seed)
        assert config.toy_lr == 0.5  # the config picked up the new field
        summary = train_and_evaluate(config, tmp_path / f"toy{seed}")
        assert summary["test_accuracy"] > 0.6
        runs.append(tmp_path / f"toy{seed}")
    with pytest.raises(ValueError, match="toy_lr"):
        validate_config(tiny(trainer="toy_gd", toy_lr=-1.0))
    md = tables.write_tables(runs, tmp_path / "table")
    accs = [json.loads((d / "summary.json").read_text())["test_accuracy"] for d in runs]
    assert "Toy GD" in md and f"{100 * np.mean(accs):.2f} ± {100 * np.std(accs, ddof=1):.2f} (n=2)" in md
    assert {p.name for p in plots.make_plots(runs, tmp_path / "plots")} >= {"accuracy_vs_epoch.png"}


def test_a_user_npz_dataset_with_3_classes_and_20_features(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (3, 20))

    def sample(n):
        y = rng.integers(0, 3, n)
        return (centres[y] + rng.normal(0, 1, (n, 20))).astype(np.float32), y

    x_train, y_train = sample(600)
    x_test, y_test = sample(200)
    np.savez(tmp_path / "blobs.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    config = tiny(dataset="npz", data_file=str(tmp_path / "blobs.npz"), train_size=0, test_size=0, batch_size=50,
                  layers="dense:16", total_epochs=3, objective_batch=100)
    summary = train_and_evaluate(config, tmp_path / "run")
    assert summary["architecture"] == "20-16-3"
    assert summary["test_accuracy"] > 0.9


# ---------------------------------------------------------------- sweeps
def test_sweep_plan_expands_trainers_and_seeds(tmp_path):
    runs = plan(tiny(total_epochs=1), "tiny", ["adam", "fenchel"], [0, 1], tmp_path)
    assert [str(d.relative_to(tmp_path)) for _, d in runs] == [
        "tiny/adam_seed0", "tiny/adam_seed1", "tiny/fenchel_seed0", "tiny/fenchel_seed1"]
    assert [(c.trainer, c.seed, c.total_epochs) for c, _ in runs] == [
        ("adam", 0, 1), ("adam", 1, 1), ("fenchel", 0, 1), ("fenchel", 1, 1)]
    with pytest.raises(ValueError, match="unknown trainer"):
        plan(tiny(), "tiny", ["newton"], [0], tmp_path)


def test_sweep_never_reuses_a_run_made_with_another_config(tmp_path):
    config = tiny(total_epochs=1, train_size=400)
    done, failed = run_sweep(config, "tiny", ["adam"], [0, 1], tmp_path)
    assert len(done) == 2 and not failed
    again, failed = run_sweep(config, "tiny", ["adam"], [0, 1], tmp_path)  # same config: reused
    assert again == done and not failed
    other = tiny(total_epochs=2, train_size=400)
    (tmp_path / "tiny" / "adam_seed1" / "config.json").unlink()
    (tmp_path / "tiny" / "adam_seed1" / "summary.json").unlink()
    done, failed = run_sweep(other, "tiny", ["adam"], [0, 1], tmp_path)
    # seed 0 holds the 1-epoch run: refused and reported, and the sweep went on to seed 1, whose
    # checkpoint (config.json deleted) is of the old config: refused as well
    assert [d.name for d, _ in failed] == ["adam_seed0", "adam_seed1"] and not done
    assert "another config" in failed[0][1] and "another config" in failed[1][1]
    assert Workdir(tmp_path / "tiny" / "adam_seed0").read_summary()["epochs"] == 1


# ---------------------------------------------------------------- the command line: one clear line per error
def cli(*args, cwd=ROOT, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args,message", [
    (["--config.lamda=2"], "--config.lamda=2: unknown config key 'lamda' (Did you mean \"lambda_\""),
    (["--config.epoch=3"], "--config.epoch=3: unknown config key 'epoch' (did you mean 'total_epochs'"),
    (["--config.seed=-1"], "seed=-1 must be ≥ 0"),
    (["--config.layers=dense:32,dense:abc"], "layers: 'dense:abc' needs an integer width"),
    (["--config.batch_size=big"], "batch_size"),
])
def test_cli_errors_are_one_line(args, message, tmp_path):
    out = cli("-m", "experiments.run", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"), *args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
    assert not (tmp_path / "w").exists()


def test_cli_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [(["--config", "configs/nope.py", "--workdir", str(tmp_path / "w")],
              "config file configs/nope.py not found"),
             (["--config", str(bad), "--workdir", str(tmp_path / "w")], "syntax error in"),
             (["--config", "configs/tiny.py", "--workdir", str(a_file)], "is a file"),
             (["--config", "configs/tiny.py", "--workdir", str(a_file / "sub")], str(a_file))]
    for args, message in cases:
        out = cli("-m", "experiments.run", *args)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and message in lines[0], (args, out.stderr)


def test_ctrl_c_says_how_to_resume(tmp_path):
    # 5,000 epochs: the run must still be going when SIGINT comes, even if this process stalls for a while.
    # The child installs Python's SIGINT handler itself: an ignored signal is inherited through exec, and Python
    # then installs none (an earlier test in the session can leave SIGINT ignored in this process).
    args = ["--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"), "--config.train_size=0",
            "--config.total_epochs=5000"]
    launch = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
              f"sys.argv = ['experiments.run', *{args!r}]; runpy.run_module('experiments.run', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", launch], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        start = time.time()
        while not (tmp_path / "w" / "metrics.jsonl").exists() and time.time() < start + 90:
            time.sleep(0.2)
        waited = time.time() - start
        proc.send_signal(signal.SIGINT)
        # the exit waits for the steps already dispatched (up to an epoch): minutes on a loaded 2-core machine
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    epochs = len(Workdir(tmp_path / "w").read_metrics())
    assert proc.returncode == 130, (f"exit {proc.returncode}; SIGINT sent {waited:.1f} s after launch, "
                                    f"{epochs} epoch(s) logged; stderr ends: {err[-2000:]}")
    assert "interrupted; relaunch the same command to resume" in err.strip().splitlines()[-1]
    assert Workdir(tmp_path / "w").load_checkpoint() is not None


def test_parameter_history_is_recorded_without_changing_the_run(tmp_path):
    from experiments.workdir import read_history

    config = tiny(trainer="fenchel", warm_start_epochs=0, train_size=400)  # 4 steps per epoch, 2 epochs
    plain = train_and_evaluate(config, tmp_path / "plain")
    config.record_every = 3
    recorded = train_and_evaluate(config, tmp_path / "rec", max_epochs_this_run=1)  # an interruption too
    recorded = train_and_evaluate(config, tmp_path / "rec")
    assert recorded["test_accuracy"] == plain["test_accuracy"]
    losses = [[r["train_loss"] for r in records(tmp_path / name)] for name in ("rec", "plain")]
    assert losses[0] == losses[1]
    steps, arrays = read_history(tmp_path / "rec")
    assert steps.tolist() == [0, 3, 6]
    assert arrays["layer_0/kernel"].shape == (3, 784, 32) and arrays["layer_0/kernel"].dtype == np.float32
    job = Job(config)
    np.testing.assert_array_equal(arrays["layer_1/bias"][0], np.asarray(job.params0[1]["bias"], np.float32))
    assert not np.array_equal(arrays["layer_0/kernel"][1], arrays["layer_0/kernel"][0])


def test_registering_a_new_trainer_does_not_invalidate_existing_workdirs(tmp_path):
    config = tiny(trainer="adam", total_epochs=2, train_size=400)
    train_and_evaluate(config, tmp_path / "done")
    train_and_evaluate(config, tmp_path / "half", max_epochs_this_run=1)
    spec = trainers.TrainerSpec(name="later", title="Later", fields={"later_rate": 1.0}, check=lambda c: None,
                                build=lambda c, layers, penalty: None)
    trainers.register(spec)
    try:
        again = tiny(trainer="adam", total_epochs=2, train_size=400)
        assert "later_rate" in again
        assert train_and_evaluate(again, tmp_path / "done")["epochs"] == 2  # finished: its summary
        assert train_and_evaluate(again, tmp_path / "half")["epochs"] == 2  # half done: resumes
        with pytest.raises(WorkdirError, match="another config"):  # a real difference is still refused
            train_and_evaluate(tiny(trainer="adam", total_epochs=2, train_size=400, momentum=0.5), tmp_path / "done")
    finally:
        trainers.unregister("later")


def test_fields_added_later_keep_earlier_runs_identity():
    """A config.json saved before `branches`/`merge` existed has the hash of today's config at their original
    values (so such runs resume); another value is another run."""
    from experiments.train import identity
    from experiments.workdir import config_hash

    today = tiny()
    before = json.loads(today.to_json())
    del before["branches"], before["merge"]
    assert config_hash(identity(today)) == config_hash(identity(before))
    today.branches = 3
    assert config_hash(identity(today)) != config_hash(identity(before))


def test_w_retry_reaches_the_trainer_and_leaves_the_runs_identity_alone():
    """--config.w_retry=False builds a trainer without the W-block retry; a run that goes on is the same run with
    or without it (a block it would rescue stops the run instead), so relaunching with it changed resumes."""
    from experiments.train import Job, identity
    from experiments.workdir import config_hash

    on, off = tiny(trainer="fenchel"), tiny(trainer="fenchel", w_retry=False)
    assert on.w_retry is True
    assert Job(on).trainer.config.w_retry is True and Job(off).trainer.config.w_retry is False
    assert config_hash(identity(on)) == config_hash(identity(off))


def test_time_to_accuracy_sums_the_training_seconds_up_to_the_first_epoch_reaching_it():
    """bench_mnist's time to target, by hand: an off-by-one epoch or a sum over all epochs would differ."""
    from experiments.bench_mnist import time_to

    accs, seconds = {1: 0.90, 2: 0.976, 3: 0.97, 4: 0.98}, [1.0, 2.5, 4.0, 8.0]
    assert time_to(accs, seconds, 0.975) == (2, 3.5)
    assert time_to(accs, seconds, 0.98) == (4, 15.5)
    assert time_to(accs, seconds, 0.99) == (None, None)


@pytest.mark.parametrize("trainer", ["fenchel", "adam"])
def test_bench_mnist_epochs_exclude_compilation(trainer, monkeypatch):
    """bench_mnist's timed epochs (its time to accuracy) compile nothing: its warm-up compiles the program the
    epoch loop runs (the fused gather + step), not only `trainer.step`, which left that to epoch 1's clock."""
    from experiments import bench_mnist

    job = Job(tiny(trainer=trainer, total_epochs=2, train_size=400))
    compiles, in_epoch = [], [False]

    def on_event(event, seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration" and in_epoch[0]:
            compiles.append(event)

    fit_epoch = job.fit_epoch

    def counted(*args, **kwargs):
        in_epoch[0] = True
        try:
            return fit_epoch(*args, **kwargs)
        finally:
            in_epoch[0] = False

    monkeypatch.setattr(job, "fit_epoch", counted)
    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        accs, seconds, _ = bench_mnist.train(job, [1, 2])
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    assert len(seconds) == 2 and set(accs) == {1, 2}
    assert compiles == [], f"{len(compiles)} compilations inside the timed epochs"


def test_bench_iteration_flags_reach_the_lifted_trainers_only():
    """`experiments.bench --x-steps 3 --w-steps 2` benchmarks lifted trainers with those budgets (the fast configs'
    settings); without the flags the configs' own budgets stand. A flag dropped on the way would time the default."""
    from experiments import bench

    flags = argparse.Namespace(x_steps=3, w_steps=2)
    job = bench._job(bench.ARCHITECTURES["784-300-10"], "fenchel", 200, **bench.lifted_iterations(flags))
    assert (job.trainer.config.x_max_steps, job.trainer.config.w_max_steps) == (3, 2)
    assert bench.lifted_iterations(argparse.Namespace(x_steps=None, w_steps=None)) == {}
    default = bench._job(bench.ARCHITECTURES["784-300-10"], "fenchel", 200).trainer.config
    assert (default.x_max_steps, default.w_max_steps) == (LiftedConfig().x_max_steps, LiftedConfig().w_max_steps)


def test_bench_fullbatch_section_fits_every_variant_monotonically(capsys):
    """`experiments.bench --sections fullbatch` on 300 images, 3 sweeps: each variant's objective history starts at
    the same F (the same forward pass) and never increases (κ = 1, every block monotone), the preconditioned form
    ends lower than the plain one, and the table prints one row per variant."""
    from experiments import bench
    args = argparse.Namespace(fullbatch_samples=300, fullbatch_sweeps=3, reps=2)
    out = {}
    bench.section_fullbatch(args, out)
    rows = out["fullbatch"]["rows"]
    assert [(r["w_mode"], r["x_chunk_bytes"]) for r in rows] == list(bench.FULLBATCH_VARIANTS)
    starts = {r["objective"][0] for r in rows}
    assert len(starts) == 1
    for r in rows:
        h = np.asarray(r["objective"])
        assert len(h) == 4 and np.all(np.diff(h) <= 1e-6 * np.abs(h[:-1])), h
    plain, mm = rows[0]["objective"][-1], rows[-1]["objective"][-1]
    assert mm < plain, (mm, plain)
    bench.print_tables({"machine": bench.machine(), **out})
    assert capsys.readouterr().out.count("| primal") == len(rows)


def test_bench_budget_cost_fit_recovers_a_known_cost_model():
    """`bench.linear_cost_fit` on times made exactly from fixed + a·x + b·w (a ≠ b, so swapped per-X and per-W
    coefficients or a dropped intercept would show) returns those three costs."""
    from experiments import bench

    grid = [(1, 1), (1, 3), (3, 1), (3, 2), (10, 1), (10, 3)]
    seconds = [2.0e-3 + 9.0e-5 * x + 2.1e-4 * w for x, w in grid]
    fit = bench.linear_cost_fit(grid, seconds)
    np.testing.assert_allclose([fit["fixed_s"], fit["per_x_iteration_s"], fit["per_w_iteration_s"]],
                               [2.0e-3, 9.0e-5, 2.1e-4], rtol=1e-9)


@pytest.mark.parametrize("text", ["10-3", "0/1,1/1,2/2", "1/1,2/2,3/3", "1/1,1/1,2/1", "a/b,1/1,2/1"])
def test_bench_budget_grid_rejects_what_cannot_be_fitted(text):
    """A malformed budget, a zero budget, or budgets that do not vary X and W independently (collinear or too few)
    are errors before anything is timed."""
    from experiments import bench

    with pytest.raises(ValueError, match="budget"):
        bench.parse_budget_grid(text)


def test_bench_budgets_section_times_each_budget_against_adam(monkeypatch, capsys):
    """`experiments.bench --sections budgets` with a 3-budget grid: each budget reaches its own lifted trainer (a
    budget dropped on the way would time the default twice), each row's ratio is its step over Adam's, and the
    table prints a row per budget."""
    from experiments import bench

    made = []

    class Recording(bench.LiftedTrainer):
        def __init__(self, config, layers):
            made.append((config.x_max_steps, config.w_max_steps))
            super().__init__(config, layers)

    monkeypatch.setattr(bench, "LiftedTrainer", Recording)
    args = argparse.Namespace(budget_grid="1/1,2/1,1/2", budget_warm_steps=2, budget_steps=2, reps=1)
    out = {}
    bench.section_budgets(args, out)
    b = out["budgets"]
    assert made == [(1, 1), (2, 1), (1, 2)]
    assert [(r["x_max_steps"], r["w_max_steps"]) for r in b["rows"]] == made
    for r in b["rows"]:
        assert r["step_s"] > 0 and r["over_adam"] == pytest.approx(r["step_s"] / b["adam_step_s"])
    assert b["fixed_over_adam"] == pytest.approx(b["fit"]["fixed_s"] / b["adam_step_s"])
    bench.print_tables({"machine": bench.machine(), **out})
    printed = capsys.readouterr().out
    assert all(f"| {x} / {w} |" in printed for x, w in made)


def test_bench_retry_section_times_each_trainer_with_the_retry_and_without(monkeypatch, capsys):
    """`experiments.bench --sections retry`: every step budget and every stack_layers mode gets a trainer with
    w_retry True and one with False (a flag dropped on the way would time the same program twice), each JSON
    field takes its own call's time (with and without not swapped; per step, per call), each timed call runs its
    own trainer, and the table prints a row for each. The timing is replaced by distinct made-up medians, so no
    step compiles."""
    from experiments import bench

    made, medians = [], {}

    class Recording(bench.LiftedTrainer):
        def __init__(self, config, layers):
            made.append((config.x_max_steps, config.w_max_steps, config.stack_layers, config.w_retry))
            super().__init__(config, layers)

    def made_up(calls, reps):
        assert reps == 3
        for label, (fn, args) in calls.items():  # the trainer each call would time
            if label == "adam":
                continue
            parts = label.split()
            tr = args[0] if "/" in parts[0] else fn.__defaults__[0]
            assert str(tr.config.w_retry) == parts[-1], label
            if "/" in parts[0]:
                assert f"{tr.config.x_max_steps}/{tr.config.w_max_steps}" == parts[0], label
                assert len(args[2]) == 4  # --budget-steps batches
            else:
                assert tr.config.stack_layers == parts[1], label
        times = {label: {"median_s": 0.1 * (len(medians) + i + 1)} for i, label in enumerate(calls)}
        medians.update({label: t["median_s"] for label, t in times.items()})
        return times

    monkeypatch.setattr(bench, "LiftedTrainer", Recording)
    monkeypatch.setattr(bench, "timed_alternating", made_up)
    monkeypatch.setattr(bench, "EQUAL_WIDTH", 8)
    out = {}
    bench.section_retry(argparse.Namespace(budget_steps=4, reps=3), out)
    xd, wd = LiftedConfig().x_max_steps, LiftedConfig().w_max_steps  # the layers network runs the default budget
    assert made == [(10, 3, "auto", True), (10, 3, "auto", False), (3, 2, "auto", True), (3, 2, "auto", False),
                    (xd, wd, "off", True), (xd, wd, "off", False), (xd, wd, "on", True), (xd, wd, "on", False)]
    r = out["retry"]
    assert r["adam_step_s"] == pytest.approx(medians["adam"] / 4)
    for row, (xs, ws) in zip(r["steps"], ((10, 3), (3, 2))):
        assert (row["x_max_steps"], row["w_max_steps"]) == (xs, ws)
        assert row["step_retry_s"] == pytest.approx(medians[f"{xs}/{ws} True"] / 4)
        assert row["step_no_retry_s"] == pytest.approx(medians[f"{xs}/{ws} False"] / 4)
    for row, mode in zip(r["layers"], ("off", "on")):
        assert row["stack_layers"] == mode
        for key, label in (("w_step", "w"), ("update", "update")):
            assert row[f"{key}_retry_s"] == pytest.approx(medians[f"{label} {mode} True"] / 20)
            assert row[f"{key}_no_retry_s"] == pytest.approx(medians[f"{label} {mode} False"] / 20)
    assert len(set(medians.values())) == len(medians) == 13
    bench.print_tables({"machine": bench.machine(), **out})
    printed = capsys.readouterr().out
    assert "| 784-300-10, 10 / 3 |" in printed and "| 784-8-8-8-8-10 update, stack_layers=on |" in printed


def test_bench_alternates_the_timed_calls_and_reports_each_ones_median():
    """`bench.timed_alternating` warms each call up once, then calls them in turn, so that the lifted and Adam
    steps of one epoch row see the same machine; each label's median is over its own calls only."""
    from experiments import bench

    order, clock = [], {"a": iter([0.0] + [0.01, 0.03, 0.02]), "b": iter([0.0] + [0.2, 0.1, 0.3])}

    def call(label):
        def fn():
            order.append(label)
            time.sleep(next(clock[label]))
            return jnp.zeros(())
        return fn

    out = bench.timed_alternating({"a": (call("a"), ()), "b": (call("b"), ())}, reps=3)
    assert order == ["a", "b"] + ["a", "b"] * 3
    assert out["a"]["reps"] == out["b"]["reps"] == 3
    assert 0.015 < out["a"]["median_s"] < 0.05 and 0.15 < out["b"]["median_s"] < 0.4


def test_bench_factor_times_both_sides_of_the_triangular_solve_and_both_are_numpys_inverse(capsys):
    """experiments.bench_factor's reference form (the left-side solve LX = I) is numpy's L⁻¹, the same matrix as
    `cholesky_inverse`'s right-side one (a transposed or mis-scaled form would differ); a run prints one row per
    size with both forms' times, and one per right-hand-side count with the route `spd_solver` takes."""
    from experiments import bench_factor
    from fenchel.solvers import cholesky_inverse

    m = np.asarray(bench_factor.spd_matrix(12), np.float64)
    m = m @ np.diag(np.linspace(0.5, 4.0, 12))
    m = (m + m.T) / 2 + 12 * np.eye(12)  # SPD with unequal diagonal: the equilibration is exercised
    want = np.linalg.inv(np.linalg.cholesky(m))
    for form in (bench_factor.left_side_inverse, cholesky_inverse):
        np.testing.assert_allclose(np.asarray(form(jnp.asarray(m))), want, rtol=1e-10, atol=1e-12)
    bench_factor.main(["--sizes", "8,16", "--reps", "1", "--calls", "2", "--rhs-grid", "2/3,3/3"])
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.startswith("| 8 |") or line.startswith("| 16 |")]
    assert len(rows) == 2 and all(len(r.strip("|").split("|")) == 6 for r in rows)
    # spd_solver's routes on N = 8: 2·3 < 8 takes the solves, 3·3 ≥ 8 the formed inverse
    rhs = [line.strip("|").split("|") for line in out if line.startswith("| 2 | 3 |") or line.startswith("| 3 | 3 |")]
    assert [r[-1].strip() for r in rhs] == ["solves", "inverse"]


def test_signal_decay_reports_each_layers_move_and_a_weaker_lower_lambda_moves_x1_further():
    """experiments.signal_decay on the tiny config: one X move per hidden layer, one W move per layer, all finite and
    positive; and since X_1's block is λ_0 B(U_0, X_1) + λ_1 B(A X_1 + b, X_2), whose λ_0 term is minimised at the
    forward pass, a smaller λ_0 (blocks solved exactly) moves X_1 at least as far — a swapped layer index or moves
    measured against the wrong reference would break it."""
    from experiments.signal_decay import relative_moves

    def moves(lambdas):
        config = load_config(ROOT / "configs" / "tiny.py")
        config.update(dict(layers="dense:32,dense:16", lambda_per_layer=lambdas, x_tol=1e-9, x_max_steps=2000,
                           train_size=200, test_size=100))
        return relative_moves(Job(config))

    same, weaker = moves((3.0, 3.0)), moves((0.3, 3.0))
    assert len(same["x"]) == 2 and len(same["w"]) == 3
    assert all(np.isfinite(v) and v > 0 for v in same["x"] + same["w"])
    assert weaker["x"][0] > same["x"][0]
    assert weaker["x"][1] == pytest.approx(same["x"][1], rel=1e-6)  # X_2's block does not involve λ_0


# ---------------------------------------------------------------- results are tied to their data
def _blobs(path, seed, n_classes=3, width=20):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (n_classes, width))

    def sample(n):
        y = np.arange(n) % n_classes
        return (centres[y] + rng.normal(0, 1, (n, width))).astype(np.float32), y

    (x_train, y_train), (x_test, y_test) = sample(200), sample(100)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def test_a_run_whose_data_file_changed_is_refused_not_reused(tmp_path, capsys):
    """Regenerating the .npz at the same path must not resume the run nor reuse its result (sweeps, tables)."""
    data = tmp_path / "blobs.npz"
    _blobs(data, seed=0)
    config = tiny(trainer="adam", dataset="npz", data_file=str(data), train_size=0, test_size=0, batch_size=50,
                  layers="dense:8", total_epochs=2, objective_batch=100)
    first = train_and_evaluate(config, tmp_path / "run", max_epochs_this_run=1)
    assert first == {"interrupted_after_epoch": 1}
    _blobs(data, seed=1)  # same shapes and path, other numbers
    with pytest.raises(WorkdirError, match=r"checkpoint.msgpack was computed on other data: .*blobs.npz now has"):
        train_and_evaluate(config, tmp_path / "run")
    _blobs(data, seed=0)  # the original data back: the run resumes and finishes
    summary = train_and_evaluate(config, tmp_path / "run")
    assert summary["epochs"] == 2 and len(summary["data_sha256"]) == 64

    # a sweep reuses the finished run only while its data is unchanged
    name, sweep_root = "blobs", tmp_path / "sweep"
    done, failed = run_sweep(config, name, ["adam"], [0], sweep_root)
    assert len(done) == 1 and not failed
    done, failed = run_sweep(config, name, ["adam"], [0], sweep_root)
    assert len(done) == 1 and not failed and "reused" in capsys.readouterr().out
    _blobs(data, seed=1)
    done, failed = run_sweep(config, name, ["adam"], [0], sweep_root)
    assert not done and len(failed) == 1
    assert "summary.json was computed on other data" in failed[0][1]

    # two finished runs of one table row on different data: an error naming both files, not a table
    _blobs(data, seed=0)
    other = train_and_evaluate(tiny(**{**config.to_dict(), "trainer": "fenchel"}), tmp_path / "other")
    assert other["data_sha256"] == summary["data_sha256"]
    tables.write_tables([tmp_path / "run", tmp_path / "other"], tmp_path / "table")  # same data: fine
    summary_path = tmp_path / "other" / "summary.json"
    stored = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({**stored, "data_sha256": "0" * 64}))
    with pytest.raises(WorkdirError, match="share a table row but were computed on different data"):
        tables.write_tables([tmp_path / "run", tmp_path / "other"], tmp_path / "table")
    # the same run (config and seed) in two folders, on different data: not "counted once", an error
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    (tmp_path / "copy" / "summary.json").write_text(json.dumps(
        {**json.loads((tmp_path / "run" / "summary.json").read_text()), "data_sha256": "1" * 64}))
    with pytest.raises(WorkdirError, match="hold the same run .* computed on different data"):
        tables.write_tables([tmp_path / "run", tmp_path / "copy"], tmp_path / "table")


def test_a_summary_on_other_data_is_refused_even_without_its_checkpoint(tmp_path):
    """A finished run whose checkpoint is gone: relaunching on regenerated data must not hand back the old
    summary (the summary's own record is checked, not only the checkpoint's)."""
    path = tmp_path / "blobs.npz"
    _blobs(path, seed=0)
    config = tiny(trainer="adam", dataset="npz", data_file=str(path), train_size=0, test_size=0, batch_size=50,
                  layers="dense:8", total_epochs=1, objective_batch=100)
    train_and_evaluate(config, tmp_path / "run")
    (tmp_path / "run" / "checkpoint.msgpack").unlink()
    _blobs(path, seed=1)
    with pytest.raises(WorkdirError, match="summary.json was computed on other data"):
        train_and_evaluate(config, tmp_path / "run")


def test_runs_from_before_data_fingerprints_are_still_accepted(tmp_path):
    """Checkpoints and summaries written before runs recorded `data_sha256` have none: they resume, count in
    tables next to newer runs, and stay in reproduce's table (there is nothing to compare)."""
    from test_tables import make_run

    from experiments import reproduce
    from experiments.train import check_data

    cfg = ml_collections.ConfigDict({"dataset": "npz", "data_file": "d.npz", "data_dir": ""})
    check_data(None, "a" * 64, tmp_path / "summary.json", cfg)
    with pytest.raises(WorkdirError, match="other data"):
        check_data("b" * 64, "a" * 64, tmp_path / "summary.json", cfg)
    new = {"data_sha256": "a" * 64}
    row = [make_run(tmp_path, "old0", "adam", 0, 0.9), make_run(tmp_path, "new1", "adam", 1, 0.95, summary_extra=new),
           make_run(tmp_path, "new2", "adam", 2, 0.97, summary_extra=new)]
    assert "(n=3)" in tables.write_tables(row, tmp_path / "t1")
    same = [make_run(tmp_path, "a", "adam", 0, 0.9, summary_extra=new), make_run(tmp_path, "b", "adam", 0, 0.9)]
    assert "(n=1)" in tables.write_tables(same, tmp_path / "t2")  # one run in two folders: counted once
    assert reproduce.on_current_data(row[:1], {}) == row[:1]


def test_reproduce_leaves_out_a_run_whose_data_file_is_gone(tmp_path, capsys):
    from test_tables import make_run

    from experiments import reproduce

    run = make_run(tmp_path, "r", "adam", 0, 0.9, summary_extra={"data_sha256": "a" * 64}, dataset="npz",
                   data_file=str(tmp_path / "gone.npz"), data_dir="")
    assert reproduce.on_current_data([run], {}) == []
    assert "left out of the table" in capsys.readouterr().err


def test_only_a_launchs_first_step_leaves_its_wait_out_of_the_progress_rate(tmp_path, monkeypatch):
    """The first step of each launch compiles (its wait is left out of the bar's rate); every later step, the
    first of a later epoch included, counts, or the evaluations and checkpoints would drop out of the ETA."""
    from experiments import train

    path = tmp_path / "blobs.npz"
    _blobs(path, seed=0)
    calls = []
    monkeypatch.setattr(train, "advance", lambda progress, leave_out_wait=False: calls.append(leave_out_wait))
    config = tiny(trainer="adam", dataset="npz", data_file=str(path), train_size=0, test_size=0, batch_size=50,
                  layers="dense:8", total_epochs=3, objective_batch=100, progress=True)
    train_and_evaluate(config, tmp_path / "run", max_epochs_this_run=2)  # 200 examples: 4 steps an epoch
    assert calls == [True] + [False] * 7
    calls.clear()
    train_and_evaluate(config, tmp_path / "run")  # resumed: a new launch compiles again
    assert calls == [True] + [False] * 3


def test_reproduce_checks_every_dataset_before_any_run_and_reports_when_nothing_finished(tmp_path):
    good, bad = tmp_path / "good.npz", tmp_path / "bad.npz"
    _blobs(good, seed=0)
    x = np.zeros((10, 4), np.float32)
    np.savez(bad, x_train=x, y_train=np.arange(10) % 2 - 1, x_test=x, y_test=np.zeros(10, int))  # a label −1
    base = ["-m", "experiments.reproduce", "--config", "configs/tiny.py", "--trainers", "adam", "--seeds", "1",
            "--set", "dataset=npz", "--set", "total_epochs=1", "--set", "train_size=0", "--set", "test_size=0",
            "--set", "layers=dense:8"]

    def reproduce(*args):
        return subprocess.run([sys.executable, *base, *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)

    out = reproduce("--set", f"data_file={good},{bad}", "--set", "batch_size=50", "--workdir", str(tmp_path / "r1"))
    assert out.returncode == 2, out.stderr
    assert f"{bad}: y_train has negative label -1" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "r1").exists(), "nothing ran, nothing was written"
    out = reproduce("--set", f"data_file={good}", "--set", "batch_size=500", "--workdir", str(tmp_path / "r2"))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "no run finished" in out.stderr and "batch_size=500 exceeds the 200 training examples" in out.stderr

    # a finished table, then the data file regenerated: the run is refused and left out of the table
    out = reproduce("--set", f"data_file={good}", "--set", "batch_size=50", "--workdir", str(tmp_path / "r3"))
    assert out.returncode == 0 and "| Adam |" in (tmp_path / "r3" / "table.md").read_text(), out.stderr
    _blobs(good, seed=1)
    out = reproduce("--set", f"data_file={good}", "--set", "batch_size=50", "--workdir", str(tmp_path / "r3"))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "summary.json was computed on other data" in out.stderr
    assert "left out of the table" in out.stderr and "no run finished" in out.stderr


def test_features_in_raw_units_get_a_note_suggesting_normalize(tmp_path, capsys):
    """Lifted training is not scale-free: features of scale 10³ get a note (once, before training) pointing to
    normalize=True; normalised, or in [0, 1], they get none."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(300, 6)) * np.array([1, 1, 1, 1, 1, 2000.0])).astype(np.float32)
    y = (x[:, 0] > 0).astype(int)
    np.savez(tmp_path / "raw.npz", x_train=x[:200], y_train=y[:200], x_test=x[200:], y_test=y[200:])
    base = dict(trainer="adam", dataset="npz", data_file=str(tmp_path / "raw.npz"), train_size=0, test_size=0,
                batch_size=50, layers="dense:8", total_epochs=1, objective_batch=100)
    train_and_evaluate(tiny(**base), tmp_path / "a")
    err = capsys.readouterr().err
    assert "note: the training features reach |x| = " in err
    assert (f"adam on {tmp_path / 'raw.npz'}: 200 training / 100 test examples of shape (6,), 2 classes; "
            "network 6-8-2; 1 epoch(s) of 4 steps") in err  # the start-up line says what runs
    train_and_evaluate(tiny(**base, normalize=True), tmp_path / "b")
    assert "normalize=True" not in capsys.readouterr().err


@pytest.mark.parametrize("leave_out_wait", [True, False])
@pytest.mark.parametrize("step_s, steps", [(0.002, 1000), (2.0, 5)])
def test_the_progress_bar_rate_leaves_out_the_compiling_first_step(leave_out_wait, step_s, steps, monkeypatch):
    """On a simulated clock: a first step that took 5 s (the compile), then steps of 2 ms (or 2 s) on the
    launcher's bar (refreshed at most once a second). Its rate, and so its ETA, is 1 / step_s only when the
    launch's first step leaves its wait out, and its count with it (else slow steps read up to twice as fast);
    without that, tqdm's moving average still holds the 5 s. The elapsed time counts the wait either way."""
    import io
    import types

    from experiments import train

    clock = [1000.0]
    monkeypatch.setattr(train, "time", types.SimpleNamespace(time=lambda: clock[0]))
    cfg = ml_collections.ConfigDict({"progress": True, "trainer": "fenchel"})
    bar = train._make_progress(cfg, total=100_000, initial=0)
    bar._time = lambda: clock[0]
    bar.start_t = bar.last_print_t = clock[0]
    bar.fp = io.StringIO()
    clock[0] += 5.0
    train.advance(bar, leave_out_wait=leave_out_wait)
    for _ in range(steps):
        clock[0] += step_s
        train.advance(bar)
    rate = bar.format_dict["rate"]
    assert bar.format_dict["elapsed"] == pytest.approx(5.0 + steps * step_s)
    if leave_out_wait:
        assert rate == pytest.approx(1.0 / step_s, rel=0.01)
    else:
        assert rate < 0.95 / step_s  # still weighed down by the 5 s
    bar.close()
