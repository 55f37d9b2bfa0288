"""The lifted objective: equals the network loss at forward activations; gradients vs finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fenchel import LiftedConfig, LiftedTrainer, init_mlp, lifted_objective, network_loss, objective_terms, regulariser
from fenchel.penalties import ACTIVATIONS, get_penalty

SIZES = (6, 5, 4, 3)


def problem(loss, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    x0 = jax.random.normal(k1, (17, SIZES[0]))
    if loss == "softmax":
        y = jax.nn.one_hot(jax.random.randint(k2, (17,), 0, SIZES[-1]), SIZES[-1])
    else:
        y = jax.random.normal(k2, (17, SIZES[-1]))
    return init_mlp(k3, SIZES, jnp.float64), x0, y


@pytest.mark.parametrize("loss", ["softmax", "squared"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_objective_at_forward_pass_equals_network_loss_plus_regulariser(act, loss):
    params, x0, y = problem(loss)
    pen = get_penalty(act)
    tr = LiftedTrainer(LiftedConfig(activation=act, loss=loss, lambdas=(0.7, 1.3), rho=(1e-2, 2e-2, 3e-3)), 3)
    xs = tr.forward(params, x0)
    terms = objective_terms(params, xs, x0, y, pen, (0.7, 1.3), (1e-2, 2e-2, 3e-3), loss)
    expected = network_loss(params, x0, y, pen, loss) + regulariser(params, (1e-2, 2e-2, 3e-3))
    assert abs(float(terms["total"]) - float(expected)) <= 1e-10
    assert all(abs(float(p)) <= 1e-10 for p in terms["penalties"])


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_min_over_X_is_a_lower_bound_of_the_network_loss(act):
    """BCD on X alone (W fixed) from the forward pass can only lower F below loss + reg."""
    params, x0, y = problem("softmax", seed=1)
    cfg = LiftedConfig(activation=act, lambdas=0.5, rho=1e-3)
    tr = LiftedTrainer(cfg, 3)
    xs = tr.forward(params, x0)
    f_forward = float(tr.objective_terms(params, xs, x0, y)["total"])
    for _ in range(5):
        xs, _ = tr.x_step(params, xs, x0, y)
    f_min = float(tr.objective_terms(params, xs, x0, y)["total"])
    net = float(network_loss(params, x0, y, cfg.penalty) + regulariser(params, 1e-3))
    assert abs(f_forward - net) < 1e-10
    assert f_min < net - 1e-4


def _central_differences(fn, x, eps=1e-6):
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = eps
        grad[i] = (fn(x + e) - fn(x - e)) / (2 * eps)
    return grad


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "sigmoid", "tanh"])
def test_gradients_match_central_finite_differences(act):
    params, x0, y = problem("softmax", seed=2)
    pen = get_penalty(act)
    tr = LiftedTrainer(LiftedConfig(activation=act), 3)
    xs = tr.forward(params, x0)
    # move X off the graph but keep it strictly inside the domain
    key = jax.random.PRNGKey(5)
    xs = [jnp.clip(x + 0.05 * jax.random.normal(key, x.shape), float(pen.lower) + 0.01 if np.isfinite(pen.lower)
                   else -np.inf, float(pen.upper) - 0.01 if np.isfinite(pen.upper) else np.inf) for x in xs]

    def f(params, xs):
        return lifted_objective(params, xs, x0, y, pen, (0.7, 1.3), 1e-2)

    g_params, g_xs = jax.grad(f, argnums=(0, 1))(params, xs)
    for l in range(len(params)):
        for name in ("kernel", "bias"):
            def fw(w, l=l, name=name):
                p = [dict(q) for q in params]
                p[l][name] = jnp.asarray(w)
                return float(f(p, xs))
            np.testing.assert_allclose(g_params[l][name], _central_differences(fw, params[l][name]),
                                       rtol=1e-6, atol=1e-7)
    for l in range(len(xs)):
        def fx(x, l=l):
            z = list(xs)
            z[l] = jnp.asarray(x)
            return float(f(params, z))
        np.testing.assert_allclose(g_xs[l], _central_differences(fx, xs[l]), rtol=1e-6, atol=1e-7)
