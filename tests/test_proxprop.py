"""ProxProp: the proximal layer step against numpy references (backprop, prox objective, linear solves)."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs_util import load_config
from experiments.train import train_and_evaluate, validate_config
from experiments.trainers import TRAINERS
from fenchel import get_penalty, mlp
from fenchel.proxprop import ProxPropTrainer, precondition, proximal_update

ROOT = Path(__file__).resolve().parents[1]
RELU = get_penalty("relu")


# ---------------------------------------------------------------- numpy references
def problem(seed, sizes, n):
    """Random relu network (kernel, bias per layer), inputs and one-hot targets, float64."""
    rng = np.random.default_rng(seed)
    params = [{"kernel": rng.normal(0, 1 / np.sqrt(a), (a, b)), "bias": rng.normal(0, 0.1, b)}
              for a, b in zip(sizes[:-1], sizes[1:])]
    x = rng.normal(size=(n, sizes[0]))
    y = np.eye(sizes[-1])[rng.integers(0, sizes[-1], n)]
    return params, x, y


def np_backprop(params, x, y):
    """J = (1/N) Σ −y·log softmax(f(x)), ReLU hidden layers: (J, [(∇W, ∇b)], layer inputs, ∂J/∂Z per layer)."""
    inputs, zs, h = [x], [], x
    for l, p in enumerate(params):
        z = h @ p["kernel"] + p["bias"]
        zs.append(z)
        if l < len(params) - 1:
            h = np.maximum(z, 0)
            inputs.append(h)
    logits = zs[-1] - zs[-1].max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    n = x.shape[0]
    loss = -np.sum(y * logp) / n
    gz = (np.exp(logp) - y) / n
    grads, gzs = [None] * len(params), [None] * len(params)
    for l in reversed(range(len(params))):
        gzs[l] = gz
        grads[l] = (inputs[l].T @ gz, gz.sum(axis=0))
        if l:
            gz = (gz @ params[l]["kernel"].T) * (zs[l - 1] > 0)
    return loss, grads, inputs, gzs


def stacked(p):
    return np.vstack([np.asarray(p["kernel"]), np.asarray(p["bias"])[None]])


def prox_objective(theta, theta_k, a, z_half, tau_theta):
    """½‖[a 1]Θ − z^{k+½}‖² + 1/(2τ_θ)‖Θ − Θ_k‖² and its gradient in Θ."""
    a1 = np.hstack([a, np.ones((a.shape[0], 1))])
    r = a1 @ theta - z_half
    value = 0.5 * np.sum(r**2) + np.sum((theta - theta_k) ** 2) / (2 * tau_theta)
    return value, a1.T @ r + (theta - theta_k) / tau_theta


def update(params, x, y, sizes, **kw):
    return proximal_update(params, jnp.asarray(x), jnp.asarray(y), RELU, mlp(sizes), **kw)


# ---------------------------------------------------------------- 1. τ_θ → 0 is plain gradient descent
@pytest.mark.parametrize("n,solver", [(5, "exact"), (30, "exact"), (5, "cg")])
def test_small_tau_theta_gives_the_sgd_step(n, solver):
    """Catches a wrong scaling of the preconditioner (τ_θ vs 1/τ_θ, a missing τ) or a wrong gradient."""
    sizes, tau = (8, 7, 6, 3), 0.3
    params, x, y = problem(0, sizes, n)
    _, grads, _, _ = np_backprop(params, x, y)
    errors = []
    for tau_theta in (1e-2, 1e-3, 1e-4, 1e-5):
        new = update(params, x, y, sizes, tau=tau, tau_theta=tau_theta, solver=solver, cg_steps=20)
        err = 0.0
        for l in range(2):
            step = (stacked(new[l]) - stacked(params[l])) / (-tau * tau_theta)
            g = np.vstack([grads[l][0], grads[l][1][None]])
            err = max(err, np.linalg.norm(step - g) / np.linalg.norm(g))
        errors.append(err)
        # the output layer always takes the plain step −τ ∇J
        np.testing.assert_allclose(new[2]["kernel"], params[2]["kernel"] - tau * grads[2][0], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(new[2]["bias"], params[2]["bias"] - tau * grads[2][1], rtol=1e-12, atol=1e-14)
    assert all(b < 0.2 * a for a, b in zip(errors, errors[1:])), errors  # O(τ_θ)
    assert errors[-1] < 1e-3, errors


# ---------------------------------------------------------------- 2. CG → exact, both exact branches
@pytest.mark.parametrize("n", [5, 40])  # N < n_in + 1 (push-through N×N) and N > n_in + 1 (primal)
def test_cg_with_many_steps_equals_the_exact_solve(n):
    """Catches a wrong push-through identity, a missing bias column, or a broken CG recursion."""
    rng = np.random.default_rng(1)
    a, g, tau_theta = rng.normal(size=(n, 8)), rng.normal(size=(9, 4)), 0.7
    a1 = np.hstack([a, np.ones((n, 1))])
    expected = np.linalg.solve(np.eye(9) / tau_theta + a1.T @ a1, g)
    exact = precondition(jnp.asarray(a), jnp.asarray(g), tau_theta, "exact")
    cg = precondition(jnp.asarray(a), jnp.asarray(g), tau_theta, "cg", cg_steps=60)
    np.testing.assert_allclose(exact, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cg, expected, rtol=1e-8, atol=1e-10)

    sizes = (8, 7, 6, 3)
    params, x, y = problem(2, sizes, n)
    ex = update(params, x, y, sizes, tau_theta=0.7, solver="exact")
    it = update(params, x, y, sizes, tau_theta=0.7, solver="cg", cg_steps=60)
    for p, q in zip(ex, it):
        np.testing.assert_allclose(p["kernel"], q["kernel"], rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(p["bias"], q["bias"], rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------- 3. the proximal objective
@pytest.mark.parametrize("n", [5, 40])
def test_each_step_decreases_its_proximal_objective_and_exact_is_the_minimiser(n):
    """Catches a sign error, z^{k+½} with a sum-vs-mean mismatch, or CG iterates that leave the descent path."""
    sizes, tau, tau_theta = (8, 7, 6, 3), 0.5, 0.2
    params, x, y = problem(3, sizes, n)
    _, _, inputs, gzs = np_backprop(params, x, y)
    solves = {"exact": update(params, x, y, sizes, tau=tau, tau_theta=tau_theta, solver="exact")}
    for k in (1, 2, 3, 5):
        solves[f"cg{k}"] = update(params, x, y, sizes, tau=tau, tau_theta=tau_theta, solver="cg", cg_steps=k)
    for l in range(len(sizes) - 2):
        theta_k = stacked(params[l])
        a1 = np.hstack([inputs[l], np.ones((n, 1))])
        z_half = a1 @ theta_k - tau * gzs[l]
        f0, grad0 = prox_objective(theta_k, theta_k, inputs[l], z_half, tau_theta)
        values = {name: prox_objective(stacked(new[l]), theta_k, inputs[l], z_half, tau_theta) for name, new in
                  solves.items()}
        cg = [values[f"cg{k}"][0] for k in (1, 2, 3, 5)]
        assert cg[0] < f0 and all(b <= a + 1e-12 for a, b in zip(cg, cg[1:])), (f0, cg)
        assert values["exact"][0] <= min(cg) + 1e-12
        assert np.linalg.norm(values["exact"][1]) <= 1e-10 * np.linalg.norm(grad0)


# ---------------------------------------------------------------- 4. descent direction
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("solver,steps", [("exact", 1), ("cg", 2)])
def test_the_step_is_a_descent_direction(seed, solver, steps):
    """Catches a preconditioner that is not positive definite or a flipped sign in any layer."""
    rng = np.random.default_rng(100 + seed)
    sizes = (int(rng.integers(3, 12)), int(rng.integers(2, 10)), int(rng.integers(2, 10)), 4)
    params, x, y = problem(seed, sizes, int(rng.integers(2, 30)))
    loss, grads, _, _ = np_backprop(params, x, y)
    new = update(params, x, y, sizes, tau=1.0, tau_theta=float(rng.uniform(0.01, 10)), solver=solver,
                 cg_steps=steps)
    d = [(np.asarray(q["kernel"]) - p["kernel"], np.asarray(q["bias"]) - p["bias"]) for p, q in zip(params, new)]
    inner = sum(np.sum(dw * gw) + np.sum(db * gb) for (dw, db), (gw, gb) in zip(d, grads))
    assert inner < 0
    eps = 1e-4
    moved = [{"kernel": p["kernel"] + eps * dw, "bias": p["bias"] + eps * db} for p, (dw, db) in zip(params, d)]
    assert np_backprop(moved, x, y)[0] < loss


# ---------------------------------------------------------------- 5. the trainer and its registration
def test_trainer_feeds_the_proxprop_gradient_to_nesterov_and_compiles_once():
    """Catches a wrong optax wiring (g = −(Θ_new − Θ_old)/τ, Nesterov 0.95) or a retrace per step."""
    sizes, tau, lr = (8, 7, 3), 0.4, 0.1
    params, x, y = problem(4, sizes, 6)
    trainer = ProxPropTrainer(mlp(sizes), RELU, tau=tau, tau_theta=0.3, optimizer="sgd", learning_rate=lr)
    state = trainer.init([{k: jnp.asarray(v) for k, v in p.items()} for p in params])  # as the launcher's
    state, info = trainer.step(state, jnp.asarray(x), jnp.asarray(y))
    new = update(params, x, y, sizes, tau=tau, tau_theta=0.3)
    assert np.isclose(info.loss, np_backprop(params, x, y)[0]) and not info.nonfinite
    for p, q, r in zip(params, new, trainer.params(state)):
        g = (p["kernel"] - np.asarray(q["kernel"])) / tau
        np.testing.assert_allclose(r["kernel"], p["kernel"] - lr * 1.95 * g, rtol=1e-10, atol=1e-12)
    for seed in (5, 6):
        _, x2, y2 = problem(seed, sizes, 6)
        state, _ = trainer.step(state, jnp.asarray(x2), jnp.asarray(y2))
    assert trainer._step._cache_size() == 1


def test_proxprop_runs_through_the_launcher_on_tiny(tmp_path):
    """Catches a broken registration/config wiring; the defaults must train."""
    config = load_config(ROOT / "configs" / "tiny.py")
    config.trainer = "proxprop"
    assert TRAINERS["proxprop"].title == "ProxProp"
    assert (config.proxprop_tau, config.proxprop_tau_theta, config.proxprop_solver) == (1.0, 0.05, "exact")
    summary = train_and_evaluate(config, tmp_path / "pp")
    assert summary["test_accuracy"] > 0.6
    config.proxprop_solver = "cg"
    config.total_epochs = 1
    assert train_and_evaluate(config, tmp_path / "pp_cg")["test_accuracy"] > 0.3


@pytest.mark.parametrize("key,value", [("proxprop_tau", 0.0), ("proxprop_tau_theta", -1.0), ("proxprop_lr", 0.0),
                                       ("proxprop_solver", "lu"), ("proxprop_cg_steps", 0),
                                       ("proxprop_optimizer", "rmsprop")])
def test_a_bad_value_names_its_key(key, value):
    config = load_config(ROOT / "configs" / "tiny.py")
    config.trainer = "proxprop"
    setattr(config, key, value)
    with pytest.raises(ValueError, match=f"bad config: {key}="):
        validate_config(config)


def np_im2col(x, k, padding):
    """Patches of NHWC `x` for a stride-1 k×k convolution, one row per (sample, output row, output column),
    columns in (kernel row, kernel column, input channel) order — flax's HWIO kernel flattened."""
    if padding == "SAME":
        lo, hi = (k - 1) // 2, k // 2
        x = np.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
    n, h, w, c = x.shape
    rows = [x[i, r:r + k, q:q + k, :].reshape(-1) for i in range(n) for r in range(h - k + 1) for q in range(w - k + 1)]
    return np.asarray(rows)


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
def test_conv_layer_step_is_the_argmin_of_its_proximal_problem(padding):
    """A conv hidden layer's ProxProp step solves ½‖[Z 1]Θ − z^{k+½}‖² + 1/(2τ_θ)‖Θ − Θ_k‖² over Θ = [W_flat; b],
    Z the patch matrix (numpy im2col here, one row per sample × position). Catches a transposed kernel
    flattening, patches in the wrong order, or a dense-only input matrix."""
    import jax

    from fenchel import init_params
    from fenchel.layers import Conv, Dense

    rng = np.random.default_rng(3)
    layers = (Conv(3, 3, padding=padding), Dense(4))
    x = rng.normal(size=(6, 5, 5, 2))
    y = np.eye(4)[rng.integers(0, 4, 6)]
    params = init_params(jax.random.PRNGKey(0), layers, (5, 5, 2), jnp.float64)
    tau, tau_theta = 0.7, 0.2
    new = proximal_update(params, jnp.asarray(x), jnp.asarray(y), RELU, layers, tau=tau, tau_theta=tau_theta)

    def loss_of_u(u):  # J as a function of the conv layer's pre-activation
        h = jnp.maximum(u, 0).reshape(u.shape[0], -1)
        logits = h @ params[1]["kernel"] + params[1]["bias"]
        return -jnp.mean(jnp.sum(jnp.asarray(y) * jax.nn.log_softmax(logits), axis=1))

    z = np_im2col(x, 3, padding)
    kernel, bias = np.asarray(params[0]["kernel"]), np.asarray(params[0]["bias"])
    theta_k = np.vstack([kernel.reshape(-1, 3), bias[None]])
    u = (np.hstack([z, np.ones((z.shape[0], 1))]) @ theta_k)
    side = 5 if padding == "SAME" else 3
    g_u = np.asarray(jax.grad(loss_of_u)(jnp.asarray(u.reshape(6, side, side, 3)))).reshape(-1, 3)
    z_half = u - tau * g_u
    a1 = np.hstack([z, np.ones((z.shape[0], 1))])
    expected = np.linalg.solve(a1.T @ a1 + np.eye(a1.shape[1]) / tau_theta, a1.T @ z_half + theta_k / tau_theta)
    got = np.vstack([np.asarray(new[0]["kernel"]).reshape(-1, 3), np.asarray(new[0]["bias"])[None]])
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    assert np.linalg.norm(expected - theta_k) > 1e-3  # the step moved


def test_proxprop_trains_a_small_cnn_through_the_launcher(tmp_path):
    config = load_config(ROOT / "configs" / "tiny.py")
    config.update(dict(trainer="proxprop", layers="conv:4:5,pool:2,dense:16", train_size=2000, test_size=500,
                       total_epochs=1, batch_size=50, warm_start_epochs=0))
    summary = train_and_evaluate(config, tmp_path / "cnn")  # 40 steps; measured 80.6% (chance: 10%)
    assert summary["test_accuracy"] > 0.6


def test_lr_sweep_records_divergence_and_plots(tmp_path):
    """A diverging learning rate is a 'diverged' cell, not a number; the others are the runs' accuracies."""
    from experiments.lr_sweep import report, sweep

    config = load_config(ROOT / "configs" / "tiny.py")
    config.update(dict(train_size=500, test_size=200, total_epochs=1, warm_start_epochs=0))
    rows = sweep(config, tmp_path, [("sgd", "learning_rate")], [0.05, 1e4], [0])
    ok, bad = rows
    assert "test_accuracy" in ok and "diverged" in bad and "test_accuracy" not in bad
    report(rows, tmp_path)
    table = (tmp_path / "lr_sweep.md").read_text()
    assert f"| 0.05 | {100 * ok['test_accuracy']:.2f} |" in table and "| 10000 | diverged |" in table
    assert (tmp_path / "lr_sweep.png").stat().st_size > 1000
