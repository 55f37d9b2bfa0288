"""The lifted objective against an independent float64 numpy implementation: values, gradients, lower bound.

    F(W, X) = (1/N)[Σ_i loss(Y_i, U_L,i) + Σ_l λ_l Σ_i Σ_j B(U_l,ij, X_l+1,ij)] + Σ_l ρ_l ‖W_l‖²,  U_l = X_l W_l + b_l.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, special

from fenchel.lifted import lifted_objective, network_loss, objective_terms, regulariser
from fenchel.penalties import ACTIVATIONS, get_penalty

SIZES = (6, 5, 4, 3)  # two hidden layers
N = 17
SLOPE = 0.1
LAMBDAS = (0.7, 1.3)
RHO = (1e-2, 2e-2, 3e-3)
LOSSES = ("softmax", "squared")
# interval strictly inside each penalty's v-domain, for off-graph points
INTERIOR = {"relu": (0.05, None), "leaky_relu": (None, None), "sigmoid": (0.02, 0.98), "tanh": (-0.98, 0.98),
            "lnn_relu": (0.05, None)}
DOMAIN = {"relu": (0.0, None), "leaky_relu": (None, None), "sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}


def make_penalty(name):
    if name == "lnn_relu":
        return get_penalty("relu", lifting="lnn")
    return get_penalty(name, **({"negative_slope": SLOPE} if name == "leaky_relu" else {}))


# ---------------------------------------------------------------- numpy reference
def np_loss(kind, y, u):
    """Per-sample −Σ_k y_k log softmax(u)_k (stable log-sum-exp) or ½‖y − u‖²."""
    if kind == "softmax":
        m = u.max(axis=1, keepdims=True)
        log_softmax = u - (m + np.log(np.exp(u - m).sum(axis=1, keepdims=True)))
        return -(y * log_softmax).sum(axis=1)
    return 0.5 * ((y - u) ** 2).sum(axis=1)


def np_activation(name, u):
    return {
        "relu": lambda: np.maximum(u, 0.0),
        "lnn_relu": lambda: np.maximum(u, 0.0),
        "leaky_relu": lambda: np.where(u >= 0, u, SLOPE * u),
        "sigmoid": lambda: special.expit(u),
        "tanh": lambda: np.tanh(u),
    }[name]()


def np_penalty(name, u, v):
    """Textbook B = F(u) + F*(v) − u·v (and LNN's (v − u)²), elementwise."""
    xlogx = lambda x: special.xlogy(x, x)  # noqa: E731
    if name == "relu":
        return 0.5 * v**2 + 0.5 * np.maximum(u, 0) ** 2 - u * v
    if name == "leaky_relu":
        a = SLOPE
        return (0.5 * np.maximum(u, 0) ** 2 + 0.5 * a * np.minimum(u, 0) ** 2
                + 0.5 * np.maximum(v, 0) ** 2 + np.minimum(v, 0) ** 2 / (2 * a) - u * v)
    if name == "sigmoid":
        return np.logaddexp(0, u) + xlogx(v) + xlogx(1 - v) - u * v
    if name == "tanh":
        log_cosh = np.logaddexp(u, -u) - np.log(2)
        return log_cosh + 0.5 * (xlogx(1 + v) + xlogx(1 - v)) - u * v
    if name == "lnn_relu":
        return (v - u) ** 2
    raise AssertionError(name)


def np_forward(params, x0, name):
    """X_{l+1} = φ(X_l W_l + b_l) for the hidden layers; returns (xs, logits)."""
    xs, x = [], x0
    for p in params[:-1]:
        x = np_activation(name, x @ p["kernel"] + p["bias"])
        xs.append(x)
    return xs, x @ params[-1]["kernel"] + params[-1]["bias"]


def np_objective(params, xs, x0, y, name, loss):
    """The lifted objective's terms: mean loss, λ-weighted penalties per layer, regulariser, total."""
    inputs = [x0, *xs]
    penalties = [lam * np_penalty(name, inputs[l] @ params[l]["kernel"] + params[l]["bias"], xs[l]).sum() / N
                 for l, lam in enumerate(LAMBDAS)]
    data = np_loss(loss, y, inputs[-1] @ params[-1]["kernel"] + params[-1]["bias"]).mean()
    reg = sum(r * (p["kernel"] ** 2).sum() for r, p in zip(RHO, params))
    return {"loss": data, "penalties": penalties, "regulariser": reg, "total": data + sum(penalties) + reg}


# ---------------------------------------------------------------- problem data
def np_problem(loss, seed=0):
    rng = np.random.default_rng(seed)
    params = [{"kernel": rng.normal(0, 1 / np.sqrt(n_in), (n_in, n_out)), "bias": rng.normal(0, 0.3, n_out)}
              for n_in, n_out in zip(SIZES[:-1], SIZES[1:])]
    x0 = rng.normal(0, 1, (N, SIZES[0]))
    if loss == "softmax":
        y = np.eye(SIZES[-1])[rng.integers(0, SIZES[-1], N)]
    else:
        y = rng.normal(0, 1, (N, SIZES[-1]))
    return params, x0, y


def off_graph(xs, name, seed=5):
    rng = np.random.default_rng(seed)
    lo, hi = INTERIOR[name]
    return [np.clip(x + 0.3 * rng.normal(0, 1, x.shape), lo, hi) for x in xs]


def to_jax(params, xs, x0, y):
    jparams = [{k: jnp.asarray(v, jnp.float64) for k, v in p.items()} for p in params]
    return jparams, [jnp.asarray(x, jnp.float64) for x in xs], jnp.asarray(x0), jnp.asarray(y)


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("name", (*ACTIVATIONS, "lnn_relu"))
def test_objective_terms_match_numpy(name, loss):
    """Total and per-layer penalties equal the numpy objective at the forward X and at an off-graph X."""
    params, x0, y = np_problem(loss)
    pen = make_penalty(name)
    xs_fwd, logits = np_forward(params, x0, name)
    for xs in (xs_fwd, off_graph(xs_fwd, name)):
        ref = np_objective(params, xs, x0, y, name, loss)
        got = objective_terms(*to_jax(params, xs, x0, y), pen, LAMBDAS, RHO, loss)
        np.testing.assert_allclose(float(got["total"]), ref["total"], rtol=1e-10)
        np.testing.assert_allclose(float(got["loss"]), ref["loss"], rtol=1e-10)
        np.testing.assert_allclose(float(got["regulariser"]), ref["regulariser"], rtol=1e-10)
        assert len(got["penalties"]) == len(ref["penalties"]) == len(SIZES) - 2
        np.testing.assert_allclose([float(p) for p in got["penalties"]], ref["penalties"], rtol=1e-10, atol=1e-12)
    # the off-graph point really is off the graph
    assert all(p > 1e-3 for p in ref["penalties"])
    # at the forward X: F = network loss + regulariser, both the library's and numpy's
    jparams, _, jx0, jy = to_jax(params, [], x0, y)
    np_net = np_loss(loss, y, logits).mean()
    np_reg = sum(r * (p["kernel"] ** 2).sum() for r, p in zip(RHO, params))
    np.testing.assert_allclose(float(network_loss(jparams, jx0, jy, pen, loss)), np_net, rtol=1e-10)
    np.testing.assert_allclose(float(regulariser(jparams, RHO)), np_reg, rtol=1e-10)
    if name != "lnn_relu":  # LNN's penalty is min(u, 0)² ≠ 0 on the graph of relu
        ref_fwd = np_objective(params, xs_fwd, x0, y, name, loss)
        assert max(abs(p) for p in ref_fwd["penalties"]) <= 1e-12
        total = objective_terms(*to_jax(params, xs_fwd, x0, y), pen, LAMBDAS, RHO, loss)["total"]
        np.testing.assert_allclose(float(total), np_net + np_reg, rtol=1e-10)


def _central_differences(fn, x, eps=1e-6):
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = eps
        grad[i] = (fn(x + e) - fn(x - e)) / (2 * eps)
    return grad


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("name", (*ACTIVATIONS, "lnn_relu"))
def test_gradients_match_finite_differences_of_numpy_objective(name, loss):
    """jax.grad of lifted_objective w.r.t. params and X = central differences (eps 1e-6) of the numpy objective."""
    params, x0, y = np_problem(loss, seed=2)
    xs = off_graph(np_forward(params, x0, name)[0], name)
    pen = make_penalty(name)
    jparams, jxs, jx0, jy = to_jax(params, xs, x0, y)
    g_params, g_xs = jax.grad(lifted_objective, argnums=(0, 1))(jparams, jxs, jx0, jy, pen, LAMBDAS, RHO, loss)

    for l in range(len(params)):
        for key in ("kernel", "bias"):
            def f_w(w, l=l, key=key):
                p = [dict(q) for q in params]
                p[l][key] = w
                return np_objective(p, xs, x0, y, name, loss)["total"]
            np.testing.assert_allclose(np.asarray(g_params[l][key]), _central_differences(f_w, params[l][key]),
                                       rtol=1e-6, atol=1e-8, err_msg=f"layer {l} {key}")
    for l in range(len(xs)):
        def f_x(x, l=l):
            z = list(xs)
            z[l] = x
            return np_objective(params, z, x0, y, name, loss)["total"]
        np.testing.assert_allclose(np.asarray(g_xs[l]), _central_differences(f_x, xs[l]), rtol=1e-6, atol=1e-8,
                                   err_msg=f"X_{l + 1}")


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_min_over_X_is_a_lower_bound_of_the_network_loss(name):
    """min_X F(W, X) (SciPy L-BFGS-B on the numpy objective, bounds = dom F*) < network loss + regulariser."""
    params, x0, y = np_problem("softmax", seed=1)
    xs_fwd, logits = np_forward(params, x0, name)
    net = np_loss("softmax", y, logits).mean() + sum(r * (p["kernel"] ** 2).sum() for r, p in zip(RHO, params))
    shapes = [x.shape for x in xs_fwd]
    splits = np.cumsum([np.prod(s) for s in shapes])[:-1]

    def unflatten(z):
        return [part.reshape(s) for part, s in zip(np.split(z, splits), shapes)]

    def f(z):
        return np_objective(params, unflatten(z), x0, y, name, "softmax")["total"]

    z0 = np.concatenate([x.ravel() for x in xs_fwd])
    np.testing.assert_allclose(f(z0), net, rtol=1e-12)
    res = optimize.minimize(f, z0, method="L-BFGS-B", bounds=[DOMAIN[name]] * z0.size, options={"maxiter": 200})
    assert res.fun < net - 1e-2
    # the library agrees on the value at the minimiser, so it too is below the network loss
    lib = lifted_objective(*to_jax(params, unflatten(res.x), x0, y), make_penalty(name), LAMBDAS, RHO, "softmax")
    np.testing.assert_allclose(float(lib), res.fun, rtol=1e-10)
