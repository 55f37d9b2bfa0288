"""`fenchel.solvers` against independent float64 numpy/SciPy references: FISTA's iterates step by step (momentum,
adaptive restart, residual, row-separable freezing), its optimum, and the linear-algebra helpers.

The reference FISTA below is written here from the iteration in the module docstring (O'Donoghue & Candès 2015):

    z_k = clip(y_k − ∇f(y_k)/L),  t_{k+1} = (1 + √(1 + 4 t_k²))/2,  β_k = (t_k − 1)/t_{k+1},
    y_{k+1} = z_k + β_k (z_k − x_k),  x_{k+1} = z_k,  restart (t = 1, β = 0) when ⟨y_k − z_k, z_k − x_k⟩ > 0,

with residual L·‖y_k − z_k‖_∞; nothing from the library computes an expected value.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from fenchel.solvers import (
    FISTA,
    Composite,
    Result,
    cholesky_inverse,
    gram_majoriser,
    majoriser_jitter,
    power_iteration,
    spd_solve,
    spd_solver,
)

LO, HI = -0.4, 0.6  # the box of the test problems' constraint


def box_qp(seed, n=6, rows=None):
    """min ½xᵀAx − bᵀx over the box [LO, HI]ⁿ, A SPD with condition number 200 (so that momentum overshoots and
    the adaptive restart fires); b per row when rows is given. Returns A, b, L = λ_max(A)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = q @ np.diag(np.geomspace(1.0, 200.0, n)) @ q.T
    b = rng.normal(0, 3.0, (n,) if rows is None else (rows, n))  # some, not all, constraints active at the optimum
    return a, b, np.linalg.eigvalsh(a)[-1]


def composite(a, b, rows: bool):
    """The box QP as a `Composite`, per-row values when rows is true."""
    aj, bj = jnp.asarray(a), jnp.asarray(b)
    if rows:
        smooth = lambda x: 0.5 * jnp.sum((x @ aj) * x, axis=1) - jnp.sum(bj * x, axis=1)  # noqa: E731
        nonsmooth = lambda x: jnp.zeros(x.shape[0])  # noqa: E731
    else:
        smooth = lambda x: 0.5 * x @ aj @ x - bj @ x  # noqa: E731
        nonsmooth = lambda x: 0.0  # noqa: E731
    return Composite(smooth=smooth, prox=lambda z, s: jnp.clip(z, LO, HI), nonsmooth=nonsmooth)


def numpy_fista(a, b, lip, x0, steps, restart, tol):
    """The reference iteration on one problem: per step (x, y, t, residual, restarted), frozen once residual ≤ tol."""
    x, y, t, done, out = x0.copy(), x0.copy(), 1.0, False, []
    res = np.inf
    for _ in range(steps):
        restarted = False
        if not done:
            z = np.clip(y - (a @ y - b) / lip, LO, HI)
            res = lip * np.max(np.abs(y - z))
            t_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
            beta = (t - 1.0) / t_next
            if restart and np.dot(y - z, z - x) > 0:
                t_next, beta, restarted = 1.0, 0.0, True
            x, y, t = z, z + beta * (z - x), t_next
            done = res <= tol
        out.append((x.copy(), y.copy(), t, res, restarted))
    return out


@pytest.mark.parametrize("restart, seed, steps", [(False, 0, 30), (True, 3, 60)])
def test_fista_iterates_match_the_numpy_reference(restart, seed, steps):
    """Plain FISTA (30 steps) and FISTA with adaptive restart (60 steps, restarting at some steps but not all) take
    the reference's x, y, t and residual at every step; catches a wrong momentum update (t_{k+1} from t instead of
    t², β from t_{k+1}, y extrapolated along z − y), a residual without L, a restart test of the wrong sign and a
    restart that zeroes β but keeps the grown t."""
    a, b, lip = box_qp(seed)
    tol = 1e-300  # never met: every step is taken
    solver = FISTA(tol=tol, max_steps=1000, restart=restart)
    problem, x0 = composite(a, b, rows=False), np.zeros(len(b))
    ref = numpy_fista(a, b, lip, x0, steps, restart=restart, tol=tol)
    if restart:
        n_restarts = sum(r[4] for r in ref)
        assert 0 < n_restarts < steps // 2, n_restarts  # the case is present, and restart is not every step
    state, update = solver.init(problem, jnp.asarray(x0), lip), jax.jit(lambda s: solver.update(problem, s, lip))
    for k, (x, y, t, res, _) in enumerate(ref):
        state = update(state)
        np.testing.assert_allclose(np.asarray(state.x), x, rtol=1e-9, atol=1e-12, err_msg=f"x, step {k}")
        np.testing.assert_allclose(np.asarray(state.y), y, rtol=1e-9, atol=1e-12, err_msg=f"y, step {k}")
        np.testing.assert_allclose(float(state.t), t, rtol=1e-12, err_msg=f"t, step {k}")
        np.testing.assert_allclose(float(state.residual), res, rtol=1e-9, atol=1e-12, err_msg=f"residual, step {k}")


def test_row_separable_fista_runs_each_row_as_its_own_problem_and_freezes_converged_rows():
    """Row-separable FISTA on 4 box QPs (one b per row) takes, row by row, the reference iterates of that row's
    problem alone, frozen once its residual ≤ tol (rows converge at different steps); catches per-row momentum,
    restart or freezing not applied per row."""
    a, b, lip = box_qp(2, rows=4)
    tol = 1e-4
    solver = FISTA(tol=tol, max_steps=1000, restart=True, row_separable=True)
    problem, x0 = composite(a, b, rows=True), np.zeros(b.shape)
    refs = [numpy_fista(a, b[r], lip, x0[r], 150, restart=True, tol=tol) for r in range(len(b))]
    converged_at = [next(k for k, s in enumerate(ref) if s[3] <= tol) for ref in refs]
    assert len(set(converged_at)) > 1 and max(converged_at) < 149, converged_at
    state, update = solver.init(problem, jnp.asarray(x0), lip), jax.jit(lambda s: solver.update(problem, s, lip))
    for k in range(150):
        state = update(state)
        for r, ref in enumerate(refs):
            x, y, t, res, _ = ref[k]
            np.testing.assert_allclose(np.asarray(state.x[r]), x, rtol=1e-8, atol=1e-10, err_msg=f"x row {r}, {k}")
            np.testing.assert_allclose(np.asarray(state.y[r]), y, rtol=1e-8, atol=1e-10, err_msg=f"y row {r}, {k}")
            np.testing.assert_allclose(float(state.t[r]), t, rtol=1e-12, err_msg=f"t row {r}, step {k}")
        np.testing.assert_array_equal(np.asarray(state.done), [k >= c for c in converged_at])


def test_fista_run_reaches_the_scipy_optimum_and_reports_converged():
    """FISTA.run on the box QP returns SciPy's L-BFGS-B minimiser, a value no larger than SciPy's, CONVERGED and
    a residual ≤ tol that is the gradient-mapping norm L‖x − clip(x − ∇f(x)/L)‖_∞ (up to one step)."""
    a, b, lip = box_qp(1)
    res = optimize.minimize(lambda x: 0.5 * x @ a @ x - b @ x, np.zeros(len(b)), jac=lambda x: a @ x - b,
                            method="L-BFGS-B", bounds=[(LO, HI)] * len(b), options={"ftol": 1e-15, "gtol": 1e-12})
    x, info = FISTA(tol=1e-9, max_steps=5000).run(composite(a, b, rows=False), jnp.zeros(len(b)), lip)
    assert int(info.result) == Result.CONVERGED and float(info.residual) <= 1e-9
    np.testing.assert_allclose(np.asarray(x), res.x, atol=1e-7)
    assert float(info.value) <= res.fun + 1e-12
    x = np.asarray(x)
    grad_map = lip * np.max(np.abs(x - np.clip(x - (a @ x - b) / lip, LO, HI)))
    assert grad_map <= 1e-7


def test_gram_majoriser_is_c_AtA_plus_diag():
    """gram_majoriser(A, c, d) = c·AᵀA + diag(d) (numpy) for c ≠ 1; catches a dropped curvature factor."""
    rng = np.random.default_rng(5)
    a, d = rng.normal(size=(7, 4)), rng.uniform(0.1, 2.0, 4)
    got = np.asarray(gram_majoriser(jnp.asarray(a), 0.37, jnp.asarray(d)))
    np.testing.assert_allclose(got, 0.37 * a.T @ a + np.diag(d), rtol=1e-12, atol=1e-12)


def test_cholesky_inverse_and_spd_solve():
    """cholesky_inverse(M) is the lower-triangular L⁻¹ of numpy's Cholesky factor (L⁻¹ M L⁻ᵀ = I) and
    spd_solve(M, R) = numpy's solve; catches a transposed inverse and L⁻¹L⁻ᵀ in place of L⁻ᵀL⁻¹."""
    rng = np.random.default_rng(6)
    g = rng.normal(size=(5, 5))
    m, r = g @ g.T + 0.5 * np.eye(5), rng.normal(size=(5, 3))
    inv = np.asarray(cholesky_inverse(jnp.asarray(m)))
    np.testing.assert_allclose(inv, np.linalg.inv(np.linalg.cholesky(m)), rtol=1e-10, atol=1e-12)
    assert np.all(np.triu(inv, 1) == 0)
    np.testing.assert_allclose(inv @ m @ inv.T, np.eye(5), atol=1e-10)
    np.testing.assert_allclose(np.asarray(spd_solve(jnp.asarray(m), jnp.asarray(r))), np.linalg.solve(m, r),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("columns, applications, by_solves", [(2, 3, True), (3, 3, False), (9, 1, False),
                                                                (8, 1, True)])
def test_spd_solver_takes_the_route_its_rule_names_and_either_gives_numpys_solve(columns, applications, by_solves):
    """spd_solver(M, columns, applications) on a badly scaled SPD 9 × 9 M with jitter: triangular solves per call
    exactly when columns · applications < N (the jaxpr of a call holds them, or only a product), and either route
    gives numpy's (M + jitter·diag(M))⁻¹R (catches an equilibration applied on one side only, or a transposed
    solve: the factor is not symmetric)."""
    rng = np.random.default_rng(11)
    g = rng.normal(size=(9, 9))
    d = np.diag(np.logspace(-2, 2, 9))
    m = d @ (g @ g.T + 2.0 * np.eye(9)) @ d
    r = rng.normal(size=(9, columns))
    solve = spd_solver(jnp.asarray(m), columns, applications, jitter=1e-3)
    primitives = {e.primitive.name for e in jax.make_jaxpr(solve)(jnp.asarray(r)).jaxpr.eqns}
    assert ("triangular_solve" in primitives) == by_solves, primitives
    want = np.linalg.solve(m + 1e-3 * np.diag(np.diag(m)), r)
    np.testing.assert_allclose(np.asarray(solve(jnp.asarray(r))), want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
    np.testing.assert_allclose(np.asarray(solve(jnp.asarray(r[:, 0]))), want[:, 0], rtol=1e-9,  # a vector R too
                               atol=1e-12 * np.abs(want).max())


def test_cholesky_inverse_of_badly_scaled_and_nearly_singular_matrices_in_float32():
    """Equilibrated: M = DQD with diag(D) spanning 10⁻³..10³ (condition number ≈ 10¹³) gives L⁻ᵀL⁻¹ = M⁻¹ to float32
    accuracy (catches D applied on the wrong side). Jitter: a rank-deficient Gram matrix, whose plain float32
    factor is not finite, gives a finite factor, exactly that of M + jitter·diag(M) (larger than M: the factor
    of a majoriser stays that of one); `majoriser_jitter` is 10·n·ε."""
    rng = np.random.default_rng(8)
    g = rng.normal(size=(6, 6))
    q = g @ g.T + 6.0 * np.eye(6)  # well conditioned
    d = np.diag(np.logspace(-3, 3, 6))
    m = d @ q @ d
    inv = np.asarray(cholesky_inverse(jnp.asarray(m, jnp.float32)), np.float64)
    assert np.all(np.triu(inv, 1) == 0)
    np.testing.assert_allclose(inv @ m @ inv.T, np.eye(6), atol=1e-4)

    z = rng.normal(size=(40, 3)) @ rng.normal(size=(3, 8)) * 1e4  # rank 3, 8 columns
    gram = z.T @ z
    assert not np.all(np.isfinite(np.asarray(cholesky_inverse(jnp.asarray(gram, jnp.float32)))))
    jitter = majoriser_jitter(8, jnp.float32)
    assert jitter == pytest.approx(10 * 8 * np.finfo(np.float32).eps)
    inv = np.asarray(cholesky_inverse(jnp.asarray(gram, jnp.float32), jitter), np.float64)
    assert np.all(np.isfinite(inv))
    target = gram + jitter * np.diag(np.diag(gram))
    np.testing.assert_allclose(inv @ target @ inv.T, np.eye(8), atol=5e-2)
    inv64 = np.asarray(cholesky_inverse(jnp.asarray(gram), 1e-6))  # float64: exactly M + 10⁻⁶·diag(M)
    np.testing.assert_allclose(inv64 @ (gram + 1e-6 * np.diag(np.diag(gram))) @ inv64.T, np.eye(8), atol=1e-8)


def test_power_iteration_estimates_the_largest_eigenvalue():
    """power_iteration on a PSD matrix with λ₁/λ₂ = 4 returns λ_max (numpy's eigvalsh), not √λ_max or ‖v‖, and
    never more than it (a Rayleigh quotient)."""
    rng = np.random.default_rng(7)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    m = q @ np.diag([9.0, 2.25, 1.0, 0.5, 0.2, 0.0]) @ q.T
    est = float(power_iteration(lambda v: jnp.asarray(m) @ v, jnp.asarray(rng.normal(size=6)), iters=40))
    true = np.linalg.eigvalsh(m)[-1]
    assert est <= true * (1 + 1e-12)
    np.testing.assert_allclose(est, true, rtol=1e-10)
