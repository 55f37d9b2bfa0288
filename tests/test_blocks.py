"""Block solvers: first-order optimality, agreement with SciPy L-BFGS-B, result codes, forms agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from fenchel import blocks
from fenchel.blocks import SolverConfig
from fenchel.lifted import loss_per_sample, preactivation
from fenchel.penalties import ACTIVATIONS, get_penalty
from fenchel.solvers import FISTA, Composite, Result

TIGHT = SolverConfig(tol=1e-9, max_steps=20000)
N, N_IN, N_OUT = 9, 5, 4


def rand(seed, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.PRNGKey(seed), shape)


def domain_point(pen, x):
    return pen.project(pen.forward(x))


def scipy_min(fun, x0, bounds=None):
    """L-BFGS-B on a float64 numpy objective with jax gradients."""
    x0 = np.asarray(x0, np.float64)
    vg = jax.jit(jax.value_and_grad(lambda z: fun(z.reshape(x0.shape))))

    def f(z):
        v, g = vg(jnp.asarray(z))
        return float(v), np.asarray(g, np.float64).ravel()

    res = optimize.minimize(f, x0.ravel(), jac=True, method="L-BFGS-B", bounds=bounds,
                            options={"maxiter": 20000, "ftol": 1e-15, "gtol": 1e-12, "maxcor": 30})
    return res.fun


def x_bounds(pen, size):
    eps = 1e-12
    lo = None if not np.isfinite(pen.lower) else float(pen.lower) + (eps if pen.name in ("sigmoid", "tanh") else 0)
    hi = None if not np.isfinite(pen.upper) else float(pen.upper) - eps
    return [(lo, hi)] * size


def gradient_mapping_norm(smooth, prox, x, step):
    """‖(x − prox(x − s∇f(x), s))/s‖_∞, zero exactly at a minimiser of f + g."""
    g = jax.grad(lambda z: jnp.sum(smooth(z)))(x)
    return float(jnp.max(jnp.abs(x - prox(x - step * g, step))) / step)


def x_hidden_problem(pen, seed):
    """A random hidden-X block: (layer, U_prev, X_next, start point), seeds seed..seed+4."""
    layer = {"kernel": rand(seed, (N_IN, N_OUT), 0.6), "bias": rand(seed + 1, (N_OUT,), 0.1)}
    u_prev = rand(seed + 2, (N, N_IN), 1.5)
    x_next = domain_point(pen, rand(seed + 3, (N, N_OUT), 1.5))
    x0 = domain_point(pen, rand(seed + 4, (N, N_IN)))
    return layer, u_prev, x_next, x0


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_x_hidden_block(act):
    pen = get_penalty(act)
    layer, u_prev, x_next, x0 = x_hidden_problem(pen, 1)
    lam_prev, lam_next = 0.8, 1.7
    x, info = blocks.solve_x_hidden(pen, x0, u_prev, layer, x_next, lam_prev, lam_next, TIGHT)
    assert np.all(np.asarray(info.result) == Result.CONVERGED)
    assert np.all(np.asarray(pen.in_domain(x)))

    def total(z):
        return (lam_prev * jnp.sum(pen.value(u_prev, z))
                + lam_next * jnp.sum(pen.value(preactivation(layer, z), x_next)))

    def smooth(z):
        u = preactivation(layer, z)
        return -lam_prev * jnp.sum(u_prev * z) + lam_next * jnp.sum(pen.smooth_u(u, x_next))

    prox = lambda z, s: pen.prox_G(z, s * lam_prev)  # noqa: E731
    assert gradient_mapping_norm(smooth, prox, x, 1e-2) <= 1e-6
    ref = scipy_min(total, x0, x_bounds(pen, x0.size))
    assert float(total(x)) <= ref + 1e-6 * abs(ref) + 1e-9


@pytest.mark.parametrize("loss", ["softmax", "squared"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_x_last_block(act, loss):
    pen = get_penalty(act)
    layer = {"kernel": rand(11, (N_IN, N_OUT), 0.6), "bias": rand(12, (N_OUT,), 0.1)}
    u_prev = rand(13, (N, N_IN), 1.5)
    y = jax.nn.one_hot(jnp.arange(N) % N_OUT, N_OUT) if loss == "softmax" else rand(14, (N, N_OUT))
    x0 = domain_point(pen, rand(15, (N, N_IN)))
    x, info = blocks.solve_x_last(pen, x0, u_prev, layer, y, 0.9, loss, TIGHT)
    assert np.all(np.asarray(info.result) == Result.CONVERGED)

    def total(z):
        return jnp.sum(loss_per_sample(loss, y, preactivation(layer, z))) + 0.9 * jnp.sum(pen.value(u_prev, z))

    ref = scipy_min(total, x0, x_bounds(pen, x0.size))
    assert float(total(x)) <= ref + 1e-6 * abs(ref) + 1e-9


@pytest.mark.parametrize("w_mode", ["primal", "kernel", "kernel_mm"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_w_hidden_block(act, w_mode):
    pen = get_penalty(act)
    x_in = rand(21, (N, N_IN))
    x_out = domain_point(pen, rand(22, (N, N_OUT), 1.5))
    layer = {"kernel": rand(23, (N_IN, N_OUT), 0.3), "bias": jnp.zeros(N_OUT)}
    anchor = {"kernel": rand(24, (N_IN, N_OUT), 0.3), "bias": rand(25, (N_OUT,), 0.1)}
    lam, rho, rho_prox = 1.3, 1e-2, 0.2
    p, info = blocks.solve_w_hidden(pen, layer, x_in, x_out, lam, rho, TIGHT, anchor, rho_prox, w_mode=w_mode)
    assert int(info.result) == Result.CONVERGED

    def total(flat):
        k, b = flat[: N_IN * N_OUT].reshape(N_IN, N_OUT), flat[N_IN * N_OUT:]
        q = {"kernel": k, "bias": b}
        return (lam / N * jnp.sum(pen.value(preactivation(q, x_in), x_out)) + rho * jnp.sum(k**2)
                + rho_prox * (jnp.sum((k - anchor["kernel"]) ** 2) + jnp.sum((b - anchor["bias"]) ** 2)))

    flat = jnp.concatenate([p["kernel"].ravel(), p["bias"]])
    grad = jax.grad(total)(flat)
    assert float(jnp.linalg.norm(grad)) <= 1e-8
    ref = scipy_min(total, jnp.zeros_like(flat))
    assert abs(float(total(flat)) - ref) <= 1e-6 * abs(ref) + 1e-10


@pytest.mark.parametrize("w_mode", ["primal", "kernel", "kernel_mm"])
@pytest.mark.parametrize("loss", ["softmax", "squared"])
def test_w_out_block(loss, w_mode):
    x_in = jax.nn.relu(rand(31, (N, N_IN)))
    y = jax.nn.one_hot(jnp.arange(N) % N_OUT, N_OUT) if loss == "softmax" else rand(32, (N, N_OUT))
    layer = {"kernel": rand(33, (N_IN, N_OUT), 0.3), "bias": jnp.zeros(N_OUT)}
    rho = 1e-2
    p, info = blocks.solve_w_out(layer, x_in, y, rho, loss, TIGHT, w_mode=w_mode)
    assert int(info.result) == Result.CONVERGED

    def total(flat):
        k, b = flat[: N_IN * N_OUT].reshape(N_IN, N_OUT), flat[N_IN * N_OUT:]
        return jnp.mean(loss_per_sample(loss, y, x_in @ k + b)) + rho * jnp.sum(k**2)

    flat = jnp.concatenate([p["kernel"].ravel(), p["bias"]])
    assert float(jnp.linalg.norm(jax.grad(total)(flat))) <= 1e-8
    ref = scipy_min(total, jnp.zeros_like(flat))
    assert abs(float(total(flat)) - ref) <= 1e-6 * abs(ref) + 1e-10


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_vmapped_and_batched_x_solves_agree(act):
    pen = get_penalty(act)
    layer, u_prev, x_next, x0 = x_hidden_problem(pen, 41)
    cfg = SolverConfig(tol=1e-8, max_steps=300)
    xb, ib = blocks.solve_x_hidden(pen, x0, u_prev, layer, x_next, 0.8, 1.7, cfg, mode="batched")
    xv, iv = blocks.solve_x_hidden(pen, x0, u_prev, layer, x_next, 0.8, 1.7, cfg, mode="vmap")
    np.testing.assert_allclose(xb, xv, atol=1e-10)
    np.testing.assert_array_equal(ib.result, iv.result)


def test_primal_and_kernel_w_solves_take_identical_iterates():
    pen = get_penalty("relu")
    x_in = rand(51, (N, 3 * N))
    x_out = domain_point(pen, rand(52, (N, N_OUT)))
    layer = {"kernel": rand(53, (3 * N, N_OUT), 0.3), "bias": jnp.zeros(N_OUT)}
    anchor = {"kernel": rand(54, (3 * N, N_OUT), 0.3), "bias": rand(55, (N_OUT,), 0.1)}
    # stop early to compare iterates, not optima; exact λ_max so both use the same step
    cfg = SolverConfig(tol=1e-12, max_steps=7, power_iters=3000)
    a, ia = blocks.solve_w_hidden(pen, layer, x_in, x_out, 1.0, 1e-2, cfg, anchor, 0.3, w_mode="primal")
    b, ib = blocks.solve_w_hidden(pen, layer, x_in, x_out, 1.0, 1e-2, cfg, anchor, 0.3, w_mode="kernel")
    assert int(ia.steps) == int(ib.steps) == 7
    np.testing.assert_allclose(a["kernel"], b["kernel"], atol=1e-12)
    np.testing.assert_allclose(a["bias"], b["bias"], atol=1e-12)


def test_mm_preconditioning_needs_far_fewer_iterations():
    """On a ReLU W block with N < n_in the MM form needs well under half of FISTA's iterations."""
    pen = get_penalty("relu")
    x_in = jax.nn.relu(rand(61, (12, 40)))
    x_out = domain_point(pen, rand(62, (12, N_OUT)))
    layer = {"kernel": rand(63, (40, N_OUT), 0.2), "bias": jnp.zeros(N_OUT)}
    cfg = SolverConfig(tol=1e-9, max_steps=20000)
    _, plain = blocks.solve_w_hidden(pen, layer, x_in, x_out, 1.0, 1e-3, cfg, layer, 0.05, w_mode="kernel")
    _, mm = blocks.solve_w_hidden(pen, layer, x_in, x_out, 1.0, 1e-3, cfg, layer, 0.05, w_mode="kernel_mm")
    assert int(plain.result) == int(mm.result) == Result.CONVERGED
    assert abs(float(plain.value) - float(mm.value)) <= 1e-9 * abs(float(plain.value)) + 1e-12
    assert int(mm.steps) * 2 < int(plain.steps), (int(mm.steps), int(plain.steps))


def test_w_mode_errors():
    pen = get_penalty("relu")
    layer = {"kernel": rand(71, (N_IN, N_OUT)), "bias": jnp.zeros(N_OUT)}
    x_in, x_out = rand(72, (N, N_IN)), jnp.ones((N, N_OUT))
    with pytest.raises(ValueError, match="unknown w_mode"):
        blocks.solve_w_hidden(pen, layer, x_in, x_out, 1.0, 0.0, TIGHT, w_mode="newton")
    with pytest.raises(ValueError, match="needs ρ"):
        blocks.solve_w_hidden(pen, layer, x_in, x_out, 1.0, 0.0, TIGHT, w_mode="kernel_mm")


def test_result_codes():
    quad = Composite(smooth=lambda x: 0.5 * jnp.sum(x**2 * jnp.arange(1.0, 4.0)), prox=lambda z, s: z,
                     nonsmooth=lambda x: 0.0)
    x0 = jnp.ones(3)
    _, info = FISTA(tol=1e-8, max_steps=1000).run(quad, x0, 3.0)
    assert int(info.result) == Result.CONVERGED and float(info.residual) <= 1e-8
    _, info = FISTA(tol=1e-12, max_steps=3).run(quad, x0, 3.0)
    assert int(info.result) == Result.MAX_STEPS and int(info.steps) == 3
    # the first step leaves the domain of sqrt(x − ½): the next gradient is NaN
    bad = Composite(smooth=lambda x: jnp.sum(x**2 + jnp.sqrt(x - 0.5)), prox=lambda z, s: z,
                    nonsmooth=lambda x: 0.0)
    x, info = FISTA(tol=1e-8, max_steps=100).run(bad, jnp.ones(3), 1.0)
    assert int(info.result) == Result.NONFINITE and int(info.steps) < 100
    np.testing.assert_array_equal(x, jnp.ones(3))  # the start point is kept


def test_solver_rejects_bad_settings():
    with pytest.raises(ValueError, match="tol"):
        FISTA(tol=0.0)
    with pytest.raises(ValueError, match="max_steps"):
        SolverConfig(max_steps=0)
