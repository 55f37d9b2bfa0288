"""Staircase recording of lifted training (record_staircase): its points against a per-step history, the run's
metrics unchanged, the config checks, and LCA over a staircase step against the one-segment path."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import lca
from experiments.configs_util import load_config
from experiments.train import Job, train_and_evaluate, validate_config
from experiments.workdir import Workdir, read_history
from fenchel.lifted import network_loss

ROOT = Path(__file__).resolve().parent.parent
N_LAYERS = 3  # 784-16-8-10: three W blocks per minibatch step
STEPS = 8  # 400 examples, batch 100, 2 epochs


def _config(**overrides):
    c = load_config(ROOT / "configs" / "tiny.py")
    c.layers = "dense:16,dense:8"
    c.train_size = 400
    c.total_epochs = 2
    c.warm_start_epochs = 0
    c.progress = False
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same lifted run three times: not recorded, recorded every step, recorded as a staircase (interrupted
    after epoch 1 and resumed, so the resumed epoch's numbering is exercised too)."""
    root = tmp_path_factory.mktemp("staircase")
    plain = train_and_evaluate(_config(), root / "plain")
    steps = train_and_evaluate(_config(record_every=1), root / "steps")
    config = _config(record_every=1, record_staircase=True)
    train_and_evaluate(config, root / "stair", max_epochs_this_run=1)
    stair = train_and_evaluate(config, root / "stair")
    return root, {"plain": plain, "steps": steps, "stair": stair}


def _layer(arrays, t, i):
    return np.concatenate([arrays[f"layer_{i}/kernel"][t].ravel(), arrays[f"layer_{i}/bias"][t].ravel()])


def test_staircase_points_rebuild_the_block_updates(runs):
    root, _ = runs
    s_steps, per_step = read_history(root / "steps")
    s_stair, stair = read_history(root / "stair")
    assert s_steps.tolist() == list(range(STEPS + 1))
    assert s_stair.tolist() == list(range(N_LAYERS * STEPS + 1))  # (L + 1) segments per minibatch step
    for t in range(1, STEPS + 1):
        for k in range(N_LAYERS + 1):  # point (t−1)·B + k: layers < k after step t, the others before it
            h = (t - 1) * N_LAYERS + k
            for i in range(N_LAYERS):
                expected = _layer(per_step, t if i < k else t - 1, i)
                np.testing.assert_array_equal(_layer(stair, h, i), expected, err_msg=f"step {t}, point {k}, layer {i}")
    for h in range(N_LAYERS * STEPS):  # each segment moves exactly one layer, the segment's block
        moved = [i for i in range(N_LAYERS) if not np.array_equal(_layer(stair, h, i), _layer(stair, h + 1, i))]
        assert moved == [h % N_LAYERS], (h, moved)


def test_recording_a_staircase_leaves_the_run_unchanged(runs):
    root, summaries = runs
    for name in ("steps", "stair"):
        assert summaries[name]["test_accuracy"] == summaries["plain"]["test_accuracy"]
        assert summaries[name]["lifted_objective"] == summaries["plain"]["lifted_objective"]
        losses = [[r["train_loss"] for r in Workdir(root / n).read_metrics()] for n in (name, "plain")]
        assert losses[0] == losses[1]


@pytest.mark.parametrize("overrides, message", [
    ({"trainer": "adam"}, "lifted trainer"),
    ({"alternations": 2}, "alternations=1"),
    ({"record_every": 2}, "record_every=1"),
    ({"record_every": 0}, "record_every=1"),
])
def test_staircase_config_errors(overrides, message):
    config = _config(**{"record_every": 1, "record_staircase": True, **overrides})
    with pytest.raises(ValueError, match=message):
        validate_config(config)
    validate_config(_config(record_every=1, record_staircase=True, trainer="lnn"))


def test_lca_of_a_staircase_step_sums_to_the_step_loss_change(runs):
    """Per minibatch step: Σ over its B one-layer segments = the one-segment path's Σ LCA = ΔL, ΔL computed
    here in float64 from the per-step history; only the moving layer gets LCA in each segment."""
    root, _ = runs
    tol, n_eval = 1e-4, 200
    stair = lca.run_lca(root / "stair", tol=tol, eval_size=n_eval)
    steps = lca.run_lca(root / "steps", tol=tol, eval_size=n_eval)
    whole = lca.run_lca(root / "stair", tol=tol, eval_size=n_eval, whole_steps=True)
    assert stair["n_segments"] == N_LAYERS * STEPS and stair["n_iterations"] == STEPS
    assert steps["n_segments"] == whole["n_segments"] == STEPS and stair["path"].startswith("staircase")
    with np.load(root / "stair" / "lca" / "lca.npz") as z:
        seg_total, layer, block = z["total"], z["layer"], z["block"]
        iteration_total, moved = z["iteration_total"], z["moved_layer"]
    with np.load(root / "steps" / "lca" / "lca.npz") as z:
        step_total = z["total"]
    with np.load(root / "stair" / "lca_steps" / "lca.npz") as z:
        np.testing.assert_array_equal(z["total"], step_total)  # the staircase's whole steps are the step path

    _, per_step = read_history(root / "steps")
    job = Job(_config())
    x, y = job.x_train[:n_eval].astype(jnp.float64), job.y_train[:n_eval].astype(jnp.float64)

    def loss_at(t):
        params = [{"kernel": jnp.asarray(per_step[f"layer_{i}/kernel"][t], jnp.float64),
                   "bias": jnp.asarray(per_step[f"layer_{i}/bias"][t], jnp.float64)} for i in range(N_LAYERS)]
        return float(network_loss(params, x, y, job.penalty, "softmax", job.layers))

    delta = np.diff([loss_at(t) for t in range(STEPS + 1)])
    assert np.all(np.abs(delta) > 1e-3)  # steps that change the loss
    by_step = seg_total.reshape(STEPS, N_LAYERS).sum(axis=1)
    np.testing.assert_allclose(by_step, delta, rtol=0, atol=N_LAYERS * tol + 1e-5)
    np.testing.assert_allclose(step_total, delta, rtol=0, atol=tol + 1e-5)
    np.testing.assert_allclose(iteration_total, by_step, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(block, np.arange(N_LAYERS * STEPS) % N_LAYERS)
    np.testing.assert_array_equal(moved, block)
    for h in range(N_LAYERS * STEPS):  # a layer that does not move gets no allocation at all
        others = [i for i in range(N_LAYERS) if i != h % N_LAYERS]
        assert np.all(layer[h, others] == 0) and layer[h, h % N_LAYERS] != 0


def test_compare_figure_of_the_paths(runs, tmp_path):
    root, _ = runs
    for d in ("stair", "steps"):
        if not (root / d / "lca" / "summary.json").exists():
            lca.run_lca(root / d, eval_size=100)
    out = tmp_path / "fig" / "compare.png"
    lca.main(["compare", str(root / "stair" / "lca"), str(root / "steps" / "lca"), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        lca.main(["compare", str(root / "plain"), "--out", str(out)])


def test_sparsity_reads_a_staircase_at_its_whole_steps(runs):
    from experiments import sparsity

    root, _ = runs
    stair = sparsity.run_sparsity(root / "stair", eval_size=100, batch_size=100)
    steps = sparsity.run_sparsity(root / "steps", eval_size=100, batch_size=100)
    assert stair["steps"] == steps["steps"] == list(range(STEPS + 1))
    assert [s["network"] for s in stair["snapshots"]] == [s["network"] for s in steps["snapshots"]]


def test_whole_steps_needs_a_staircase(runs):
    root, _ = runs
    with pytest.raises(ValueError, match="no staircase"):
        lca.run_lca(root / "steps", eval_size=100, whole_steps=True)
