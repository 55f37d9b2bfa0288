"""Block solvers against independent float64 numpy/SciPy references: optimality, result codes, forms agree.

Every reference objective below is written here from the formulas (B = F(u) + F*(v) − u·v, softmax
cross-entropy, ½‖y − u‖²) with a hand-written gradient and minimised by SciPy's L-BFGS-B, or solved in closed
form; nothing from the library computes an expected value. (The tests that two solver forms, or batched and
vmapped solves, take the same iterates compare the library with itself by design.)
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, special

from fenchel import blocks
from fenchel.blocks import SolverConfig
from fenchel.layers import Dense
from fenchel.penalties import ACTIVATIONS, get_penalty
from fenchel.solvers import FISTA, Composite, Result, SolveInfo, row_sums

TIGHT = SolverConfig(tol=1e-9, max_steps=20000)
DEFAULT_POWER_ITERS = SolverConfig(tol=1.0, max_steps=1).power_iters
N, N_IN, N_OUT = 9, 5, 4
SLOPE = 0.01  # the library's default leaky-relu slope (get_penalty("leaky_relu"))
W_FORMS = ("primal", "primal_mm", "kernel", "kernel_mm")


# ---------------------------------------------------------------- numpy reference
def ref_phi(act, u):
    """The activation φ = F'."""
    return {"relu": lambda: np.maximum(u, 0.0), "leaky_relu": lambda: np.where(u >= 0, u, SLOPE * u),
            "sigmoid": lambda: special.expit(u), "tanh": lambda: np.tanh(u)}[act]()


def ref_F(act, u):
    return {"relu": lambda: 0.5 * np.maximum(u, 0.0) ** 2,
            "leaky_relu": lambda: 0.5 * np.maximum(u, 0.0) ** 2 + 0.5 * SLOPE * np.minimum(u, 0.0) ** 2,
            "sigmoid": lambda: np.logaddexp(0.0, u),
            "tanh": lambda: np.logaddexp(u, -u) - np.log(2.0)}[act]()


def ref_G(act, v):
    """F*, on its domain."""
    return {"relu": lambda: 0.5 * v**2,
            "leaky_relu": lambda: 0.5 * np.maximum(v, 0.0) ** 2 + 0.5 / SLOPE * np.minimum(v, 0.0) ** 2,
            "sigmoid": lambda: special.xlogy(v, v) + special.xlogy(1 - v, 1 - v),
            "tanh": lambda: 0.5 * (special.xlogy(1 + v, 1 + v) + special.xlogy(1 - v, 1 - v))}[act]()


def ref_dG(act, v):
    """(F*)' = φ⁻¹."""
    return {"relu": lambda: v, "leaky_relu": lambda: np.where(v >= 0, v, v / SLOPE),
            "sigmoid": lambda: special.logit(v), "tanh": lambda: np.arctanh(v)}[act]()


def ref_B(act, u, v):
    return ref_F(act, u) + ref_G(act, v) - u * v


DOMAIN = {"relu": (0.0, np.inf), "leaky_relu": (-np.inf, np.inf), "sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}


def ref_loss(kind, y, u):
    """Per-sample loss and its gradient in u."""
    if kind == "softmax":
        logp = special.log_softmax(u, axis=1)
        return -np.sum(y * logp, axis=1), np.exp(logp) * np.sum(y, axis=1, keepdims=True) - y
    return 0.5 * np.sum((u - y) ** 2, axis=1), u - y


def lbfgs(fg, x0, bounds=None):
    """SciPy L-BFGS-B on a numpy (value, gradient) function: (minimiser, minimum)."""
    res = optimize.minimize(fg, np.ravel(x0), jac=True, method="L-BFGS-B", bounds=bounds,
                            options={"maxiter": 50000, "maxfun": 100000, "ftol": 1e-16, "gtol": 1e-13, "maxcor": 40})
    return res.x, res.fun


def w_objective(x, n_out, fit, rho, anchor=None, rho_prox=0.0):
    """(value, gradient) of fit(XW + 1bᵀ) + ρ‖W‖² + ρ'‖(W, b) − anchor‖² on flat (W, b); fit(U) → (value, ∂/∂U)."""
    n_in = x.shape[1]

    def fg(flat):
        w, b = flat[: n_in * n_out].reshape(n_in, n_out), flat[n_in * n_out:]
        val, g = fit(x @ w + b)
        val = val + rho * np.sum(w**2)
        gw, gb = x.T @ g + 2 * rho * w, np.sum(g, axis=0)
        if anchor is not None:
            dw, db = w - np.asarray(anchor["kernel"]), b - np.asarray(anchor["bias"])
            val = val + rho_prox * (np.sum(dw**2) + np.sum(db**2))
            gw, gb = gw + 2 * rho_prox * dw, gb + 2 * rho_prox * db
        return val, np.concatenate([gw.ravel(), gb])

    return fg


def hidden_fit(act, x_out, lam):
    """U ↦ (λ/N) Σ B(U, X_out) and its gradient (λ/N)(φ(U) − X_out)."""
    n = x_out.shape[0]
    return lambda u: (lam / n * np.sum(ref_B(act, u, x_out)), lam / n * (ref_phi(act, u) - x_out))


def out_fit(kind, y):
    """U ↦ (1/N) Σ loss(Y, U) and its gradient."""
    n = y.shape[0]

    def fit(u):
        val, g = ref_loss(kind, y, u)
        return np.mean(val), g / n

    return fit


def flat_params(p):
    return np.concatenate([np.asarray(p["kernel"]).ravel(), np.asarray(p["bias"])])


def check_w_optimal(p, fg, grad_tol=1e-8, bias_shift_free=False):
    """First-order optimality by the hand-written gradient, and agreement with L-BFGS-B (value and point).

    bias_shift_free: softmax without a proximal term is invariant under b → b + t·1 (b is not regularised), so the
    biases are compared up to that shift.
    """
    flat = flat_params(p)
    val, grad = fg(flat)
    assert np.linalg.norm(grad) <= grad_tol, np.linalg.norm(grad)
    x_ref, f_ref = lbfgs(fg, np.zeros_like(flat))
    assert abs(val - f_ref) <= 1e-9 * abs(f_ref) + 1e-12, (val, f_ref)
    if bias_shift_free:
        nb = np.asarray(p["bias"]).size
        flat, x_ref = flat.copy(), x_ref.copy()
        flat[-nb:] -= flat[-nb:].mean()
        x_ref[-nb:] -= x_ref[-nb:].mean()
    np.testing.assert_allclose(flat, x_ref, atol=1e-5)


def x_bounds(act, size):
    lo, hi = DOMAIN[act]
    eps = 1e-12 if act in ("sigmoid", "tanh") else 0.0
    return [(None if np.isinf(lo) else lo + eps, None if np.isinf(hi) else hi - eps)] * size


def check_x_optimal(act, x, fg):
    """KKT (natural residual x − clip(x − ∇f, domain)) and agreement with L-BFGS-B on the box-constrained problem."""
    x = np.asarray(x)
    lo, hi = DOMAIN[act]
    assert np.all((x >= lo) & (x <= hi))
    val, grad = fg(x.ravel())
    assert np.max(np.abs(x.ravel() - np.clip(x.ravel() - grad, lo, hi))) <= 1e-6
    x_ref, f_ref = lbfgs(fg, np.clip(x.ravel(), lo + 1e-3, hi - 1e-3), x_bounds(act, x.size))
    assert val <= f_ref + 1e-9 * abs(f_ref) + 1e-10, (val, f_ref)
    np.testing.assert_allclose(x.ravel(), x_ref, atol=1e-5)


# ---------------------------------------------------------------- jitted solves
def jitted(fn):
    """fn under one jax.jit: arrays (and dicts of arrays) are traced, every other argument (penalty, spec, λ, ρ, config,
    form) stays a Python value. One compilation per call is cheaper than dispatching the solver's setup op by op."""

    def is_data(a):
        if isinstance(a, dict):
            return all(isinstance(v, (jax.Array, np.ndarray)) for v in a.values())
        return isinstance(a, (jax.Array, np.ndarray))

    def call(*args, **kwargs):
        named = {**{f"arg{i}": a for i, a in enumerate(args)}, **{f"kw_{k}": v for k, v in kwargs.items()}}
        data = {k: v for k, v in named.items() if is_data(v)}

        def inner(data):
            return fn(*(data.get(f"arg{i}", a) for i, a in enumerate(args)),
                      **{k: data.get(f"kw_{k}", v) for k, v in kwargs.items()})

        return jax.jit(inner)(data)

    return call


solve_x_hidden, solve_x_last = jitted(blocks.solve_x_hidden), jitted(blocks.solve_x_last)
solve_w_hidden, solve_w_out = jitted(blocks.solve_w_hidden), jitted(blocks.solve_w_out)


# ---------------------------------------------------------------- data
def rand(seed, shape, scale=1.0):
    return scale * np.asarray(jax.random.normal(jax.random.PRNGKey(seed), shape))


def domain_point(act, z):
    """A point of dom F*: φ(z), strictly inside the domain."""
    return ref_phi(act, z)


def layer_of(seed, n_in, n_out, scale=0.3, bias_scale=0.1):
    return {"kernel": jnp.asarray(rand(seed, (n_in, n_out), scale)), "bias": jnp.asarray(rand(seed + 1, (n_out,),
                                                                                               bias_scale))}


def x_hidden_problem(act, seed):
    """A random hidden-X block: (layer, U_prev, X_next, start point)."""
    layer = layer_of(seed, N_IN, N_OUT, 0.6)
    u_prev = rand(seed + 2, (N, N_IN), 1.5)
    x_next = domain_point(act, rand(seed + 3, (N, N_OUT), 1.5))
    x0 = domain_point(act, rand(seed + 4, (N, N_IN)))
    return layer, u_prev, x_next, x0


# ---------------------------------------------------------------- X blocks
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_x_hidden_block(act):
    pen = get_penalty(act)
    layer, u_prev, x_next, x0 = x_hidden_problem(act, 1)
    lam_prev, lam_next = 0.8, 1.7
    x, info = solve_x_hidden(pen, x0, u_prev, Dense(N_OUT), layer, x_next, lam_prev, lam_next, TIGHT)
    assert np.all(np.asarray(info.result) == Result.CONVERGED)
    w, b = np.asarray(layer["kernel"]), np.asarray(layer["bias"])

    def fg(flat):
        z = flat.reshape(N, N_IN)
        u = z @ w + b
        val = lam_prev * np.sum(ref_B(act, u_prev, z)) + lam_next * np.sum(ref_B(act, u, x_next))
        grad = lam_prev * (ref_dG(act, z) - u_prev) + lam_next * (ref_phi(act, u) - x_next) @ w.T
        return val, grad.ravel()

    check_x_optimal(act, x, fg)


# every activation and both losses appear (each case costs a compilation)
@pytest.mark.parametrize("act, loss", [("relu", "softmax"), ("leaky_relu", "squared"), ("sigmoid", "squared"),
                                       ("tanh", "softmax")])
def test_x_last_block(act, loss):
    pen = get_penalty(act)
    layer = layer_of(11, N_IN, N_OUT, 0.6)
    u_prev = rand(13, (N, N_IN), 1.5)
    y = np.eye(N_OUT)[np.arange(N) % N_OUT] if loss == "softmax" else rand(14, (N, N_OUT))
    x0 = domain_point(act, rand(15, (N, N_IN)))
    lam_prev = 0.9
    x, info = solve_x_last(pen, x0, u_prev, Dense(N_OUT), layer, y, lam_prev, loss, TIGHT)
    assert np.all(np.asarray(info.result) == Result.CONVERGED)
    w, b = np.asarray(layer["kernel"]), np.asarray(layer["bias"])

    def fg(flat):
        z = flat.reshape(N, N_IN)
        lv, lg = ref_loss(loss, y, z @ w + b)
        val = np.sum(lv) + lam_prev * np.sum(ref_B(act, u_prev, z))
        return val, (lg @ w.T + lam_prev * (ref_dG(act, z) - u_prev)).ravel()

    check_x_optimal(act, x, fg)


# sup F'' of each penalty in u (σ' ≤ 1/4, sech² ≤ 1, relu and leaky relu: 1), by hand
CURVATURE = {"relu": 1.0, "leaky_relu": 1.0, "sigmoid": 0.25, "tanh": 1.0}


@pytest.mark.parametrize("act, step", [("sigmoid", 0.03), ("tanh", 0.1)])
def test_x_block_with_a_short_prox_step(act, step):
    """A hidden-X block whose prox step s = λ_prev/L is short (λ_prev ≪ λ_next‖W‖², as deep in a network), with a
    minimiser known by construction: one feature per sample, W = w, and U_prev chosen so that the first-order condition
    λ_prev((F*)'(x*) − u_prev) + λ_next w (φ(w x* + b) − v) = 0 holds at given points x* spread over the domain; the
    block is strictly convex ((F*)'' > 0), so x* is its solution. The solver must reach it from any start."""
    pen = get_penalty(act)
    lo, hi = DOMAIN[act]
    n, w, b, lam_next = 400, 1.3, 0.2, 2.0
    x_star = lo + (hi - lo) * np.linspace(0.02, 0.98, n)
    v = domain_point(act, rand(101, (n,), 1.5))
    lam_prev = step * 1.05 * lam_next * CURVATURE[act] * w**2  # s = λ_prev/L with the solver's L (margin 1.05)
    u_prev = ref_dG(act, x_star) + lam_next / lam_prev * w * (ref_phi(act, w * x_star + b) - v)
    x0 = domain_point(act, rand(102, (n, 1)))
    layer = {"kernel": np.full((1, 1), w), "bias": np.full((1,), b)}
    cfg = SolverConfig(tol=1e-9, max_steps=2000)  # ~30 steps suffice with an exact prox
    x, info = solve_x_hidden(pen, x0, u_prev[:, None], Dense(1), layer, v[:, None], lam_prev, lam_next, cfg)
    not_converged = np.flatnonzero(np.asarray(info.result) != Result.CONVERGED)
    assert not_converged.size == 0, (not_converged.size, x_star[not_converged[:5]])
    np.testing.assert_allclose(np.asarray(x)[:, 0], x_star, atol=1e-8)


@pytest.mark.parametrize("act", ["sigmoid"])  # a root-finding prox: per-row iteration counts differ most
def test_vmapped_and_batched_x_solves_agree(act):
    pen = get_penalty(act)
    layer, u_prev, x_next, x0 = x_hidden_problem(act, 41)
    cfg = SolverConfig(tol=1e-8, max_steps=300)
    xb, ib = solve_x_hidden(pen, x0, u_prev, Dense(N_OUT), layer, x_next, 0.8, 1.7, cfg, mode="batched")
    xv, iv = solve_x_hidden(pen, x0, u_prev, Dense(N_OUT), layer, x_next, 0.8, 1.7, cfg, mode="vmap")
    np.testing.assert_allclose(xb, xv, atol=1e-10)
    np.testing.assert_array_equal(ib.result, iv.result)


def test_x_blocks_solved_in_row_chunks_take_the_unchunked_iterates():
    """chunk_bytes splits the rows into chunks solved one after another (9 rows of 5 float64 = 40 bytes: 80 bytes
    is 4 chunks of 2 and a remainder of 1; 40 is 9 chunks of 1). Each row is its own problem (per-row momentum,
    restart and stopping), so every per-row result must be the one of the solve over all rows: a chunk paired
    with another chunk's U_prev, a lost or reordered remainder row, or a chunk's rows stopped by another's test
    would show. Sigmoid's root-finding prox makes the rows stop after different numbers of iterations."""
    pen = get_penalty("sigmoid")
    layer, u_prev, x_next, x0 = x_hidden_problem("sigmoid", 41)
    cfg = SolverConfig(tol=1e-8, max_steps=300)
    whole = solve_x_hidden(pen, x0, u_prev, Dense(N_OUT), layer, x_next, 0.8, 1.7, cfg)
    assert len(set(np.asarray(whole[1].residual).round(12))) > 1
    for chunk_bytes in (80, 40):
        chunked = solve_x_hidden(pen, x0, u_prev, Dense(N_OUT), layer, x_next, 0.8, 1.7,
                                 SolverConfig(tol=1e-8, max_steps=300, chunk_bytes=chunk_bytes))
        for got, want in zip(jax.tree_util.tree_leaves(chunked), jax.tree_util.tree_leaves(whole)):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_x_last_block_solved_in_row_chunks_is_optimal():
    """The output-side X block in chunks of 2 rows (and a remainder): first-order optimality and agreement with
    L-BFGS-B on the whole block (numpy reference), and every row converged."""
    act, loss = "relu", "softmax"
    layer = layer_of(11, N_IN, N_OUT, 0.6)
    u_prev = rand(13, (N, N_IN), 1.5)
    y = np.eye(N_OUT)[np.arange(N) % N_OUT]
    x0 = domain_point(act, rand(15, (N, N_IN)))
    cfg = SolverConfig(tol=1e-9, max_steps=20000, chunk_bytes=2 * N_IN * 8)
    x, info = solve_x_last(get_penalty(act), x0, u_prev, Dense(N_OUT), layer, y, 0.9, loss, cfg)
    assert np.asarray(info.result).shape == (N,) and np.all(np.asarray(info.result) == Result.CONVERGED)
    w, b = np.asarray(layer["kernel"]), np.asarray(layer["bias"])

    def fg(flat):
        z = flat.reshape(N, N_IN)
        lv, lg = ref_loss(loss, y, z @ w + b)
        return np.sum(lv) + 0.9 * np.sum(ref_B(act, u_prev, z)), (lg @ w.T + 0.9 * (ref_dG(act, z) - u_prev)).ravel()

    check_x_optimal(act, x, fg)


# ---------------------------------------------------------------- W blocks
# every form (ReLU in kernel_mm: further down) and every activation in the default form (kernel_mm, whose majoriser
# relies on each penalty's curvature bound); the forms are generic over the fit term and agree iterate by iterate
W_HIDDEN_CASES = [("relu", "primal"), ("relu", "kernel"), ("leaky_relu", "kernel_mm"), ("sigmoid", "kernel_mm"),
                  ("tanh", "kernel_mm")]
assert {a for a, _ in W_HIDDEN_CASES} == set(ACTIVATIONS)


@pytest.mark.parametrize("act, w_mode", W_HIDDEN_CASES)
def test_w_hidden_block(act, w_mode):
    pen = get_penalty(act)
    x_in = rand(21, (N, N_IN))
    x_out = domain_point(act, rand(22, (N, N_OUT), 1.5))
    layer = {"kernel": jnp.asarray(rand(23, (N_IN, N_OUT), 0.3)), "bias": jnp.zeros(N_OUT)}
    anchor = layer_of(24, N_IN, N_OUT)
    lam, rho, rho_prox = 1.3, 1e-2, 0.2
    p, info = solve_w_hidden(pen, Dense(N_OUT), layer, x_in, x_out, lam, rho, TIGHT, anchor, rho_prox, w_mode=w_mode)
    assert int(info.result) == Result.CONVERGED
    fg = w_objective(x_in, N_OUT, hidden_fit(act, x_out, lam), rho, anchor, rho_prox)
    check_w_optimal(p, fg)
    assert float(info.value) == pytest.approx(fg(flat_params(p))[0] - lam / N * np.sum(ref_G(act, x_out)), rel=1e-9)


W_OUT_CASES = ([(loss, form, True) for loss in ("softmax", "squared") for form in W_FORMS]
               + [("softmax", "kernel_mm", False)])


@pytest.mark.parametrize("loss, w_mode, anchored", W_OUT_CASES)
def test_w_out_block(loss, w_mode, anchored):
    """Minibatch (anchor and ρ', as every minibatch update has): every form, both losses. Full batch (no proximal
    term; the primal and kernel forms without anchor are tested on a centred batch below) on the softmax loss, whose
    optimum is unique only up to a shift of the bias."""
    x_in = np.maximum(rand(31, (N, N_IN)), 0.0)
    y = np.eye(N_OUT)[np.arange(N) % N_OUT] if loss == "softmax" else rand(32, (N, N_OUT))
    layer = {"kernel": jnp.asarray(rand(33, (N_IN, N_OUT), 0.3)), "bias": jnp.zeros(N_OUT)}
    anchor, rho_prox = (layer_of(34, N_IN, N_OUT, 0.5, 0.3), 0.15) if anchored else (None, 0.0)
    rho = 1e-2
    p, info = solve_w_out(Dense(N_OUT), layer, x_in, y, rho, loss, TIGHT, anchor, rho_prox, w_mode=w_mode)
    assert int(info.result) == Result.CONVERGED
    fg = w_objective(x_in, N_OUT, out_fit(loss, y), rho, anchor, rho_prox)
    check_w_optimal(p, fg, bias_shift_free=loss == "softmax" and not anchored)
    assert float(info.value) == pytest.approx(fg(flat_params(p))[0], rel=1e-9)


def test_row_sums_and_their_derivatives_are_those_of_the_plain_sum():
    """`solvers.row_sums` sums each row as a product with ones; its value, gradient (every entry of row i gets
    the cotangent w_i), forward derivative and vmapped value must be those of the sum (numpy)."""
    a, t, w = rand(301, (4, 3, 5)), rand(302, (4, 3, 5)), rand(303, (4,))
    np.testing.assert_allclose(row_sums(jnp.asarray(a)), a.reshape(4, -1).sum(axis=1), rtol=1e-13)
    grad = jax.grad(lambda v: jnp.sum(jnp.asarray(w) * row_sums(v)))(jnp.asarray(a))
    np.testing.assert_allclose(grad, np.broadcast_to(w[:, None, None], a.shape), rtol=1e-13)
    _, tangent = jax.jvp(row_sums, (jnp.asarray(a),), (jnp.asarray(t),))
    np.testing.assert_allclose(tangent, t.reshape(4, -1).sum(axis=1), rtol=1e-13)
    np.testing.assert_allclose(jax.vmap(row_sums)(jnp.asarray(a)), a.sum(axis=2), rtol=1e-13)


@pytest.mark.parametrize("anchor_is_start", [False, True])
def test_kernel_representation_inner_products_and_objective_are_those_of_the_explicit_weights(anchor_is_start):
    """The kernel forms hold W = a·W_0 + c·W_a + Xᵀβ with Kβ carried alongside. Their inner products, the
    objective and its closed-form value at the start must equal the same quantities of the explicit weights
    (numpy, float64), for two different points p ≠ q: a swapped cross term (a_p⟨XW_0, β_p⟩ for a_p⟨XW_0, β_q⟩)
    or a dropped anchor term changes them."""
    pen = get_penalty("relu")
    n, n_in, rho, rho_prox, lam = 6, 8, 0.03, 0.2, 1.7
    x_in, x_out = rand(91, (n, n_in)), np.abs(rand(92, (n, N_OUT)))
    layer = layer_of(93, n_in, N_OUT)
    anchor = layer if anchor_is_start else layer_of(95, n_in, N_OUT, 0.5, 0.4)

    def fit(u):
        return jnp.sum(lam * pen.smooth_u(u, jnp.asarray(x_out))) / n

    block = blocks.WBlock(Dense(N_OUT), fit, lam / n * pen.curvature_u, layer, jnp.asarray(x_in), rho, anchor,
                          rho_prox, anchor_is_start)
    rep = blocks._KernelRep(block)

    def point(seed):
        beta = rand(seed, (n, N_OUT))
        return {"a": jnp.asarray(rand(seed + 1, ())), "c": jnp.asarray(rand(seed + 2, ())), "beta": jnp.asarray(beta),
                "kbeta": jnp.asarray(x_in @ x_in.T @ beta), "b": jnp.asarray(rand(seed + 3, (N_OUT,)))}

    def explicit(p):
        w = (float(p["a"]) * np.asarray(layer["kernel"]) + float(p["c"]) * np.asarray(anchor["kernel"])
             + x_in.T @ np.asarray(p["beta"]))
        return w, np.asarray(p["b"])

    p, q = point(100), point(200)
    (wp, bp), (wq, bq) = explicit(p), explicit(q)
    np.testing.assert_allclose(rep.w_inner(p, q), np.sum(wp * wq), rtol=1e-12)
    np.testing.assert_allclose(rep.inner(p, q), np.sum(wp * wq) + bp @ bq, rtol=1e-12)
    np.testing.assert_allclose(rep.inner(p, p), np.sum(wp * wp) + bp @ bp, rtol=1e-12)
    np.testing.assert_allclose(rep.preactivation(p), x_in @ wp + bp, rtol=1e-12)

    def ref_objective(w, b):
        u = x_in @ w + b
        b_term = lam * np.sum(0.5 * np.maximum(u, 0.0) ** 2 - u * x_out) / n  # B up to terms free of W
        return (b_term + rho * np.sum(w * w) + rho_prox * (np.sum((w - np.asarray(anchor["kernel"])) ** 2)
                                                            + np.sum((b - np.asarray(anchor["bias"])) ** 2)))

    np.testing.assert_allclose(rep.objective(block, p), ref_objective(wp, bp), rtol=1e-12)
    start = rep.start()
    w0, b0 = np.asarray(layer["kernel"]), np.asarray(layer["bias"])
    np.testing.assert_allclose(rep.start_objective(block), ref_objective(w0, b0), rtol=1e-12)
    np.testing.assert_allclose(rep.objective(block, start), ref_objective(w0, b0), rtol=1e-12)


def test_w_hidden_block_with_zero_lambda_is_the_closed_form():
    """λ = 0 (LiftedConfig(lambdas=0.0, rho_prox=0.1)): min ρ‖W‖² + ρ'‖(W, b) − anchor‖² has the minimiser
    W = ρ'/(ρ + ρ')·W_a, b = b_a (set the gradient 2ρW + 2ρ'(W − W_a), 2ρ'(b − b_a) to zero). The MM form's
    majoriser curvature is λ/N·c_u = 0 here; it once divided by it (ZeroDivisionError). "auto" is the form a
    minibatch update uses; here it resolves to kernel_mm."""
    pen = get_penalty("relu")
    n, n_in = 4, 7  # N ≤ n_in: "auto" takes the kernel_mm form
    x_in, x_out = rand(81, (n, n_in)), np.abs(rand(82, (n, N_OUT)))
    layer, anchor = layer_of(83, n_in, N_OUT), layer_of(85, n_in, N_OUT, 0.5, 0.4)
    rho, rho_prox = 1e-2, 0.1
    assert Dense(N_OUT).w_form("auto", x_in, 2 * (rho + rho_prox)) == "kernel_mm"
    p, info = solve_w_hidden(pen, Dense(N_OUT), layer, x_in, x_out, 0.0, rho, SolverConfig(tol=1e-12, max_steps=5000),
                             anchor, rho_prox, w_mode="auto")
    assert int(info.result) == Result.CONVERGED
    np.testing.assert_allclose(p["kernel"], rho_prox / (rho + rho_prox) * np.asarray(anchor["kernel"]), atol=1e-10)
    np.testing.assert_allclose(p["bias"], anchor["bias"], atol=1e-10)


# ---------------------------------------------------------------- operator norms, centred batches
def with_spectrum(seed, n, m, singular_values, first_left=None):
    """U diag(s) Vᵀ (n × m) with random orthonormal U, V; U's first column is `first_left` (normalised) if given,
    else every column of U and V is orthogonal to the all-ones vector (then X1 = 0 and Xᵀ1 = 0)."""
    rng = np.random.default_rng(seed)
    k = len(singular_values)

    def basis(size, first):
        q, _ = np.linalg.qr(np.column_stack([first, rng.normal(size=(size, k))]))
        return q

    if first_left is None:
        u, v = basis(n, np.ones(n))[:, 1:], basis(m, np.ones(m))[:, 1:]
    else:
        u, v = basis(n, first_left)[:, :k], basis(m, rng.normal(size=m))[:, :k]
    return u @ np.diag(singular_values) @ v.T


def centred_batch(seed, n, m):
    """X with zero column and row sums (K1 = 0: 1 is an eigenvector of K + 11ᵀ, eigenvalue N) and λ_max(K) = 3N.

    Power iteration from all-ones stays on the eigenvalue N (rounding only grows by 3²⁰ in 20 iterations)."""
    return with_spectrum(seed, n, m, [np.sqrt(3.0 * n), 1.5, 1.2, 0.9, 0.6, 0.3])


def test_operator_norms_match_eigvalsh():
    """Power iteration from an all-ones start fails on centred data: with X1 = 0 and Xᵀ1 = 0, (1, 1) is mapped onto
    (0, N), an eigenvector of [X 1]ᵀ[X 1] of eigenvalue N = λ_max/3; a kernel W with WWᵀ1 = (λ_max/3)·1 traps it the
    same way. Both estimates must be ≥ 0.99 λ_max (numpy's eigvalsh) with the default iterations, never above."""
    n = 12
    x = centred_batch(91, n, 30)
    assert np.abs(x.sum(axis=0)).max() < 1e-12 and np.abs(x.sum(axis=1)).max() < 1e-12
    z = np.hstack([x, np.ones((n, 1))])
    true = np.linalg.eigvalsh(z.T @ z)[-1]
    assert true == pytest.approx(3 * n)
    est = float(jitted(blocks.weight_operator_norm_sq)(Dense(N_OUT), x, np.zeros((30, N_OUT)), DEFAULT_POWER_ITERS))
    assert 0.99 * true <= est <= 1.0001 * true, (est, true)

    # a kernel with both sides > EXACT_GRAM_MAX (so power iteration runs); 1 is a left singular vector of W
    w = with_spectrum(92, 130, 140, [2.0, np.sqrt(3.0) * 2.0, 1.0, 0.7, 0.5], first_left=np.ones(130))
    assert min(w.shape) > blocks.EXACT_GRAM_MAX
    true = np.linalg.eigvalsh(w @ w.T)[-1]
    assert true == pytest.approx(12.0) and np.allclose(w @ (w.T @ np.ones(130)), 4.0 * np.ones(130))
    est = float(jitted(blocks.input_operator_norm_sq)(Dense(140), w, (130,), DEFAULT_POWER_ITERS))
    assert 0.99 * true <= est <= 1.0001 * true, (est, true)

    # a small dense kernel: λ_max of its Gram matrix, exactly
    w = rand(93, (N_IN, N_OUT))
    est = float(jitted(blocks.input_operator_norm_sq)(Dense(N_OUT), w, (N_IN,), DEFAULT_POWER_ITERS))
    assert est == pytest.approx(np.linalg.eigvalsh(w.T @ w)[-1], rel=1e-12)


@pytest.mark.parametrize("w_mode", ["primal", "kernel"])  # the forms that estimate a Lipschitz constant
def test_w_block_on_a_centred_batch(w_mode):
    """A centred batch (K1 = 0) with λ_max(K + 11ᵀ) = 3N: a Lipschitz constant from the eigenvalue N of the all-ones
    vector gives steps ~3× too long (divergent on the squared loss, whose curvature is exactly (1/N)[X 1]ᵀ[X 1]).
    Full batch (no anchor); the solve must converge to SciPy's optimum."""
    n, n_in = 12, 30
    x_in = centred_batch(94, n, n_in)
    assert np.linalg.eigvalsh(x_in @ x_in.T + 1.0)[-1] == pytest.approx(3 * n)
    y = rand(95, (n, N_OUT))
    layer = layer_of(96, n_in, N_OUT)
    rho = 1e-2
    p, info = solve_w_out(Dense(N_OUT), layer, x_in, y, rho, "squared", TIGHT, w_mode=w_mode)
    assert int(info.result) == Result.CONVERGED
    check_w_optimal(p, w_objective(x_in, N_OUT, out_fit("squared", y), rho))


# ---------------------------------------------------------------- the forms agree
def kernel_form_problem():
    """A ReLU W block with N < n_in (where the kernel forms are used)."""
    x_in = jnp.asarray(rand(51, (N, 3 * N)))
    x_out = jnp.asarray(np.maximum(rand(52, (N, N_OUT)), 0.0))
    layer = {"kernel": jnp.asarray(rand(53, (3 * N, N_OUT), 0.3)), "bias": jnp.asarray(rand(57, (N_OUT,), 0.1))}
    return x_in, x_out, layer


@pytest.mark.parametrize("anchor_is_start", [False, True])
def test_primal_and_kernel_w_solves_take_identical_iterates(anchor_is_start):
    """W = a·W_0 + c·W_a + Xᵀβ reproduces the primal FISTA iterates exactly, also when the anchor is the start point
    (the first round of a minibatch: anchor is the same dict as the layer, anchor_is_start=True)."""
    pen = get_penalty("relu")
    x_in, x_out, layer = kernel_form_problem()
    anchor = layer if anchor_is_start else layer_of(54, 3 * N, N_OUT)
    # stop early to compare iterates, not optima; exact λ_max so both use the same step
    cfg = SolverConfig(tol=1e-12, max_steps=7, power_iters=3000)
    kw = dict(anchor=anchor, rho_prox=0.3, anchor_is_start=anchor_is_start)
    a, ia = solve_w_hidden(pen, Dense(N_OUT), layer, x_in, x_out, 1.0, 1e-2, cfg, w_mode="primal", **kw)
    b, ib = solve_w_hidden(pen, Dense(N_OUT), layer, x_in, x_out, 1.0, 1e-2, cfg, w_mode="kernel", **kw)
    assert int(ia.steps) == int(ib.steps) == 7
    np.testing.assert_allclose(a["kernel"], b["kernel"], atol=1e-12)
    np.testing.assert_allclose(a["bias"], b["bias"], atol=1e-12)
    # the objective and residual the kernel form reports are those of the true variable
    assert float(ib.value) == pytest.approx(float(ia.value), rel=1e-12)
    assert float(ib.residual) == pytest.approx(float(ia.residual), rel=1e-8)
    fg = w_objective(np.asarray(x_in), N_OUT, hidden_fit("relu", np.asarray(x_out), 1.0), 1e-2, anchor, 0.3)
    g_const = np.sum(ref_G("relu", np.asarray(x_out))) / N  # the solvers drop the constant G(X_out) term
    assert float(ia.value) == pytest.approx(fg(flat_params(a))[0] - g_const, rel=1e-10)
    assert float(ia.value) < fg(flat_params(layer))[0] - g_const - 1e-3  # and it moved


@pytest.mark.parametrize("w_mode", ["kernel", "kernel_mm"])
def test_anchor_is_start_shortcut_changes_nothing(w_mode):
    """anchor_is_start=True (anchor is the layer dict) and False (anchor a copy of the same values) must agree.

    With W_a = W_0 the shortcut sets ⟨W_0, W_a⟩ = ‖W_0‖². Dropping that cross term in the shortcut gives
    ⟨W, W⟩ = (a² + c²)‖W_0‖² instead of (a + c)²‖W_0‖² for W = a·W_0 + c·W_a + Xᵀβ, so the True run's inner
    products (restart tests, residual) and objective go wrong (e.g. ρ'‖W − W_a‖² reads 2ρ'‖W_0‖² instead of 0 at
    the start) and the kernel form's iterates and reported value leave the False run's; dropping it in the general
    branch breaks the False run instead. (In kernel_mm the first preconditioned step sets a = 0 exactly, so the term
    only enters the start value and the first residual: there the kernel form is the one that shows it.)"""
    pen = get_penalty("relu")
    x_in, x_out, layer = kernel_form_problem()
    copy = {k: jnp.array(v, copy=True) for k, v in layer.items()}
    cfg = SolverConfig(tol=1e-12, max_steps=7)  # a few steps: compare iterates, not optima
    (p, i), (q, j) = [solve_w_hidden(pen, Dense(N_OUT), layer, x_in, x_out, 1.0, 1e-2, cfg, anchor, 0.3,
                                     w_mode=w_mode, anchor_is_start=flag)
                      for anchor, flag in ((layer, True), (copy, False))]
    np.testing.assert_allclose(p["kernel"], q["kernel"], atol=1e-12)
    np.testing.assert_allclose(p["bias"], q["bias"], atol=1e-12)
    assert int(i.steps) == int(j.steps) == 7
    assert float(i.residual) == pytest.approx(float(j.residual), rel=1e-8)
    # the reported value is the objective (numpy) at the returned point, less the constant (λ/N) Σ G(X_out)
    fg = w_objective(np.asarray(x_in), N_OUT, hidden_fit("relu", np.asarray(x_out), 1.0), 1e-2, layer, 0.3)
    g_const = np.sum(ref_G("relu", np.asarray(x_out))) / N
    for point, info in ((p, i), (q, j)):
        assert float(info.value) == pytest.approx(fg(flat_params(point))[0] - g_const, rel=1e-12)
    assert float(i.value) < fg(flat_params(layer))[0] - g_const - 1e-3  # and it moved


def test_mm_preconditioning_needs_far_fewer_iterations():
    """On a ReLU W block with N < n_in the MM form needs well under half of FISTA's iterations."""
    pen = get_penalty("relu")
    x_in = jnp.asarray(np.maximum(rand(61, (12, 40)), 0.0))
    x_out = jnp.asarray(np.maximum(rand(62, (12, N_OUT)), 0.0))
    layer = {"kernel": jnp.asarray(rand(63, (40, N_OUT), 0.2)), "bias": jnp.zeros(N_OUT)}
    cfg = SolverConfig(tol=1e-9, max_steps=20000)
    kw = dict(anchor=layer, rho_prox=0.05, anchor_is_start=True)
    _, plain = solve_w_hidden(pen, Dense(N_OUT), layer, x_in, x_out, 1.0, 1e-3, cfg, w_mode="kernel", **kw)
    _, mm = solve_w_hidden(pen, Dense(N_OUT), layer, x_in, x_out, 1.0, 1e-3, cfg, w_mode="kernel_mm", **kw)
    assert int(plain.result) == int(mm.result) == Result.CONVERGED
    assert abs(float(plain.value) - float(mm.value)) <= 1e-9 * abs(float(plain.value)) + 1e-12
    assert int(mm.steps) * 2 < int(plain.steps), (int(mm.steps), int(plain.steps))


def test_auto_form_for_more_samples_than_inputs_is_the_preconditioned_primal():
    """N > n_in (a full-batch W block): "auto" takes primal_mm, which reaches the plain primal FISTA's optimum in
    well under half its iterations, and whose 3-iteration solve (a sweep's budget) is far closer to it. (An
    unpreconditioned "auto" once took 30 full-batch sweeps to reach what 3 preconditioned ones reach.)"""
    pen = get_penalty("relu")
    rng = np.random.default_rng(64)
    x_in = jnp.asarray(np.maximum(rng.normal(size=(60, 8)) * rng.uniform(0.1, 3.0, 8), 0.0))  # unequal scales
    x_out = jnp.asarray(np.maximum(rand(65, (60, N_OUT)), 0.0))
    layer = {"kernel": jnp.asarray(rand(66, (8, N_OUT), 0.2)), "bias": jnp.zeros(N_OUT)}
    assert Dense(N_OUT).w_form("auto", x_in, 2e-3) == "primal_mm"
    tight = SolverConfig(tol=1e-10, max_steps=20000)
    _, plain = solve_w_hidden(pen, Dense(N_OUT), layer, x_in, x_out, 1.0, 1e-3, tight, w_mode="primal")
    _, mm = solve_w_hidden(pen, Dense(N_OUT), layer, x_in, x_out, 1.0, 1e-3, tight, w_mode="auto")
    assert int(plain.result) == int(mm.result) == Result.CONVERGED
    optimum = float(plain.value)
    assert abs(float(mm.value) - optimum) <= 1e-9 * abs(optimum) + 1e-12
    assert int(mm.steps) * 2 < int(plain.steps), (int(mm.steps), int(plain.steps))
    three = SolverConfig(tol=1e-10, max_steps=3)
    gap_plain, gap_mm = (float(solve_w_hidden(pen, Dense(N_OUT), layer, x_in, x_out, 1.0, 1e-3, three,
                                              w_mode=mode)[1].value) - optimum for mode in ("primal", "auto"))
    assert gap_mm < 0.2 * gap_plain, (gap_mm, gap_plain)


def test_w_mode_errors():
    assert set(blocks.W_SOLVERS) == set(W_FORMS)
    pen = get_penalty("relu")
    layer = layer_of(71, N_IN, N_OUT)
    x_in, x_out = jnp.asarray(rand(72, (N, N_IN))), jnp.ones((N, N_OUT))
    with pytest.raises(ValueError, match="unknown w_mode"):
        blocks.solve_w_hidden(pen, Dense(N_OUT), layer, x_in, x_out, 1.0, 0.0, TIGHT, w_mode="newton")
    with pytest.raises(ValueError, match="needs ρ"):
        blocks.solve_w_hidden(pen, Dense(N_OUT), layer, x_in, x_out, 1.0, 0.0, TIGHT, w_mode="kernel_mm")


# ---------------------------------------------------------------- the solver
def test_result_codes():
    quad = Composite(smooth=lambda x: 0.5 * jnp.sum(x**2 * jnp.arange(1.0, 4.0)), prox=lambda z, s: z,
                     nonsmooth=lambda x: 0.0)
    x0 = jnp.ones(3)
    x, info = FISTA(tol=1e-8, max_steps=1000).run(quad, x0, 3.0)
    assert int(info.result) == Result.CONVERGED and float(info.residual) <= 1e-8
    np.testing.assert_allclose(x, 0.0, atol=1e-8)
    _, info = FISTA(tol=1e-12, max_steps=3).run(quad, x0, 3.0)
    assert int(info.result) == Result.MAX_STEPS and int(info.steps) == 3
    # the first step leaves the domain of sqrt(x − ½): the next gradient is NaN
    bad = Composite(smooth=lambda x: jnp.sum(x**2 + jnp.sqrt(x - 0.5)), prox=lambda z, s: z,
                    nonsmooth=lambda x: 0.0)
    x, info = FISTA(tol=1e-8, max_steps=100).run(bad, jnp.ones(3), 1.0)
    assert int(info.result) == Result.NONFINITE and int(info.steps) < 100
    np.testing.assert_array_equal(x, jnp.ones(3))  # the start point is kept


def test_warm_prox_data_is_carried_per_row_and_held_once_a_row_has_converged():
    """`Composite.prox_warm`: the solver passes each call the data the previous call returned, and freezes a row's
    data with its iterate. Rows x_r → c_r with curvatures 1, 4, 9 converge after different numbers of steps; a prox
    that counts its calls per row must end, for each row, at the number of updates it took part in, read off the
    done flags (a carry not held at convergence would count every update for every row). The iterates are those of
    the same prox without the carry."""
    a, c = jnp.array([1.0, 4.0, 9.0]), jnp.array([0.5, -1.0, 2.0])
    plain = Composite(smooth=lambda x: 0.5 * a * (x[:, 0] - c) ** 2, prox=lambda z, s: z,
                      nonsmooth=lambda x: jnp.zeros(3))
    counting = plain._replace(prox_warm=lambda z, s, w: (z, w + 1), warm_start=lambda x: jnp.zeros(3, jnp.int32))
    solver = FISTA(tol=1e-6, max_steps=400, row_separable=True, restart=False)
    x0 = jnp.zeros((3, 1))
    state, state_plain, was_done = solver.init(counting, x0, 9.0), solver.init(plain, x0, 9.0), []
    for _ in range(400):
        was_done.append(np.asarray(state.done))
        state, state_plain = solver.update(counting, state, 9.0), solver.update(plain, state_plain, 9.0)
    active_updates = (~np.array(was_done)).sum(axis=0)
    assert len(set(active_updates.tolist())) == 3 and active_updates.max() < 400  # rows stop at different steps
    np.testing.assert_array_equal(np.asarray(state.warm), active_updates)
    np.testing.assert_array_equal(np.asarray(state.x), np.asarray(state_plain.x))
    with pytest.raises(ValueError, match="prox_warm"):
        solver.init(plain._replace(prox_warm=counting.prox_warm), x0, 9.0)


def _equations(jaxpr):
    """Every equation of a jaxpr, those of its sub-jaxprs (loop bodies, branches) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


@pytest.mark.parametrize("act", ["sigmoid", "tanh"])
def test_x_block_iterations_carry_the_prox_root_instead_of_taking_a_log(act):
    """The sigmoid and tanh X blocks' FISTA loop carries each element's root t (v = φ(t)) to the next prox call.
    Recovering it from the iterate, φ⁻¹(v), is a log per element and call: the most expensive elementwise pass of
    the iteration on XLA:CPU. The compiled loop body (nested root loop included) must contain no log."""
    pen = get_penalty(act)
    layer, u_prev, x_next, x0 = x_hidden_problem(act, 1)
    jaxpr = jax.make_jaxpr(lambda x: blocks.solve_x_hidden(pen, x, u_prev, Dense(N_OUT), layer, x_next, 0.8, 1.7,
                                                           TIGHT))(x0)

    def array_ops(jxpr):  # primitives applied to arrays (not to constants such as log 2 in log cosh)
        return {e.primitive.name for e in _equations(jxpr) if any(getattr(v.aval, "shape", ()) for v in e.outvars)}

    def holds_a_loop(eqn):  # the FISTA loop holds the root finder's loop
        return "while" in {q.primitive.name for q in _equations(eqn.params["body_jaxpr"].jaxpr)}

    loops = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "while" and holds_a_loop(e)]
    assert loops, "no FISTA loop found"
    for loop in loops:
        body = array_ops(loop.params["body_jaxpr"].jaxpr)
        assert "tanh" in body and "log" not in body, sorted(body)
    assert "log" in array_ops(jaxpr.jaxpr)  # the start point's φ⁻¹ and the final objective are outside the loop


def test_solver_rejects_bad_settings():
    with pytest.raises(ValueError, match="tol"):
        FISTA(tol=0.0)
    with pytest.raises(ValueError, match="max_steps"):
        SolverConfig(tol=1e-5, max_steps=0)
    with pytest.raises(ValueError, match="tol"):
        SolverConfig(tol=0.0, max_steps=10)
    with pytest.raises(ValueError, match="power_iters"):
        SolverConfig(tol=1e-5, max_steps=10, power_iters=0)
    with pytest.raises(ValueError, match="chunk_bytes"):
        SolverConfig(tol=1e-5, max_steps=10, chunk_bytes=-1)
    with pytest.raises(TypeError):
        SolverConfig()  # tol and max_steps have no defaults: LiftedConfig owns them



# ---------------------------------------------------------------- multi-branch output blocks (fenchel.heads)
K_BRANCHES = 3
GUIDE_SELECTION = np.array([2, 0, 2, 1])  # s_c: the branch guiding class c (N_OUT = 4 classes)


def ref_merge(merge):
    """M ∈ R^{KC×C} from its definition: logit c of the merged head is Σ_k U_{k,c} (sum), (1/K)Σ_k U_{k,c} (mean),
    U_{s_c,c} (guide), where U_{k,c} is column k·C + c of the stacked K·C-column layer."""
    m = np.zeros((K_BRANCHES * N_OUT, N_OUT))
    for c in range(N_OUT):
        for k in range(K_BRANCHES):
            m[k * N_OUT + c, c] = {"sum": 1.0, "mean": 1.0 / K_BRANCHES,
                                   "guide": float(k == GUIDE_SELECTION[c])}[merge]
    return m


def merged_fit(y, m):
    """U ↦ (1/N) Σ CE(Y, U M) and its gradient (1/N)(softmax(UM) − Y) Mᵀ."""
    n = y.shape[0]

    def fit(u):
        val, g = ref_loss("softmax", y, u @ m)
        return np.mean(val), g @ m.T / n

    return fit


def library_merge(merge):
    from fenchel.heads import merge_matrix
    return merge_matrix(merge, K_BRANCHES, N_OUT, jnp.asarray(GUIDE_SELECTION), jnp.float64)


@pytest.mark.parametrize("merge, w_mode", [("sum", "kernel_mm"), ("mean", "primal"), ("guide", "kernel_mm"),
                                           ("guide", "primal_mm")])
def test_w_out_block_of_a_merged_head(merge, w_mode):
    """The stacked K·C-column output layer under the merged softmax loss, with anchor and ρ' (a minibatch
    update's block): optimal by the hand-written gradient and equal to L-BFGS-B's minimiser. For guide, a column
    no class selects sees only ρ‖W‖² + ρ'‖(W, b) − anchor‖²: W = ρ'/(ρ + ρ')·W_a, b = b_a."""
    kc = K_BRANCHES * N_OUT
    x_in = np.maximum(rand(131, (N, N_IN)), 0.0)
    y = np.eye(N_OUT)[np.arange(N) % N_OUT]
    layer = {"kernel": jnp.asarray(rand(133, (N_IN, kc), 0.3)), "bias": jnp.zeros(kc)}
    anchor, rho_prox, rho = layer_of(134, N_IN, kc, 0.5, 0.3), 0.15, 1e-2
    p, info = solve_w_out(Dense(kc), layer, x_in, y, rho, "softmax", TIGHT, anchor, rho_prox, w_mode=w_mode,
                          merge=library_merge(merge))
    assert int(info.result) == Result.CONVERGED
    m = ref_merge(merge)
    check_w_optimal(p, w_objective(x_in, kc, merged_fit(y, m), rho, anchor, rho_prox))
    if merge == "guide":
        free = np.flatnonzero(m.sum(axis=1) == 0)
        assert free.size == kc - N_OUT
        np.testing.assert_allclose(np.asarray(p["kernel"])[:, free],
                                   rho_prox / (rho + rho_prox) * np.asarray(anchor["kernel"])[:, free], atol=1e-9)
        np.testing.assert_allclose(np.asarray(p["bias"])[free], np.asarray(anchor["bias"])[free], atol=1e-9)


@pytest.mark.parametrize("merge", ["sum", "guide"])
def test_x_last_block_of_a_merged_head(merge):
    """min_X Σ CE(Y, (X W + b) M) + λ Σ B(U_prev, X) for the stacked layer (W, b): KKT and L-BFGS-B."""
    act, kc = "relu", K_BRANCHES * N_OUT
    pen = get_penalty(act)
    layer = layer_of(141, N_IN, kc, 0.6)
    u_prev = rand(143, (N, N_IN), 1.5)
    y = np.eye(N_OUT)[np.arange(N) % N_OUT]
    x0 = domain_point(act, rand(145, (N, N_IN)))
    lam_prev = 0.9
    x, info = solve_x_last(pen, x0, u_prev, Dense(kc), layer, y, lam_prev, "softmax", TIGHT,
                           merge=library_merge(merge))
    assert np.all(np.asarray(info.result) == Result.CONVERGED)
    m = ref_merge(merge)
    w, b = np.asarray(layer["kernel"]), np.asarray(layer["bias"])

    def fg(flat):
        z = flat.reshape(N, N_IN)
        lv, lg = ref_loss("softmax", y, (z @ w + b) @ m)
        val = np.sum(lv) + lam_prev * np.sum(ref_B(act, u_prev, z))
        return val, (lg @ m.T @ w.T + lam_prev * (ref_dG(act, z) - u_prev)).ravel()

    check_x_optimal(act, x, fg)


# ---------------------------------------------------------------- per-neuron multipliers
# λ with one value per neuron of its layer (LiftedConfig.lambda_granularity="neuron"), broadcast over the last axis.
LAM_IN = np.array([0.3, 1.1, 2.5, 0.7, 1.9])  # one per input neuron (N_IN = 5 ≠ N = 9 ≠ N_OUT = 4)
LAM_OUT = np.array([0.4, 2.2, 1.0, 3.1])  # one per output neuron


@pytest.mark.parametrize("act", ["relu", "sigmoid"])
def test_x_hidden_block_with_per_neuron_lambdas(act):
    """Σ_ij λ_prev,j B(U_prev, X)_ij + Σ_ik λ_next,k B(XW + b, X_next)_ik: KKT and L-BFGS-B. Catches λ applied along
    the wrong axis or a mean λ in place of the vector (a step size from the mean λ: the test below)."""
    pen = get_penalty(act)
    layer, u_prev, x_next, x0 = x_hidden_problem(act, 61)
    x, info = solve_x_hidden(pen, x0, u_prev, Dense(N_OUT), layer, x_next, jnp.asarray(LAM_IN), jnp.asarray(LAM_OUT),
                             TIGHT)
    assert np.all(np.asarray(info.result) == Result.CONVERGED)
    w, b = np.asarray(layer["kernel"]), np.asarray(layer["bias"])

    def fg(flat):
        z = flat.reshape(N, N_IN)
        u = z @ w + b
        val = np.sum(LAM_IN * ref_B(act, u_prev, z)) + np.sum(LAM_OUT * ref_B(act, u, x_next))
        grad = LAM_IN * (ref_dG(act, z) - u_prev) + (LAM_OUT * (ref_phi(act, u) - x_next)) @ w.T
        return val, grad.ravel()

    check_x_optimal(act, x, fg)


def test_x_last_block_with_per_neuron_lambdas():
    pen = get_penalty("relu")
    layer = layer_of(71, N_IN, N_OUT, 0.6)
    u_prev = rand(72, (N, N_IN), 1.5)
    y = np.eye(N_OUT)[np.arange(N) % N_OUT]
    x0 = domain_point("relu", rand(73, (N, N_IN)))
    x, info = solve_x_last(pen, x0, u_prev, Dense(N_OUT), layer, y, jnp.asarray(LAM_IN), "softmax", TIGHT)
    assert np.all(np.asarray(info.result) == Result.CONVERGED)
    w, b = np.asarray(layer["kernel"]), np.asarray(layer["bias"])

    def fg(flat):
        z = flat.reshape(N, N_IN)
        lv, lg = ref_loss("softmax", y, z @ w + b)
        return (np.sum(lv) + np.sum(LAM_IN * ref_B("relu", u_prev, z)),
                (lg @ w.T + LAM_IN * (ref_dG("relu", z) - u_prev)).ravel())

    check_x_optimal("relu", x, fg)


@pytest.mark.parametrize("w_mode", ["primal", "kernel_mm"])
def test_w_hidden_block_with_per_neuron_lambdas(w_mode):
    """(1/N) Σ_ik λ_k B(XW + b, X_out)_ik + ρ‖W‖² + ρ'‖(W, b) − anchor‖²: optimal by hand, equal to L-BFGS-B."""
    pen = get_penalty("relu")
    x_in = rand(81, (N, N_IN))
    x_out = domain_point("relu", rand(82, (N, N_OUT), 1.5))
    layer = {"kernel": jnp.asarray(rand(83, (N_IN, N_OUT), 0.3)), "bias": jnp.zeros(N_OUT)}
    anchor = layer_of(84, N_IN, N_OUT)
    rho, rho_prox = 1e-2, 0.2
    p, info = solve_w_hidden(pen, Dense(N_OUT), layer, x_in, x_out, jnp.asarray(LAM_OUT), rho, TIGHT, anchor,
                             rho_prox, w_mode=w_mode)
    assert int(info.result) == Result.CONVERGED

    def fit(u):
        return (np.sum(LAM_OUT * ref_B("relu", u, x_out)) / N, LAM_OUT * (ref_phi("relu", u) - x_out) / N)

    check_w_optimal(p, w_objective(x_in, N_OUT, fit, rho, anchor, rho_prox))


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("3", "3")])
def test_importing_fenchel_gives_openblas_one_thread_unless_the_user_chose(preset, expected):
    """jax's LAPACK calls (the W blocks' Cholesky factors) run in scipy's OpenBLAS, whose threads otherwise
    compete with XLA's (the lifted MNIST step: 4.05 ms with one thread, 4.78 ms with two). The variable must be
    set at import, before OpenBLAS loads; a user's own value is kept."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if preset is not None:
        env["OPENBLAS_NUM_THREADS"] = preset
    code = ("import sys, os, fenchel; assert 'scipy.linalg' not in sys.modules; "
            "print(os.environ['OPENBLAS_NUM_THREADS'])")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


_LOOP_COPIES = """
import os, re, sys, jax
{first}
import fenchel
from fenchel import LiftedConfig, LiftedTrainer, init_params, mlp
layers = mlp((20, 30, 5))
trainer = LiftedTrainer(LiftedConfig(), layers)
params = init_params(jax.random.PRNGKey(0), layers, (20,))
x = jax.random.normal(jax.random.PRNGKey(1), (40, 20))
y = jax.nn.one_hot(jax.numpy.arange(40) % 5, 5)
text = trainer.minibatch_update.lower(params, x, y).compile().as_text()
print("--xla_cpu_copy_insertion_use_region_analysis=true" in os.environ.get("XLA_FLAGS", ""))
bodies = {{m.group(1): m.group(0) for m in re.finditer(r"(?ms)^(%\\S+) .*?^\\}}", text)}}
loops = re.findall(r"body=(%[\\w.\\-]+)", text)
print(len(loops), sum(len(re.findall(r"= \\S+ copy\\(", bodies[b])) for b in loops))
"""


@pytest.mark.parametrize("case", ["default", "user chose false", "backends already started"])
def test_importing_fenchel_lets_the_solver_loops_update_in_place_unless_the_user_chose(case):
    """XLA:CPU's region-analysis copy insertion (`fenchel._cpu`) removes the copies that the FISTA loops' bodies
    otherwise make of their iterates every iteration (7–9% of the MNIST step). It must be in XLA_FLAGS before
    jax starts its backends; a user's own setting is kept, and once the backends run it is too late to add."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    first = ""
    if case == "user chose false":
        env["XLA_FLAGS"] = "--xla_cpu_copy_insertion_use_region_analysis=false"
    if case == "backends already started":
        first = "jax.numpy.ones(1).block_until_ready()"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _LOOP_COPIES.format(first=first)], env=env, cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    added, loops, copies = out.stdout.split()
    loops, copies = int(loops), int(copies)
    assert added == str(case == "default"), "the flag is added only when the user set none and jax has not started"
    assert loops == 3  # the X block and the two W blocks
    if case == "default":
        assert copies <= 1  # of the 12 without it, the X loop keeps one copy of its extrapolated point
    else:
        assert copies >= loops, "without the option, every loop body copies its iterates"


# ---------------------------------------------------------------- audit additions
@pytest.mark.parametrize("w_mode, rho, anchored", [("kernel_mm", 0.0, True), ("primal_mm", 1e-2, True),
                                                   ("primal_mm", 1e-2, False)])
def test_mm_w_forms_take_one_exact_newton_step_on_the_squared_loss(w_mode, rho, anchored):
    """One MM step on the quadratic squared-loss block lands on numpy's normal equations (catches a wrong majoriser)."""
    # Hessian (1/N)ZᵀZ + diag(2(ρ + ρ'), 2ρ'), Z = [X 1], is the majoriser itself (kernel_mm's μ also weights the bias,
    # so there ρ = 0): one step z = y − P⁻¹∇f(y) is Newton's and exact. N ≤ n_in: the kernel form applies.
    n, n_in = 6, 10
    x_in, y = rand(151, (n, n_in)), rand(152, (n, N_OUT))
    layer = layer_of(153, n_in, N_OUT)
    anchor, rho_prox = (layer_of(154, n_in, N_OUT, 0.5, 0.4), 0.2) if anchored else (None, 0.0)
    p, info = solve_w_out(Dense(N_OUT), layer, x_in, y, rho, "squared", SolverConfig(tol=1e-14, max_steps=1), anchor,
                          rho_prox, w_mode=w_mode)
    assert int(info.steps) == 1
    z = np.hstack([x_in, np.ones((n, 1))])
    d = np.r_[np.full(n_in, 2.0 * (rho + rho_prox)), 2.0 * rho_prox]
    theta_a = np.zeros((n_in + 1, N_OUT)) if anchor is None else np.vstack([anchor["kernel"], anchor["bias"]])
    theta = np.linalg.solve(z.T @ z / n + np.diag(d), z.T @ y / n + 2.0 * rho_prox * theta_a)
    np.testing.assert_allclose(p["kernel"], theta[:-1], atol=1e-8)
    np.testing.assert_allclose(p["bias"], theta[-1], atol=1e-8)


@pytest.mark.parametrize("w_mode", ["kernel", "kernel_mm"])
def test_w_block_without_anchor_has_no_proximal_term_whatever_rho_prox(w_mode):
    """Anchor None: kernel forms minimise fit + ρ‖W‖² (SciPy) whatever ρ' (catches ρ' in μ without an anchor)."""
    n, n_in = 6, 10
    x_in, y = rand(161, (n, n_in)), rand(162, (n, N_OUT))
    layer, rho = layer_of(163, n_in, N_OUT), 2e-2
    p, info = solve_w_out(Dense(N_OUT), layer, x_in, y, rho, "squared", TIGHT, None, 0.3, w_mode=w_mode)
    assert int(info.result) == Result.CONVERGED
    check_w_optimal(p, w_objective(x_in, N_OUT, out_fit("squared", y), rho))


@pytest.mark.parametrize("loss", ["softmax", "squared"])
def test_x_last_block_with_a_loss_weight(loss):
    """κ ≠ 1 weights the X-last loss: KKT and L-BFGS-B (catches κ dropped from the objective or the step size)."""
    act, kappa, lam_prev = "relu", 6.0, 0.9
    layer = layer_of(171, N_IN, N_OUT, 0.6)
    u_prev = rand(173, (N, N_IN), 1.5)
    y = np.eye(N_OUT)[np.arange(N) % N_OUT] if loss == "softmax" else rand(174, (N, N_OUT))
    x0 = domain_point(act, rand(175, (N, N_IN)))
    x, info = solve_x_last(get_penalty(act), x0, u_prev, Dense(N_OUT), layer, y, lam_prev, loss, TIGHT,
                           loss_weight=kappa)
    assert np.all(np.asarray(info.result) == Result.CONVERGED)
    w, b = np.asarray(layer["kernel"]), np.asarray(layer["bias"])

    def fg(flat):
        z = flat.reshape(N, N_IN)
        lv, lg = ref_loss(loss, y, z @ w + b)
        val = kappa * np.sum(lv) + lam_prev * np.sum(ref_B(act, u_prev, z))
        return val, (kappa * lg @ w.T + lam_prev * (ref_dG(act, z) - u_prev)).ravel()

    check_x_optimal(act, x, fg)


def test_x_hidden_block_step_size_takes_the_largest_per_neuron_lambda():
    """Per-neuron λ_next with a large spread: KKT and L-BFGS-B (catches a step size from mean λ, not max λ)."""
    act = "leaky_relu"
    pen = get_penalty(act)
    lam_prev, lam_next = 0.5, np.array([0.05, 0.05, 0.05, 8.0])
    w = rand(181, (N_IN, N_OUT), 0.1)
    w[:, 3] = 1.5 * rand(182, (N_IN,))  # the dominant column, the one with the large λ
    b = np.array([0.0, 0.0, 0.0, 3.0])
    u_prev = rand(183, (N, N_IN), 1.5)
    x_next = domain_point(act, rand(184, (N, N_OUT), 1.5))
    x0 = domain_point(act, rand(185, (N, N_IN)))
    layer = {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}
    x, info = solve_x_hidden(pen, x0, u_prev, Dense(N_OUT), layer, x_next, lam_prev, jnp.asarray(lam_next), TIGHT)
    assert np.all(np.asarray(info.result) == Result.CONVERGED)

    def fg(flat):
        z = flat.reshape(N, N_IN)
        u = z @ w + b
        val = lam_prev * np.sum(ref_B(act, u_prev, z)) + np.sum(lam_next * ref_B(act, u, x_next))
        grad = lam_prev * (ref_dG(act, z) - u_prev) + (lam_next * (ref_phi(act, u) - x_next)) @ w.T
        return val, grad.ravel()

    check_x_optimal(act, x, fg)


def test_x_block_in_row_chunks_reports_the_steps_of_a_slowest_row_in_the_remainder():
    """Chunked X solve reports the slowest row's steps, here the remainder's (catches the remainder's steps dropped)."""
    pen = get_penalty("leaky_relu")
    layer, u_prev, x_next, x0 = x_hidden_problem("leaky_relu", 41)
    x0 = x0.copy()
    x0[-1] = 1e4
    cfg = SolverConfig(tol=1e-8, max_steps=300)

    def steps_alone(x, u, v):  # one row as its own block (vmapped: each row keeps its own iteration count)
        return blocks.solve_x_hidden(pen, x[None], u[None], Dense(N_OUT), layer, v[None], 0.8, 1.7, cfg)[1].steps

    alone = np.asarray(jax.jit(jax.vmap(steps_alone))(x0, u_prev, x_next)).tolist()
    assert alone[-1] > max(alone[:-1]), alone
    whole = solve_x_hidden(pen, x0, u_prev, Dense(N_OUT), layer, x_next, 0.8, 1.7, cfg)
    chunked = solve_x_hidden(pen, x0, u_prev, Dense(N_OUT), layer, x_next, 0.8, 1.7,
                             SolverConfig(tol=1e-8, max_steps=300, chunk_bytes=2 * N_IN * 8))
    assert int(chunked[1].steps) == int(whole[1].steps) == alone[-1]
    np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-12, atol=1e-12)


def test_kernel_mm_first_residual_in_float32_when_the_anchor_is_the_start():
    """The first step's residual ‖∇f(W_0)‖_{P⁻¹}, solved in float32 with W_a = W_0 and ρ ≪ ρ', against numpy's float64
    value, P = c·[X 1]ᵀ[X 1] + μI (kernel_mm weights the bias by μ too). The first preconditioned step moves W_0
    by V = W_0 − c*·W_a, c* = ρ'/(ρ + ρ') ≈ 1, plus Xᵀβ; forming ‖V‖² as ‖W_0‖² − 2c*⟨W_0, W_a⟩ + c*²‖W_a‖²
    cancels to float32 rounding noise (it once gave 3× the true value at a trained MNIST state)."""
    n, n_in = 20, 60
    pen = get_penalty("relu")
    layer = layer_of(181, n_in, N_OUT, scale=3.0)
    x_in = np.maximum(rand(182, (n, n_in)), 0.0)
    w, b = np.asarray(layer["kernel"]), np.asarray(layer["bias"])
    x_out = np.maximum(x_in @ w + b, 0.0) + 0.001 * np.abs(rand(183, (n, N_OUT)))  # near the graph: a small gradient
    lam, rho, rho_prox = 1.0, 1e-5, 0.1
    f32 = {k: jnp.asarray(v, jnp.float32) for k, v in layer.items()}
    _, info = solve_w_hidden(pen, Dense(N_OUT), f32, jnp.asarray(x_in, jnp.float32), jnp.asarray(x_out, jnp.float32),
                             lam, rho, SolverConfig(tol=1e-30, max_steps=1), f32, rho_prox, w_mode="kernel_mm",
                             anchor_is_start=True)
    grad = w_objective(x_in, N_OUT, hidden_fit("relu", x_out, lam), rho, layer, rho_prox)(flat_params(layer))[1]
    g = np.vstack([grad[:n_in * N_OUT].reshape(n_in, N_OUT), grad[n_in * N_OUT:]])  # (n_in + 1) × N_OUT
    z = np.hstack([x_in, np.ones((n, 1))])
    p = lam / n * z.T @ z + 2.0 * (rho + rho_prox) * np.eye(n_in + 1)  # c = λ/N·1 for ReLU
    expected = np.sqrt(np.sum(g * np.linalg.solve(p, g)))
    assert float(info.residual) == pytest.approx(expected, rel=1e-3)


def mm_fista_reference(fg, theta0, p_mat, steps):
    """FISTA in the metric P, step 1 (z = y − P⁻¹∇f(y)), with gradient restart ⟨y − z, z − x⟩_P > 0, in numpy on
    Θ = [W; bᵀ]; fg(Θ) → (value, ∇Θ). Returns the iterates x_1..x_steps, the residuals ‖y − z‖_P and restart flags."""
    x = y = theta0
    t = 1.0
    xs, residuals, restarts = [], [], []
    for _ in range(steps):
        z = y - np.linalg.solve(p_mat, fg(y)[1])
        d = y - z
        t_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
        beta = (t - 1.0) / t_next
        restart = np.sum((z - x) * (p_mat @ d)) > 0
        if restart:
            t_next, beta = 1.0, 0.0
        y, x, t = z + beta * (z - x), z, t_next
        xs.append(x)
        residuals.append(np.sqrt(np.sum(d * (p_mat @ d))))
        restarts.append(restart)
    return xs, residuals, restarts


def mm_problem(anchor_is_start: bool):
    """The anchored ReLU hidden W block of the MM-FISTA comparisons (numpy): (x_in, x_out, layer, anchor, λ, ρ, ρ',
    fg), fg(Θ) → (objective, gradient) on Θ = [W; bᵀ]."""
    x_in, x_out, layer = (np.asarray(a) if not isinstance(a, dict) else {k: np.asarray(v) for k, v in a.items()}
                          for a in kernel_form_problem())
    lam, rho, rho_prox = 0.5, 1e-2, 0.3
    anchor = layer if anchor_is_start else {"kernel": layer["kernel"] + rand(191, layer["kernel"].shape, 0.2),
                                            "bias": layer["bias"] - 0.1}
    n_in = x_in.shape[1]
    flat = w_objective(x_in, N_OUT, hidden_fit("relu", x_out, lam), rho, anchor, rho_prox)

    def fg(theta):
        val, g = flat(np.concatenate([theta[:-1].ravel(), theta[-1]]))
        return val, np.vstack([g[:n_in * N_OUT].reshape(n_in, N_OUT), g[n_in * N_OUT:]])

    return x_in, x_out, layer, anchor, lam, rho, rho_prox, fg


@pytest.mark.parametrize("anchor_is_start", [True, False])
def test_kernel_mm_takes_the_iterates_of_mm_fista_in_the_primal(anchor_is_start):
    """kernel_mm after k steps against a numpy MM-FISTA on (W, b) with P = c·[X 1]ᵀ[X 1] + μI (μ on the bias too),
    k = 1..8, a restart among them (catches the closed-form first step's momentum, a wrong W_a coefficient c* of the
    later iterates, or a wrong inner product in the reduced loop's restart test or residual). With N = 9 and 4
    outputs, k = 1, 2 apply S⁻¹ by triangular solves and k ≥ 3 by the formed inverse (`spd_solver`): both routes."""
    pen = get_penalty("relu")
    x_in, x_out, layer, anchor, lam, rho, rho_prox, fg = mm_problem(anchor_is_start)
    n, n_in = x_in.shape
    z = np.hstack([x_in, np.ones((n, 1))])
    p_mat = lam / n * z.T @ z + 2.0 * (rho + rho_prox) * np.eye(n_in + 1)
    theta0 = np.vstack([layer["kernel"], layer["bias"]])
    xs, residuals, restarts = mm_fista_reference(fg, theta0, p_mat, 8)
    assert any(restarts[1:]), "the problem should exercise the restart"
    jx = {k: jnp.asarray(v) for k, v in layer.items()}
    ja = jx if anchor_is_start else {k: jnp.asarray(v) for k, v in anchor.items()}
    for k in range(1, 9):
        def solve(k=k):
            return solve_w_hidden(pen, Dense(N_OUT), jx, jnp.asarray(x_in), jnp.asarray(x_out), lam, rho,
                                  SolverConfig(tol=1e-14, max_steps=k), ja, rho_prox, w_mode="kernel_mm",
                                  anchor_is_start=anchor_is_start)

        p, info = solve()
        if k <= 3:  # the route: solves with the factor (left-side triangular solves) iff N_OUT·k < N
            left = [e for e in _equations(jax.make_jaxpr(solve)().jaxpr)
                    if e.primitive.name == "triangular_solve" and e.params["left_side"]]
            assert bool(left) == (N_OUT * k < n), (k, len(left))
        assert int(info.steps) == k
        expected = xs[k - 1] if fg(xs[k - 1])[0] <= fg(theta0)[0] else theta0  # the safeguard
        np.testing.assert_allclose(np.vstack([p["kernel"], p["bias"]]), expected, atol=1e-10, err_msg=f"step {k}")
        assert float(info.residual) == pytest.approx(residuals[k - 1], rel=1e-8)


def test_a_kernel_w_block_that_float32_cannot_factor_is_solved_in_the_primal_form():
    """Raw-scale, nearly collinear inputs (N = 50 ≤ 80 inputs: the kernel form) make the kernel_mm system
    ZZᵀ + (μ/c)I indefinite once formed in float32, and so unfactorable: without the fallback the solve reports
    NONFINITE (and the launcher would stop the run); with it, `solve_w` returns the primal_mm solve of the same
    block, a finite point no worse than the start."""
    from fenchel.lifted import loss_per_sample

    rng = np.random.default_rng(11)
    f32 = jnp.float32
    # one shared row of scale 10⁴ plus unit noise: ZZᵀ's float32 rounding (≈ 10⁻⁷·10¹⁰) swamps its small eigenvalues
    x_in = jnp.asarray(1e4 * np.abs(rng.normal(size=(1, 80))) + rng.normal(size=(50, 80)), f32)
    y = jax.nn.one_hot(rng.integers(0, 5, 50), 5, dtype=f32)
    layer = {"kernel": jnp.asarray(rng.normal(size=(80, 5)) * 1e-3, f32), "bias": jnp.zeros(5, f32)}
    spec = Dense(5)

    def fit(u):
        return jnp.mean(loss_per_sample("softmax", y, u))

    block = blocks.WBlock(spec, fit, 1.0 / 50, layer, x_in, 1e-5, layer, 0.1, True)
    cfg = SolverConfig(tol=1e-4, max_steps=3)
    assert spec.w_form("auto", x_in, block.mu) == "kernel_mm"
    _, plain = blocks.solve_w(block, cfg, "kernel_mm", fallback=False)
    assert int(plain.result) == Result.NONFINITE
    _, auto = blocks.solve_w(block, cfg)  # w_mode "auto", as the trainers call it, resolves to kernel_mm: retried
    out, info = blocks.solve_w(block, cfg, "kernel_mm")
    ref, ref_info = blocks.solve_w_primal_mm(block, cfg)
    assert int(info.result) == int(auto.result) == int(ref_info.result) != Result.NONFINITE
    assert int(info.steps) == int(ref_info.steps)
    # the same solve (compiled inside a cond, so rounded differently: the block is ill-conditioned)
    np.testing.assert_allclose(float(info.value), float(ref_info.value), rtol=1e-4)
    scale = float(np.abs(np.asarray(ref["kernel"])).max())
    np.testing.assert_allclose(np.asarray(out["kernel"]), np.asarray(ref["kernel"]), rtol=0, atol=1e-2 * scale)
    assert np.all(np.isfinite(np.asarray(out["kernel"])))
    assert float(info.value) <= float(fit(x_in @ layer["kernel"] + layer["bias"])) * (1 + 1e-6)


@pytest.mark.parametrize("rho", [1e-5, 0.0])
def test_stacked_hidden_w_blocks_retry_only_the_block_float32_cannot_factor(rho):
    """Two hidden blocks stacked (`solve_w_hidden_stacked`, the `stack_layers` path): one with raw-scale, nearly
    collinear inputs, whose float32 kernel_mm system cannot be factored, and one with unit-scale inputs. Each
    result is its own block's: the first the primal_mm solve (it would be NONFINITE without the retry, which a
    cond under vmap cannot give), the second the kernel_mm solve. ρ = 0 with ρ' > 0 is still kernel_mm (μ counts
    ρ'), so it is retried too."""
    rng = np.random.default_rng(12)
    f32 = jnp.float32
    raw = 1e4 * np.abs(rng.normal(size=(1, 80))) + rng.normal(size=(50, 80))
    x_ins = jnp.asarray(np.stack([raw, rng.normal(size=(50, 80))]), f32)
    x_outs = jnp.asarray(np.abs(rng.normal(size=(2, 50, 5))), f32)
    layers = {"kernel": jnp.asarray(rng.normal(size=(2, 80, 5)) * 1e-3, f32), "bias": jnp.zeros((2, 5), f32)}
    lams = jnp.asarray([1.0, 2.0], f32)
    pen, spec, cfg = get_penalty("relu"), Dense(5), SolverConfig(tol=1e-4, max_steps=3)

    def own(k, w_mode, **kw):
        layer = {n: v[k] for n, v in layers.items()}
        return blocks.solve_w_hidden(pen, spec, layer, x_ins[k], x_outs[k], lams[k], rho, cfg, layer, 0.1, w_mode,
                                     anchor_is_start=True, **kw)

    assert spec.w_form("auto", x_ins[0], 2 * (rho + 0.1)) == "kernel_mm"
    assert int(own(0, "kernel_mm", fallback=False)[1].result) == Result.NONFINITE
    out, info = blocks.solve_w_hidden_stacked(pen, spec, layers, x_ins, x_outs, lams, rho, cfg, layers, 0.1,
                                              anchor_is_start=True)
    for k, (ref, ref_info) in enumerate([own(0, "primal_mm"), own(1, "kernel_mm", fallback=False)]):
        assert int(info.result[k]) == int(ref_info.result) != Result.NONFINITE
        assert int(info.steps[k]) == int(ref_info.steps)
        # block 0 is ill-conditioned and its retry compiled in a cond, so rounded differently (as above)
        atol = (1e-2 if k == 0 else 1e-5) * float(np.abs(np.asarray(ref["kernel"])).max())
        for n in ("kernel", "bias"):
            np.testing.assert_allclose(np.asarray(out[n][k]), np.asarray(ref[n]), rtol=0, atol=atol,
                                       err_msg=f"block {k} {n}")


def test_the_retry_replaces_exactly_the_non_finite_blocks():
    """`_retry_nonfinite` on three stacked blocks, NONFINITE, MAX_STEPS and CONVERGED, with a retry that marks
    what it returns: only the first block takes it (a block that merely ran out of steps keeps its own result)."""
    def info(results):
        return SolveInfo(result=jnp.asarray(results, jnp.int32), residual=jnp.zeros(3),
                         steps=jnp.zeros(3, jnp.int32), value=jnp.zeros(3))

    solved = ({"kernel": jnp.asarray([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]), "bias": jnp.asarray([1.0, 2.0, 3.0])},
              info([Result.NONFINITE, Result.MAX_STEPS, Result.CONVERGED]))
    again = ({"kernel": jnp.full((3, 2), -7.0), "bias": jnp.full(3, -7.0)}, info([Result.CONVERGED] * 3))
    out, out_info = blocks._retry_nonfinite(solved, lambda: again)
    np.testing.assert_array_equal(out["kernel"], [[-7.0, -7.0], [2.0, 2.0], [3.0, 3.0]])
    np.testing.assert_array_equal(out["bias"], [-7.0, 2.0, 3.0])
    np.testing.assert_array_equal(out_info.result, [Result.CONVERGED, Result.MAX_STEPS, Result.CONVERGED])
    untouched, _ = blocks._retry_nonfinite((solved[0], info([Result.MAX_STEPS] * 3)), lambda: again)
    np.testing.assert_array_equal(untouched["kernel"], solved[0]["kernel"])


def test_primal_mm_iterates_are_mm_fista_in_the_jittered_metric(monkeypatch):
    """primal_mm factors P + δ·diag(P) (`majoriser_jitter`), and its steps, restart test and residual must all use
    that one metric. δ is ~10⁻¹³ in float64, invisible; forced to 0.5 here, the iterates and residuals of steps
    1–8 (a restart among them) must be numpy MM-FISTA's in P + 0.5·diag(P), not in P or in P + 0.5·I."""
    delta = 0.5
    monkeypatch.setattr(blocks, "majoriser_jitter", lambda n, dtype: delta)
    pen = get_penalty("relu")
    x_in, x_out, layer, anchor, lam, rho, rho_prox, fg = mm_problem(anchor_is_start=False)
    n, n_in = x_in.shape
    z = np.hstack([x_in, np.ones((n, 1))])
    p = lam / n * z.T @ z + np.diag([2.0 * (rho + rho_prox)] * n_in + [2.0 * rho_prox])
    p = p + 1e-10 * np.trace(p) / p.shape[0] * np.eye(n_in + 1)
    xs, residuals, restarts = mm_fista_reference(fg, np.vstack([layer["kernel"], layer["bias"]]),
                                                 p + delta * np.diag(np.diag(p)), 8)
    assert any(restarts)
    jx, ja = ({k: jnp.asarray(v) for k, v in t.items()} for t in (layer, anchor))
    for k in range(1, 9):
        out, info = blocks.solve_w_hidden(pen, Dense(N_OUT), jx, jnp.asarray(x_in), jnp.asarray(x_out), lam, rho,
                                          SolverConfig(tol=1e-14, max_steps=k), ja, rho_prox, w_mode="primal_mm")
        assert int(info.steps) == k
        np.testing.assert_allclose(np.vstack([out["kernel"], out["bias"]]), xs[k - 1], atol=1e-10,
                                   err_msg=f"step {k}")
        assert float(info.residual) == pytest.approx(residuals[k - 1], rel=1e-8)
