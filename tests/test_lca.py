"""Loss Change Allocation: Simpson allocations against hand-derived integrals, the adaptive loop, sums, end to end."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import lca
from experiments.configs_util import load_config
from experiments.workdir import WorkdirError

ROOT = Path(__file__).resolve().parent.parent


def _exp_grad(theta):
    return jnp.exp(theta)


def _exp_loss(theta):
    return jnp.sum(jnp.exp(theta))


def _simpson_exp_by_hand(a, d, n):
    """Σ_i d_i × composite Simpson (n sub-intervals) of ∫₀¹ exp(a_i + s d_i) ds, in numpy."""
    s = np.linspace(0.0, 1.0, 2 * n + 1)
    w = np.zeros(2 * n + 1)
    for j in range(n):
        w[2 * j:2 * j + 3] += np.array([1.0, 4.0, 1.0]) / (6.0 * n)
    return np.sum(d * (np.exp(a[:, None] + s[None, :] * d[:, None]) @ w))


def test_cubic_is_exact_with_one_split_per_coordinate():
    """L = θ0³ + 2θ0θ1² + 3θ1 + θ0θ2²: ∫₀¹ of each partial along θ(s) = a + s d is derived by hand."""
    def loss(t):
        return t[0] ** 3 + 2 * t[0] * t[1] ** 2 + 3 * t[1] + t[0] * t[2] ** 2

    a = np.array([0.3, -1.2, 0.7])
    b = np.array([-0.9, 0.4, 2.1])
    d = b - a

    def sq(j):  # ∫₀¹ (a_j + s d_j)² ds
        return a[j] ** 2 + a[j] * d[j] + d[j] ** 2 / 3

    def prod(i, j):  # ∫₀¹ (a_i + s d_i)(a_j + s d_j) ds
        return a[i] * a[j] + (a[i] * d[j] + a[j] * d[i]) / 2 + d[i] * d[j] / 3

    exact = d * np.array([3 * sq(0) + 2 * sq(1) + sq(2), 4 * prod(0, 1) + 3, 2 * prod(0, 2)])
    result, splits, delta = lca.allocate_segment(jax.grad(loss), loss, a, b, tol=1e-12, max_splits=32)
    assert splits == 1
    np.testing.assert_allclose(result, exact, rtol=0, atol=1e-12)
    assert delta == pytest.approx(float(loss(b) - loss(a)), abs=1e-12)
    assert abs(result.sum() - delta) < 1e-10


def test_quadratic_simpson_exact_first_order_misses_half_curvature():
    """L = ½θᵀHθ + gᵀθ: Simpson gives Δθ_i (H θ_mid + g)_i; Δθ·∇L(θ_0) misses ΔL by ½ΔθᵀHΔθ."""
    rng = np.random.default_rng(0)
    m = rng.normal(size=(6, 6))
    H = m @ m.T + np.eye(6)
    g = rng.normal(size=6)
    t0, t1 = rng.normal(size=6), rng.normal(size=6)
    d = t1 - t0

    def loss(t):
        return 0.5 * t @ jnp.asarray(H) @ t + jnp.asarray(g) @ t

    delta = 0.5 * t1 @ H @ t1 + g @ t1 - 0.5 * t0 @ H @ t0 - g @ t0
    result, splits, dL = lca.allocate_segment(jax.grad(loss), loss, t0, t1, tol=1e-12)
    assert splits == 1
    np.testing.assert_allclose(result, d * (H @ (t0 + t1) / 2 + g), rtol=0, atol=1e-12)
    assert result.sum() == pytest.approx(delta, abs=1e-10)
    assert dL == pytest.approx(delta, abs=1e-10)
    first = lca.first_order_allocation(jax.grad(loss), t0, t1)
    np.testing.assert_allclose(first, d * (H @ t0 + g), rtol=0, atol=1e-12)
    assert delta - first.sum() == pytest.approx(0.5 * d @ H @ d, abs=1e-10)
    assert abs(0.5 * d @ H @ d) > 1e-2  # the gap is real, not zero by accident


def test_error_falls_sixteenfold_per_doubling():
    """Simpson's error is O(h⁴): for exp (per coordinate, exact integral e^b − e^a) and Σ log cosh(Aθ)."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=5), rng.normal(size=5) + 1.0
    errors = [np.max(np.abs(lca.simpson_allocation(_exp_grad, a, b, n) - (np.exp(b) - np.exp(a))))
              for n in (1, 2, 4, 8)]
    ratios = np.array(errors[:-1]) / np.array(errors[1:])
    assert np.all((ratios > 10) & (ratios < 20)), ratios

    A = rng.normal(size=(4, 5))

    def logcosh(t):
        return jnp.sum(jnp.log(jnp.cosh(jnp.asarray(A) @ t)))

    exact = np.sum(np.log(np.cosh(A @ b))) - np.sum(np.log(np.cosh(A @ a)))
    errors = [abs(lca.simpson_allocation(jax.grad(logcosh), a, b, n).sum() - exact) for n in (4, 8, 16, 32)]
    ratios = np.array(errors[:-1]) / np.array(errors[1:])
    assert np.all((ratios > 10) & (ratios < 20)), (errors, ratios)


def test_adaptive_loop_stops_at_the_smallest_power_of_two_and_respects_max_splits():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=4), rng.normal(size=4) + 1.5
    delta = np.sum(np.exp(b) - np.exp(a))
    err = {n: abs(_simpson_exp_by_hand(a, b - a, n) - delta) for n in (1, 2, 4, 8, 16)}
    assert err[1] > err[2] > err[4] > err[8]
    tol = np.sqrt(err[2] * err[4])  # met at 4, not at 2
    _, splits, _ = lca.allocate_segment(_exp_grad, _exp_loss, a, b, tol=tol, max_splits=32)
    assert splits == 4
    _, splits, _ = lca.allocate_segment(_exp_grad, _exp_loss, a, b, tol=10 * err[1], max_splits=32)
    assert splits == 1
    result, splits, _ = lca.allocate_segment(_exp_grad, _exp_loss, a, b, tol=0.0, max_splits=8)
    assert splits == 8
    assert abs(result.sum() - delta) == pytest.approx(err[8], rel=1e-6)
    with pytest.raises(ValueError, match="power of 2"):
        lca.allocate_segment(_exp_grad, _exp_loss, a, b, max_splits=6)

    calls = []  # gradients at shared nodes are reused: n splits cost 2n + 1 points (2n with a known start)

    def counted(points):
        calls.append(len(points))
        return np.sum(np.exp(points), axis=1), np.exp(points)

    _, splits, _, end, _ = lca.simpson_segment(counted, a, b, tol=tol, max_splits=32)
    assert splits == 4 and sum(calls) == 9
    np.testing.assert_allclose(end[1], np.exp(b))
    calls.clear()
    _, splits, dL, _, _ = lca.simpson_segment(counted, a, b, tol=tol, max_splits=32, start=(np.sum(np.exp(a)),
                                                                                            np.exp(a)))
    assert splits == 4 and sum(calls) == 8 and dL == pytest.approx(delta)


def test_layer_and_neuron_sums_add_up():
    shapes = {"layer_1/bias": (2,), "layer_0/kernel": (3, 4), "layer_1/kernel": (4, 2), "layer_0/bias": (4,)}
    layout = lca.Layout(shapes)
    assert layout.size == 12 + 4 + 8 + 2 and layout.widths == [4, 2]
    rng = np.random.default_rng(3)
    arrays = {k: rng.normal(size=(5, *s)) for k, s in shapes.items()}  # 5 "iterations"
    flat = np.stack([layout.flatten(arrays, t) for t in range(5)])
    params = layout.unflatten(flat[2])
    np.testing.assert_array_equal(params[1]["kernel"], arrays["layer_1/kernel"][2])
    np.testing.assert_array_equal(params[0]["bias"], arrays["layer_0/bias"][2])
    layers = layout.layer_sums(flat)
    neurons = layout.neuron_sums(flat)
    for i in range(2):
        k, bias = arrays[f"layer_{i}/kernel"], arrays[f"layer_{i}/bias"]
        np.testing.assert_allclose(layers[:, i], k.sum(axis=(1, 2)) + bias.sum(axis=1))
        np.testing.assert_allclose(neurons[i], k.sum(axis=1) + bias)
        np.testing.assert_allclose(neurons[i].sum(axis=1), layers[:, i])
    np.testing.assert_allclose(layers.sum(axis=1), flat.sum(axis=1))
    with pytest.raises(ValueError, match="kernel and bias"):
        lca.Layout({"layer_0/kernel": (3, 4)})


def test_path_on_an_analytic_loss_chains_segments():
    """allocate_path: Σ_t LCA_t = L(θ_T) − L(θ_0), the losses at every point, fractions helping."""
    layout = lca.Layout({"layer_0/kernel": (2, 2), "layer_0/bias": (2,)})
    rng = np.random.default_rng(4)
    traj = np.cumsum(rng.normal(scale=0.3, size=(5, 6)), axis=0)

    def value_and_grads(points):
        return np.sum(np.exp(points), axis=1), np.exp(points)

    out, full = lca.allocate_path(value_and_grads, traj, layout, tol=1e-9, max_splits=64, full=True)
    np.testing.assert_allclose(out["loss"], np.exp(traj).sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(out["delta_L"], np.diff(np.exp(traj).sum(axis=1)), rtol=1e-12)
    np.testing.assert_allclose(out["total"], out["delta_L"], atol=1e-9)
    np.testing.assert_allclose(out["fraction_helping"], np.mean(np.diff(traj, axis=0) < 0, axis=1))
    np.testing.assert_allclose(out["cumulative_layer"][-1, 0], np.exp(traj[-1]).sum() - np.exp(traj[0]).sum(),
                               atol=1e-8)
    np.testing.assert_allclose(full.sum(axis=1), out["total"], rtol=1e-5)


def test_iterations_sum_their_segments_like_a_staircase():
    """Two minibatch steps of two one-layer segments each, on L = Σ exp(θ) (LCA_i = e^{b_i} − e^{a_i} exactly):
    per-iteration sums, fractions over the step's summed LCA (not the mean of its segments'), moved layers."""
    layout = lca.Layout({"layer_0/kernel": (2, 2), "layer_0/bias": (2,), "layer_1/kernel": (2, 1),
                         "layer_1/bias": (1,)})
    theta = np.array([0.1, -0.2, 0.3, 0.0, 0.5, -0.1, 0.2, 0.4, -0.3])
    step1 = np.array([-0.4, 0.3, 0.3, -0.2, 0.1, -0.3, 0.6, 0.1, -0.5])  # some coordinates go down (help),
    step2 = np.array([-0.5, 0.2, 0.1, -0.1, 0.1, -0.4, 0.5, 0.2, -0.5])  # some up (hurt), some stay (LCA 0)
    points = [theta]
    for end in (step1, step2):
        for lo, hi in ((0, 6), (6, 9)):  # layer 0 moves, then layer 1
            p = points[-1].copy()
            p[lo:hi] = end[lo:hi]
            points.append(p)
    traj = np.stack(points)

    def value_and_grads(pts):
        return np.sum(np.exp(pts), axis=1), np.exp(pts)

    out, _ = lca.allocate_path(value_and_grads, traj, layout, tol=1e-12, max_splits=256, groups=[0, 0, 1, 1])
    np.testing.assert_array_equal(out["moved_layer"], [0, 1, 0, 1])
    np.testing.assert_array_equal(out["iteration"], [0, 1])
    np.testing.assert_array_equal(out["iteration_segments"], [2, 2])
    for g, (a, b) in enumerate(((theta, step1), (step1, step2))):
        exact = np.exp(b) - np.exp(a)
        assert out["iteration_total"][g] == pytest.approx(exact.sum(), abs=1e-10)
        assert out["iteration_delta_L"][g] == pytest.approx(exact.sum(), abs=1e-12)
        np.testing.assert_allclose(out["iteration_layer"][g], [exact[:6].sum(), exact[6:].sum()], atol=1e-10)
        assert out["iteration_fraction_helping"][g] == pytest.approx(np.mean(b < a))
        assert out["iteration_fraction_helping_nonzero"][g] == pytest.approx(np.sum(b < a) / np.sum(b != a))
    # per segment, over all 9 parameters: the fraction is diluted by the layer that does not move
    np.testing.assert_allclose(out["fraction_helping"][:2], [np.sum(step1[:6] < theta[:6]) / 9,
                                                             np.sum(step1[6:] < theta[6:]) / 9])
    assert out["iteration_fraction_helping"][0] != pytest.approx(np.mean(out["fraction_helping"][:2]))
    with pytest.raises(ValueError, match="non-decreasing"):
        lca.allocate_path(value_and_grads, traj, layout, groups=[0, 1, 0, 1])


def test_layer_synchrony_by_hand():
    x = np.array([[-1.0, -2.0], [-1.0, 1.0], [1.0, -1.0], [-3.0, -4.0]])
    sync = lca.layer_synchrony(x)
    assert sync["layer_helps_share"] == [0.75, 0.75]
    assert sync["all_layers_help_share"] == 0.5
    assert sync["all_layers_help_if_independent"] == pytest.approx(0.5625)
    a, b = x[:, 0] - x[:, 0].mean(), x[:, 1] - x[:, 1].mean()
    assert sync["layer_correlation"][0][1] == pytest.approx(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from experiments.train import train_and_evaluate

    config = load_config(ROOT / "configs" / "tiny.py")
    config.trainer = "adam"
    config.record_every = 5
    config.train_size = 400
    config.total_epochs = 2
    config.progress = False
    workdir = tmp_path_factory.mktemp("lca") / "run"
    train_and_evaluate(config, workdir)
    return workdir


def test_end_to_end_on_a_tiny_run(tiny_run):
    from experiments.train import Job
    from experiments.workdir import read_history
    from fenchel.lifted import network_loss

    summary = lca.run_lca(tiny_run, eval_size=200, full=True)
    out_dir = tiny_run / "lca"
    for name in ("lca.npz", "lca_full.npz", "summary.json", "lca_layers.png", "lca_helping.png",
                 "lca_cumulative.png"):
        assert (out_dir / name).stat().st_size > 0, name
    assert json.loads((out_dir / "summary.json").read_text())["n_segments"] == summary["n_segments"]
    steps, arrays = read_history(tiny_run)
    assert summary["n_segments"] == len(steps) - 1 >= 1
    assert summary["reconstruction_error"] < 1e-2
    assert 0 <= summary["mean_fraction_helping"] <= 1
    assert set(summary["per_layer_lca"]) == {"layer_0", "layer_1"}
    with np.load(out_dir / "lca.npz") as z:
        assert np.all((z["fraction_helping"] >= 0) & (z["fraction_helping"] <= 1))
        assert z["layer"].shape == (len(steps) - 1, 2) and z["neuron_layer_0"].shape == (len(steps) - 1, 32)
        np.testing.assert_allclose(z["layer"].sum(axis=1), z["total"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(z["neuron_layer_1"].sum(axis=1), z["layer"][:, 1], rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(z["steps"], steps)
        total = z["total"].copy()
    with np.load(out_dir / "lca_full.npz") as z:
        np.testing.assert_allclose(sum(z[k].reshape(len(total), -1).sum(axis=1) for k in arrays), total, rtol=1e-4)
    # ΔL independently: the network's mean cross-entropy at the two snapshots, on the first 200 examples
    job = Job(_saved_config(tiny_run))
    x, y = job.x_train[:200], job.y_train[:200]

    def loss_at(t):
        params = [{"kernel": jnp.asarray(arrays[f"layer_{i}/kernel"][t], jnp.float64),
                   "bias": jnp.asarray(arrays[f"layer_{i}/bias"][t], jnp.float64)} for i in range(2)]
        return float(network_loss(params, x.astype(jnp.float64), y.astype(jnp.float64), job.penalty, "softmax",
                                  job.layers))

    assert summary["delta_L"] == pytest.approx(loss_at(len(steps) - 1) - loss_at(0), abs=1e-5)


def _saved_config(workdir):
    import ml_collections

    return ml_collections.ConfigDict(json.loads((Path(workdir) / "config.json").read_text()))


def _cli_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        lca.main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_cli_errors_are_one_line(tiny_run, tmp_path, capsys):
    no_history = tmp_path / "no_history"
    no_history.mkdir()
    shutil.copy(tiny_run / "config.json", no_history / "config.json")
    assert "record_every" in _cli_error(["--workdir", str(no_history)], capsys)
    assert "config.json" in _cli_error(["--workdir", str(tmp_path)], capsys)
    assert "not a directory" in _cli_error(["--workdir", str(tmp_path / "missing")], capsys)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_run, corrupt, ignore=shutil.ignore_patterns("lca", ".lock"))
    chunk = next((corrupt / "history").glob("chunk_*.npz"))
    chunk.write_bytes(b"not a zip file")
    assert "corrupted" in _cli_error(["--workdir", str(corrupt)], capsys)
    assert "power of 2" in _cli_error(["--workdir", str(tiny_run), "--max-splits", "6"], capsys)
    assert "eval-size" in _cli_error(["--workdir", str(tiny_run), "--eval-size", "100000"], capsys)


# ---------------------------------------------------------------- `table`: several seeds aggregated
def _fake_allocation(root, name, seed, layer, helping, helping_nonzero, trainer="sgd", layers="dense:3",
                     residual=1e-6):
    """A hand-written D/lca folder: one segment per iteration with per-layer LCA `layer` [G, n], ΔL = Σ layers +
    residual per segment, and the run's config.json holding `seed`; returns D/lca."""
    layer = np.asarray(layer, np.float64)
    total = layer.sum(axis=1)
    delta = total + residual
    run = Path(root) / name
    (run / "lca").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"dataset": "mnist", "trainer": trainer, "layers": layers,
                                                 "seed": seed, "record_every": 1}))
    np.savez(run / "lca" / "lca.npz", total=total, delta_L=delta, loss=2.3 + np.concatenate([[0.0], np.cumsum(delta)]),
             layer=layer, iteration_layer=layer, iteration_fraction_helping=np.asarray(helping, np.float64),
             iteration_fraction_helping_nonzero=np.asarray(helping_nonzero, np.float64))
    summary = {"n_segments": len(total), "n_iterations": len(total), "delta_L": float(delta.sum()),
               "per_layer_lca": {f"layer_{i}": float(v) for i, v in enumerate(layer.sum(axis=0))},
               "trainer": trainer, "path": "every step", "segments_per_iteration": 1, "eval_size": 100,
               "tol": 1e-3, "max_splits": 32}
    (run / "lca" / "summary.json").write_text(json.dumps(summary))
    return run / "lca"


def _fake_seeds(root, seeds, trainer="sgd", layers="dense:3", n_layers=2, iterations=6):
    rng = np.random.default_rng(100 + len(trainer) + n_layers)
    out = []
    for s in seeds:
        layer = rng.normal(-0.05, 0.1, size=(iterations, n_layers))
        out.append((_fake_allocation(root, f"{trainer}_{n_layers}_s{s}", s, layer, rng.uniform(0.3, 0.6, iterations),
                                     rng.uniform(0.5, 0.8, iterations), trainer, layers), layer))
    return out


def test_table_mean_and_std_over_seeds_match_numpy(tmp_path, capsys):
    sgd = _fake_seeds(tmp_path, [0, 1, 2])
    adam = _fake_seeds(tmp_path, [5, 3], trainer="adam")
    deep = _fake_seeds(tmp_path, [0, 1], layers="dense:3,dense:2", n_layers=3)
    folders = [f for f, _ in sgd + adam + deep]
    groups = lca.aggregate_allocations(folders)
    assert [g["label"] for g in groups] == ["sgd, every step", "adam, every step", "sgd, every step"]
    assert [g["seeds"] for g in groups] == [[0, 1, 2], [5, 3], [0, 1]]
    assert [g["distinct"] for g in groups] == [{"layers": "dense:3"}, {}, {"layers": "dense:3,dense:2"}]
    for g, runs in zip(groups, (sgd, adam, deep)):
        layers = [layer for _, layer in runs]
        with np.load(runs[0][0] / "lca.npz") as z:
            assert z["delta_L"].sum() == pytest.approx(layers[0].sum() + 6e-6, abs=1e-15)
        dL = np.array([x.sum() + 6e-6 for x in layers])
        per_layer = np.array([x.sum(axis=0) for x in layers])
        hurts = np.array([np.sum(x > 0, axis=0) for x in layers], np.float64)
        helping = []
        for folder, _ in runs:
            with np.load(folder / "lca.npz") as z:
                helping.append(100 * z["iteration_fraction_helping"].mean())
        n = layers[0].shape[1]
        corr = np.array([[np.corrcoef(x.T)[i, j] for i in range(n) for j in range(i + 1, n)] for x in layers])
        for key, values in (("delta_L", dL[:, None]), ("layer_lca", per_layer), ("layer_hurts", hurts),
                            ("helping", np.array(helping)[:, None]), ("correlation", corr)):
            np.testing.assert_allclose(g[key][0], values.mean(axis=0), rtol=1e-12, atol=1e-15, err_msg=key)
            np.testing.assert_allclose(g[key][1], values.std(axis=0, ddof=1), rtol=1e-10, atol=1e-15, err_msg=key)
        recon = [abs(x.sum() - (x.sum() + 6e-6)) / abs(x.sum() + 6e-6) for x in layers]
        assert g["reconstruction_error"] == pytest.approx(max(recon), rel=1e-6)
    lca.main(["table", *map(str, folders), "--out", str(tmp_path / "t.md")])
    text = capsys.readouterr().out
    assert (tmp_path / "t.md").read_text() == text
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len({line.replace("\\|", "").count("|") for line in table}) == 1  # one cell per group in each row
    header = table[0]
    assert "sgd, every step (layers=dense:3)" in header and "sgd, every step (layers=dense:3,dense:2)" in header
    dL = np.array([x.sum() + 6e-6 for _, x in sgd])
    cell = f"{dL.mean():.3f}".replace("-", "−") + f" ± {dL.std(ddof=1):.3f}"
    assert f"| ΔL over the run (nats) | {cell} |" in text
    per_layer = np.array([x.sum(axis=0) for _, x in deep])
    assert " / ".join(f"{m:.3f}".replace("-", "−") + f" ± {s:.3f}"
                      for m, s in zip(per_layer.mean(axis=0), per_layer.std(axis=0, ddof=1))) in text
    assert "| 3 (0, 1, 2) |" in text


def test_table_rejects_a_seed_twice_and_a_copied_result(tmp_path, capsys):
    (a, _), (b, _) = _fake_seeds(tmp_path, [0, 1])
    dup = tmp_path / "again_s0"
    shutil.copytree(a.parent, dup)
    with pytest.raises(WorkdirError, match="again_s0.*seed 0"):
        lca.aggregate_allocations([a, b, dup / "lca"])
    err = _cli_error(["table", str(a), str(b), str(dup / "lca")], capsys)
    assert "again_s0" in err and "seed 0" in err and "sgd_2_s0" in err
    assert "seed 0" in _cli_error(["table", str(a), str(a)], capsys)  # one folder twice
    config = json.loads((dup / "config.json").read_text())  # the same result, relabelled as seed 7
    (dup / "config.json").write_text(json.dumps({**config, "seed": 7}))
    assert "again_s0" in _cli_error(["table", str(a), str(dup / "lca")], capsys)
    # a different trainer is another group: the same seed there is no clash
    (c, _), = _fake_seeds(tmp_path, [0], trainer="adam")
    assert [g["seeds"] for g in lca.aggregate_allocations([a, c])] == [[0], [0]]


def test_table_names_a_missing_or_inconsistent_file(tmp_path, capsys):
    (a, _), (b, _), (c, _) = _fake_seeds(tmp_path, [0, 1, 2])
    (b / "lca.npz").unlink()
    err = _cli_error(["table", str(a), str(b)], capsys)
    assert str(b / "lca.npz") in err and "missing" in err
    (c.parent / "config.json").unlink()
    assert str(c.parent / "config.json") in _cli_error(["table", str(a), str(c)], capsys)
    assert "summary.json" in _cli_error(["table", str(a), str(tmp_path)], capsys)
    (d, layer), = _fake_seeds(tmp_path, [3], trainer="adam")
    summary = json.loads((d / "summary.json").read_text())
    (d / "summary.json").write_text(json.dumps({**summary, "delta_L": summary["delta_L"] + 0.1}))
    err = _cli_error(["table", str(d)], capsys)
    assert str(d) in err and "disagree" in err


def test_held_out_split_allocates_the_test_loss(tiny_run):
    """--eval-split test: L is the mean cross-entropy on the test set (ΔL checked against network_loss on the
    first 100 test images, computed here), written to D/lca_test, and the training-set allocation is left alone.
    An allocation that still read the training set would have the training ΔL."""
    from experiments.train import Job
    from experiments.workdir import read_history
    from fenchel.lifted import network_loss

    summary = lca.run_lca(tiny_run, eval_size=100, eval_split="test")
    assert summary["eval_split"] == "test" and (tiny_run / "lca_test" / "summary.json").is_file()
    assert summary["reconstruction_error"] < 1e-2
    steps, arrays = read_history(tiny_run)
    job = Job(_saved_config(tiny_run))
    x = jnp.asarray(job.data.x_test[:100], jnp.float64)
    y = jax.nn.one_hot(jnp.asarray(job.data.y_test[:100]), int(job.data.num_classes), dtype=jnp.float64)
    x_train, y_train = job.x_train[:100].astype(jnp.float64), job.y_train[:100].astype(jnp.float64)

    def loss_at(t, xs, ys):
        params = [{"kernel": jnp.asarray(arrays[f"layer_{i}/kernel"][t], jnp.float64),
                   "bias": jnp.asarray(arrays[f"layer_{i}/bias"][t], jnp.float64)} for i in range(2)]
        return float(network_loss(params, xs, ys, job.penalty, "softmax", job.layers))

    last = len(steps) - 1
    held_out = loss_at(last, x, y) - loss_at(0, x, y)
    assert summary["delta_L"] == pytest.approx(held_out, abs=1e-5)
    assert abs(held_out - (loss_at(last, x_train, y_train) - loss_at(0, x_train, y_train))) > 1e-3
    with pytest.raises(ValueError, match="eval-split"):
        lca.run_lca(tiny_run, eval_split="val")
