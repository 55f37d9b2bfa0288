"""λ as Lagrange multipliers: the dual-ascent and continuation updates, the relaxation bound and its gap, and the
fixed-budget warm-start protocol.

Expected values: penalties and the network objective in numpy from the textbook formulas; min over X of the
lifted objective (one hidden layer: one convex block) by SciPy L-BFGS-B; λ sequences by hand.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, special

from experiments.configs_util import load_config
from experiments.train import train_and_evaluate, validate_config
from experiments.workdir import Workdir
from fenchel import LiftedConfig, LiftedTrainer, init_params, mlp

ROOT = Path(__file__).resolve().parent.parent


def _data(n, d, classes, seed=0):
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (n, d), jnp.float64)
    y = jax.nn.one_hot(jax.random.randint(ky, (n,), 0, classes), classes, dtype=jnp.float64)
    return x, y


def np_relu_penalty(u, v):
    return 0.5 * np.maximum(u, 0) ** 2 + 0.5 * v**2 - u * v


def _np(params):
    return [(np.asarray(p["kernel"]), np.asarray(p["bias"])) for p in params]


def _two_hidden_layers():
    """4-6-5-3 ReLU network in float64, 20 samples: (layers, params, x0, [(W, b) per layer as numpy], U_0)."""
    layers = mlp((4, 6, 5, 3))
    params = init_params(jax.random.PRNGKey(1), layers, (4,), jnp.float64)
    x0, _ = _data(20, 4, 3)
    weights = _np(params)
    return layers, params, x0, weights, np.asarray(x0) @ weights[0][0] + weights[0][1]


# ---------------------------------------------------------------- the updates
def test_dual_ascent_adds_step_times_each_layers_mean_penalty_and_never_decreases():
    layers = mlp((4, 6, 5, 3))
    params = init_params(jax.random.PRNGKey(1), layers, (4,), jnp.float64)
    x0, _ = _data(20, 4, 3)
    (w0, b0), (w1, b1), _ = _np(params)
    x1 = np.maximum(np.asarray(x0) @ w0 + b0, 0.0) + 0.2 * np.abs(np.random.default_rng(0).normal(size=(20, 6)))
    x2 = np.maximum(x1 @ w1 + b1, 0.0)  # on the graph: layer 2's penalty is exactly 0
    trainer = LiftedTrainer(LiftedConfig(lambda_update="dual", lambda_step=0.5, lambda_max=100.0), layers)
    lams = jnp.asarray([2.0, 3.0])
    new = np.asarray(trainer.next_lambdas(lams, params, [jnp.asarray(x1), jnp.asarray(x2)], x0))
    p1 = np.mean(np.sum(np_relu_penalty(np.asarray(x0) @ w0 + b0, x1), axis=1))
    assert p1 > 0
    np.testing.assert_allclose(new, [2.0 + 0.5 * p1, 3.0], rtol=1e-12, atol=1e-12)
    capped = LiftedTrainer(LiftedConfig(lambda_update="dual", lambda_step=1e6, lambda_max=50.0), layers)
    assert float(capped.next_lambdas(lams, params, [jnp.asarray(x1), jnp.asarray(x2)], x0)[0]) == 50.0


def test_per_neuron_dual_ascent_adds_each_neurons_mean_penalty():
    """λ_l,j ← min(λ_l,j + η p_l,j, λ_max), p_l,j = (1/N) Σ_i B(U_l, X_l+1)_ij by numpy: a neuron on the graph keeps
    its λ, the others grow by their own penalty (not the layer's), and the layer sums match the per-layer rule."""
    layers, params, x0, ((w0, b0), (w1, b1), _), u0 = _two_hidden_layers()
    x1 = np.maximum(u0, 0.0) + 0.2 * np.abs(np.random.default_rng(0).normal(size=(20, 6)))
    x1[:, 2] = np.maximum(u0[:, 2], 0.0)  # neuron 2 of layer 1 on the graph: p = 0
    x2 = np.maximum(x1 @ w1 + b1, 0.0) + 0.1 * np.abs(np.random.default_rng(1).normal(size=(20, 5)))
    trainer = LiftedTrainer(LiftedConfig(lambda_update="dual", lambda_granularity="neuron", lambda_step=0.5,
                                         lambda_max=100.0), layers)
    lams = trainer.init(params)[1]
    assert [v.shape for v in lams] == [(6,), (5,)] and all(np.all(np.asarray(v) == 3.0) for v in lams)
    xs = [jnp.asarray(x1), jnp.asarray(x2)]
    new = trainer.next_lambdas(lams, params, xs, x0)
    p1 = np.mean(np_relu_penalty(u0, x1), axis=0)
    p2 = np.mean(np_relu_penalty(x1 @ w1 + b1, x2), axis=0)
    np.testing.assert_allclose(np.asarray(new[0]), 3.0 + 0.5 * p1, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(new[1]), 3.0 + 0.5 * p2, rtol=1e-12, atol=1e-12)
    assert float(new[0][2]) == 3.0 and np.all(np.delete(np.asarray(new[0]), 2) > 3.0)
    np.testing.assert_allclose(np.asarray(trainer.layer_penalties(params, xs, x0)), [p1.sum(), p2.sum()], rtol=1e-12)
    with pytest.raises(ValueError, match="lambda_granularity"):
        LiftedConfig(lambda_granularity="neuron")  # fixed λ: every neuron alike
    with pytest.raises(ValueError, match="lambda_granularity"):
        LiftedConfig(lambda_update="dual", lambda_granularity="unit")


def test_per_neuron_bound_is_below_the_network_objective_and_equal_lambdas_match_per_layer():
    """With per-neuron λ the relaxation bound min_X F stays ≤ J(W); with every λ_l,j = λ_l the per-neuron objective,
    bound and one training step equal the per-layer ones (a λ broadcast over samples instead of neurons, or a
    dropped neuron, would break the equality)."""
    layers = mlp((4, 6, 5, 3))
    params = init_params(jax.random.PRNGKey(2), layers, (4,), jnp.float64)
    x0, y = _data(30, 4, 3, seed=1)
    layer_wise = LiftedTrainer(LiftedConfig(lambda_update="dual", lambda_step=0.3), layers)
    neuron_wise = LiftedTrainer(LiftedConfig(lambda_update="dual", lambda_step=0.3, lambda_granularity="neuron"),
                                layers)
    s_layer, s_neuron = layer_wise.init(params), neuron_wise.init(params)
    s_layer, _ = layer_wise.step(s_layer, x0, y)  # the first step runs at λ_l,j = λ_l = 3 in both
    s_neuron, _ = neuron_wise.step(s_neuron, x0, y)
    for a, b in zip(layer_wise.params(s_layer), neuron_wise.params(s_neuron)):
        np.testing.assert_allclose(np.asarray(a["kernel"]), np.asarray(b["kernel"]), rtol=1e-10, atol=1e-12)
    # λ's update then adds each neuron's own penalty: λ differs between neurons, its sum grows as the layer's does
    for lam_l, lam_n in zip(s_layer[1], s_neuron[1]):
        np.testing.assert_allclose(float(jnp.sum(lam_n - 3.0)), float(lam_l - 3.0), rtol=1e-10)
    lam_neuron = s_neuron[1]
    assert any(float(jnp.max(v) - jnp.min(v)) > 0 for v in lam_neuron)
    net, bound, _ = neuron_wise.relaxation(neuron_wise.params(s_neuron), x0, y, None, tuple(lam_neuron))
    assert float(bound) <= float(net) + 1e-12
    m = neuron_wise.metrics(s_neuron, x0, y)
    assert len(m["lambdas"]) == 2 and all(lo <= mean <= hi for lo, mean, hi in
                                          zip(m["lambdas_min"], m["lambdas"], m["lambdas_max"]))


@pytest.mark.parametrize("rule", ["dual", "continuation"])
def test_lambda_sequence_over_training_steps(rule):
    """Dual: λ never decreases and grows at every minibatch step (the X step leaves B > 0); continuation: λ_k =
    min(λ_0·g^k, λ_max) by hand; the weights move as in fixed-λ training at the λ in force."""
    layers = mlp((5, 7, 3))
    params = init_params(jax.random.PRNGKey(2), layers, (5,), jnp.float64)
    x, y = _data(30, 5, 3)
    config = LiftedConfig(lambdas=2.0, lambda_update=rule, lambda_growth=1.5, lambda_max=5.0, lambda_step=2.0)
    trainer = LiftedTrainer(config, layers)
    state = trainer.init(params)
    seen = [float(state[1][0])]
    for _ in range(4):
        before = state
        state, info = trainer.step(state, x, y)
        assert not bool(info.nonfinite)
        seen.append(float(state[1][0]))
        fixed = LiftedTrainer(LiftedConfig(lambdas=seen[-2]), layers)  # the same step at λ fixed to the one in force
        expected, _ = fixed.step(fixed.init(trainer.params(before)), x, y)
        for a, b in zip(jax.tree_util.tree_leaves(trainer.params(state)), jax.tree_util.tree_leaves(expected)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)
    if rule == "continuation":
        np.testing.assert_allclose(seen, [min(2.0 * 1.5**k, 5.0) for k in range(5)], rtol=1e-12)
    else:
        assert all(b > a for a, b in zip(seen, seen[1:]))


# ---------------------------------------------------------------- the bound
def _np_lifted_min_over_x(params, x0, y, lam, rho):
    """min over X_1 ≥ 0 of F(W, X) for one hidden layer, by L-BFGS-B (convex in X_1), and J(W)."""
    (w0, b0), (w1, b1) = _np(params)
    x0, y = np.asarray(x0), np.asarray(y)
    n = x0.shape[0]
    u0 = x0 @ w0 + b0
    reg = rho * (np.sum(w0**2) + np.sum(w1**2))

    def f(flat):
        x1 = flat.reshape(u0.shape)
        logits = x1 @ w1 + b1
        logp = special.log_softmax(logits, axis=1)
        loss = -np.sum(y * logp) / n
        pen = lam * np.sum(np_relu_penalty(u0, x1)) / n
        g_logits = (np.exp(logp) - y) / n
        grad = g_logits @ w1.T + lam * (x1 - u0) / n
        return loss + pen + reg, grad.ravel()

    x_ff = np.maximum(u0, 0.0)
    network = f(x_ff.ravel())[0]
    res = optimize.minimize(f, x_ff.ravel(), jac=True, method="L-BFGS-B", bounds=[(0, None)] * x_ff.size,
                            options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-12})
    return network, res.fun


def test_relaxation_bound_is_scipys_min_over_x_and_below_the_network_objective():
    layers = mlp((6, 8, 3))
    params = init_params(jax.random.PRNGKey(3), layers, (6,), jnp.float64)
    x, y = _data(25, 6, 3, seed=4)
    trainer = LiftedTrainer(LiftedConfig(lambdas=2.0, rho=1e-3), layers)
    network, bound, sweeps = trainer.relaxation(params, x, y)
    expected_network, expected_bound = _np_lifted_min_over_x(params, x, y, 2.0, 1e-3)
    np.testing.assert_allclose(float(network), expected_network, rtol=1e-12)
    np.testing.assert_allclose(float(bound), expected_bound, rtol=1e-6)
    assert float(bound) < float(network) and int(sweeps) >= 1


def test_relaxation_gap_shrinks_as_lambda_grows_at_fixed_weights():
    """min_X F(W, X; λ) is non-decreasing in λ (F is, for every X) and J(W) does not depend on λ."""
    layers = mlp((6, 8, 3))
    params = init_params(jax.random.PRNGKey(5), layers, (6,), jnp.float64)
    x, y = _data(25, 6, 3, seed=6)
    gaps = []
    for lam in (0.3, 1.0, 3.0, 10.0, 30.0):
        network, bound, _ = LiftedTrainer(LiftedConfig(lambdas=lam), layers).relaxation(params, x, y)
        gaps.append(float(network - bound))
        _, expected = _np_lifted_min_over_x(params, x, y, lam, LiftedConfig().rho)
        np.testing.assert_allclose(float(bound), expected, rtol=1e-6)
    assert all(b < a for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] >= 0


def test_bound_of_a_deep_network_stays_below_its_objective():
    layers = mlp((5, 7, 6, 3))
    params = init_params(jax.random.PRNGKey(7), layers, (5,), jnp.float64)
    x, y = _data(20, 5, 3, seed=8)
    trainer = LiftedTrainer(LiftedConfig(lambdas=(1.0, 4.0)), layers)
    network, bound, sweeps = trainer.relaxation(params, x, y)
    (w0, b0), (w1, b1), (w2, b2) = _np(params)
    h = np.maximum(np.maximum(np.asarray(x) @ w0 + b0, 0) @ w1 + b1, 0)
    logp = special.log_softmax(h @ w2 + b2, axis=1)
    reg = LiftedConfig().rho * sum(np.sum(w**2) for w in (w0, w1, w2))
    np.testing.assert_allclose(float(network), -np.mean(np.sum(np.asarray(y) * logp, axis=1)) + reg, rtol=1e-12)
    assert float(bound) < float(network) and int(sweeps) > 1


def test_bound_max_sweeps_caps_the_logged_bound_and_zero_skips_it():
    """bound_max_sweeps=1 stops after one sweep (a cap that were ignored would take the > 1 sweeps above, and give
    a lower bound); 0 logs J(W), the numpy network objective, and no bound."""
    layers = mlp((5, 7, 6, 3))
    params = init_params(jax.random.PRNGKey(7), layers, (5,), jnp.float64)
    x, y = _data(20, 5, 3, seed=8)
    full = LiftedTrainer(LiftedConfig(lambdas=(1.0, 4.0)), layers).metrics(params, x, y)
    one = LiftedTrainer(LiftedConfig(lambdas=(1.0, 4.0), bound_max_sweeps=1), layers).metrics(params, x, y)
    off = LiftedTrainer(LiftedConfig(lambdas=(1.0, 4.0), bound_max_sweeps=0), layers).metrics(params, x, y)
    assert one["bound_sweeps"] == 1 < full["bound_sweeps"]
    assert full["lifted_bound"] < one["lifted_bound"] < one["network_objective"]
    (w0, b0), (w1, b1), (w2, b2) = _np(params)
    h = np.maximum(np.maximum(np.asarray(x) @ w0 + b0, 0) @ w1 + b1, 0)
    logp = special.log_softmax(h @ w2 + b2, axis=1)
    reg = LiftedConfig().rho * sum(np.sum(w**2) for w in (w0, w1, w2))
    np.testing.assert_allclose(off["network_objective"], -np.mean(np.sum(np.asarray(y) * logp, axis=1)) + reg,
                               rtol=1e-12)
    assert not {"lifted_bound", "relaxation_gap", "bound_sweeps"} & set(off)
    with pytest.raises(ValueError, match="bound_max_sweeps"):
        LiftedConfig(bound_max_sweeps=-1)


# ---------------------------------------------------------------- the launcher
def _tiny(**overrides):
    config = load_config(ROOT / "configs" / "tiny.py")
    config.update(dict(train_size=600, test_size=300, batch_size=100, objective_batch=300, warm_start_epochs=0))
    config.update(overrides)
    return config


def test_fixed_budget_warm_start_spends_exactly_the_budget(tmp_path):
    summary = train_and_evaluate(_tiny(total_epochs=1, budget_epochs=3, warm_start_epochs=7), tmp_path / "run")
    assert summary["epochs"] == 1 and len(summary["warm_start_curve"]) == 2
    summary = train_and_evaluate(_tiny(total_epochs=2, budget_epochs=2), tmp_path / "all_lifted")
    assert summary["epochs"] == 2 and "warm_start_curve" not in summary
    with pytest.raises(ValueError, match="budget_epochs=2 needs total_epochs"):
        validate_config(_tiny(total_epochs=3, budget_epochs=2))


@pytest.mark.parametrize("granularity", ["layer", "neuron"])
def test_dual_run_logs_lambda_and_gap_and_resumes_exactly(tmp_path, granularity):
    config = _tiny(total_epochs=2, lambda_update="dual", lambda_step=1.0, lambda_granularity=granularity)
    whole = train_and_evaluate(config, tmp_path / "whole")
    assert train_and_evaluate(config, tmp_path / "cut", max_epochs_this_run=1) == {"interrupted_after_epoch": 1}
    resumed = train_and_evaluate(config, tmp_path / "cut")
    assert resumed["test_accuracy"] == whole["test_accuracy"]
    recs, cut = Workdir(tmp_path / "whole").read_metrics(), Workdir(tmp_path / "cut").read_metrics()
    assert len(recs) == len(cut) == 2
    for a, b in zip(recs, cut):  # λ is part of the checkpointed state
        assert a["lambdas"] == b["lambdas"] and a["relaxation_gap"] == b["relaxation_gap"]
        assert a.get("lambdas_max") == b.get("lambdas_max") and ("lambdas_max" in a) == (granularity == "neuron")
    lams = [r["lambdas"][0] for r in recs]
    assert 3.0 < lams[0] < lams[1]  # grew from λ = 3 in every epoch
    for r in recs:
        assert r["relaxation_gap"] >= 0 and r["lifted_bound"] <= r["network_objective"]
    with pytest.raises(ValueError, match="lambda_update"):
        validate_config(_tiny(lambda_update="primal"))
    with pytest.raises(ValueError, match="lambda_max"):
        validate_config(_tiny(lambda_max=1.0))


# ---------------------------------------------------------------- audit additions
def test_per_neuron_dual_ascent_is_capped_at_lambda_max():
    """Per-neuron dual ascent is min(λ + η p, λ_max) by numpy (catches the λ_max cap dropped per neuron)."""
    layers, params, x0, ((w0, b0), (w1, b1), _), u0 = _two_hidden_layers()
    x1 = np.maximum(u0, 0.0) + 0.3 * np.abs(np.random.default_rng(2).normal(size=(20, 6)))
    x2 = np.maximum(x1 @ w1 + b1, 0.0) + 0.1 * np.abs(np.random.default_rng(3).normal(size=(20, 5)))
    p1, p2 = np.mean(np_relu_penalty(u0, x1), axis=0), np.mean(np_relu_penalty(x1 @ w1 + b1, x2), axis=0)
    step, start = 2.0, 3.0
    lam_max = start + step * float(np.median(np.r_[p1, p2]))  # some neurons above the cap, some below
    trainer = LiftedTrainer(LiftedConfig(lambda_update="dual", lambda_granularity="neuron", lambda_step=step,
                                         lambda_max=lam_max), layers)
    new = trainer.next_lambdas(trainer.init(params)[1], params, [jnp.asarray(x1), jnp.asarray(x2)], x0)
    for got, p in zip(new, (p1, p2)):
        np.testing.assert_allclose(np.asarray(got), np.minimum(start + step * p, lam_max), rtol=1e-12)
    assert any(np.any(start + step * p > lam_max) for p in (p1, p2))
    assert any(np.any(start + step * p < lam_max) for p in (p1, p2))


def test_config_rejects_a_non_positive_lambda_step():
    """LiftedConfig rejects lambda_step ≤ 0 (catches a validation that accepts a zero step)."""
    for step in (0.0, -0.5):
        with pytest.raises(ValueError, match="lambda_step"):
            LiftedConfig(lambda_update="dual", lambda_step=step)
