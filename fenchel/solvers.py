"""Accelerated proximal gradient (FISTA) for composite convex problems.

Solves   min_x f(x) + g(x)
with f smooth (∇f L-Lipschitz) and g prox-friendly (an indicator gives the
projected-gradient method). The iteration, with gradient-based adaptive
restart (O'Donoghue & Candès 2015), is

    z_k     = prox_{g/L}(y_k − ∇f(y_k)/L)
    t_{k+1} = (1 + √(1 + 4 t_k²)) / 2,   β_k = (t_k − 1)/t_{k+1}
    y_{k+1} = z_k + β_k (z_k − x_k),     x_{k+1} = z_k
    restart (t = 1, β = 0) whenever ⟨y_k − z_k, z_k − x_k⟩ > 0.

The residual is the gradient-mapping norm ‖L(y_k − z_k)‖_∞, which is zero
exactly at a minimiser. The solve stops when it drops below `tol`, after
`max_steps`, or on a non-finite value, and says which (`Result`). On return,
the iterate is kept only where it does not increase f + g over the start
point, so every block update is monotone.

With `row_separable=True`, the leading axis of every leaf indexes independent
problems (one per data point or neuron): momentum, restart, residual and
stopping are per row, and converged rows are frozen. This is the "batched"
form; `jax.vmap(solver.run)` over rows with `row_separable=False` is the
"vmapped" form, and the two produce the same iterates.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

PyTree = Any


class Result(enum.IntEnum):
    """Why a solve stopped."""

    CONVERGED = 0
    MAX_STEPS = 1
    NONFINITE = 2


class Composite(NamedTuple):
    """A composite problem f + g.

    smooth: x ↦ f(x), a scalar, or per-row values of shape (rows,) when the
      solver is row-separable.
    prox: (z, s) ↦ argmin_x s·g(x) + ½‖x − z‖².
    nonsmooth: x ↦ g(x), same shape as `smooth`'s output.

    Optional geometry, for iterates held in a linear re-parametrisation of
    the true variable (e.g. W = a·W_anchor + Xᵀβ); all must then be those of
    the true variable, expressed in the representation:
    grad: x ↦ ∇f(x) (default: autodiff of `smooth`).
    inner: (x, y) ↦ ⟨x, y⟩ (default: the Euclidean inner product of the leaves).
    norm: x ↦ ‖x‖ used for the residual (default: max-abs, per row if row-separable).
    prox_warm: (z, s, w) ↦ (prox(z, s), w′) for an iterative prox (a root finder): w is what the previous
      call returned about the current iterate (its root), the search starts there and converges in a step or
      two near the solution, and w′ is the same about the answer. The solver carries w in its state.
    warm_start: x ↦ w for the start point (required with prox_warm).
    """

    smooth: Callable[[PyTree], jax.Array]
    prox: Callable[[PyTree, jax.Array], PyTree]
    nonsmooth: Callable[[PyTree], jax.Array]
    grad: Optional[Callable[[PyTree], PyTree]] = None
    inner: Optional[Callable[[PyTree, PyTree], jax.Array]] = None
    norm: Optional[Callable[[PyTree], jax.Array]] = None
    prox_warm: Optional[Callable[[PyTree, jax.Array, PyTree], tuple[PyTree, PyTree]]] = None
    warm_start: Optional[Callable[[PyTree], PyTree]] = None


class FISTAState(NamedTuple):
    x: PyTree  # current iterate (feasible)
    y: PyTree  # extrapolated point
    t: jax.Array  # momentum parameter, scalar or per row
    residual: jax.Array  # gradient-mapping norm at y, scalar or per row
    done: jax.Array  # converged flag, scalar or per row
    step: jax.Array  # iteration counter
    nonfinite: jax.Array  # a non-finite value was met
    warm: PyTree = None  # the iterative prox's data about x (`Composite.prox_warm`), else None


class SolveInfo(NamedTuple):
    result: jax.Array  # int Result code, per row when row-separable
    residual: jax.Array
    steps: jax.Array
    value: jax.Array  # f + g at the returned point


def _leaves(tree):
    return jax.tree_util.tree_leaves(tree)


@jax.custom_jvp
def row_sums(a: jax.Array) -> jax.Array:
    """Σ_j a[i, j…] for each leading index i, computed as the matrix–vector product A·1.

    The block objectives sum penalties and losses with it. On XLA:CPU a sum whose operand is an elementwise
    expression with constants in it (λ·(½relu(u)² − u·x)) becomes a YNNPACK reduction that first writes every
    constant out as a full array: 0.94 ms against 0.12 ms as this product, for a 100 × 28 × 28 × 6 array on two
    cores. (A plain product's sum, like FISTA's restart test, is fast either way and stays a reduction.) The
    derivative is that of the sum, a broadcast, so a gradient through it costs no product.
    """
    m = a.reshape(a.shape[0], -1)
    return jnp.matmul(m, jnp.ones((m.shape[1],), a.dtype), precision=jax.lax.Precision.HIGHEST)


@row_sums.defjvp
def _row_sums_jvp(primals, tangents):
    (a,), (t,) = primals, tangents
    return row_sums(a), jnp.sum(t.reshape(t.shape[0], -1), axis=1)


def _reduce(tree, fn_leaf, combine, rows: bool):
    """Reduce each leaf over all axes (or all but the leading one), then combine."""
    parts = []
    for leaf in _leaves(tree):
        if rows:
            parts.append(fn_leaf(leaf.reshape(leaf.shape[0], -1), axis=1))
        else:
            parts.append(fn_leaf(leaf))
    out = parts[0]
    for p in parts[1:]:
        out = combine(out, p)
    return out


def _select(mask, new, old, rows: bool):
    """where(mask, new, old) leafwise, mask broadcast along the leading axis."""

    def sel(n, o):
        m = mask.reshape(mask.shape + (1,) * (n.ndim - mask.ndim)) if rows else mask
        return jnp.where(m, n, o)

    return jax.tree_util.tree_map(sel, new, old)


def _axpy(a, x, y, rows: bool):
    """y + a·x leafwise, a per row when rows=True."""

    def f(xl, yl):
        aa = a.reshape(a.shape + (1,) * (xl.ndim - a.ndim)) if rows else a
        return yl + aa * xl

    return jax.tree_util.tree_map(f, x, y)


@dataclasses.dataclass(frozen=True)
class FISTA:
    """Accelerated proximal gradient with adaptive restart.

    Attributes:
      tol: stop when ‖L(y − z)‖_∞ ≤ tol (per row when row-separable).
      max_steps: iteration cap.
      restart: use gradient-based adaptive restart.
      row_separable: treat the leading axis as independent problems.
    """

    tol: float = 1e-6
    max_steps: int = 500
    restart: bool = True
    row_separable: bool = False

    def __post_init__(self):
        if not self.tol > 0:
            raise ValueError(f"tol must be positive, got {self.tol}")
        if int(self.max_steps) < 1:
            raise ValueError(f"max_steps must be ≥ 1, got {self.max_steps}")

    # ---------------------------------------------------------------- API
    def init(self, problem: Composite, x0: PyTree, lipschitz) -> FISTAState:
        del lipschitz
        if (problem.prox_warm is None) != (problem.warm_start is None):
            raise ValueError("Composite.prox_warm and Composite.warm_start go together: give both or neither")
        rows = self.row_separable
        shape = (_leaves(x0)[0].shape[0],) if rows else ()
        dtype = _leaves(x0)[0].dtype
        return FISTAState(
            x=x0,
            y=x0,
            t=jnp.ones(shape, dtype),
            residual=jnp.full(shape, jnp.inf, dtype),
            done=jnp.zeros(shape, bool),
            step=jnp.zeros((), jnp.int32),
            nonfinite=jnp.zeros((), bool),
            warm=None if problem.warm_start is None else problem.warm_start(x0),
        )

    def update(self, problem: Composite, state: FISTAState, lipschitz) -> FISTAState:
        rows = self.row_separable
        step_size = 1.0 / lipschitz
        if problem.grad is None:
            grad = jax.grad(lambda v: jnp.sum(problem.smooth(v)))(state.y)
        else:
            grad = problem.grad(state.y)
        forward = jax.tree_util.tree_map(lambda y, g: y - step_size * g, state.y, grad)
        if problem.prox_warm is None:
            z, warm = problem.prox(forward, step_size), None
        else:
            z, warm = problem.prox_warm(forward, step_size, state.warm)
        diff_yz = jax.tree_util.tree_map(jnp.subtract, state.y, z)
        if problem.norm is None:
            max_abs = lambda a, axis=None: jnp.max(jnp.abs(a), axis=axis)  # noqa: E731
            residual = lipschitz * _reduce(diff_yz, max_abs, jnp.maximum, rows)
        else:
            residual = lipschitz * problem.norm(diff_yz)
        t_next = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * state.t**2))
        beta = (state.t - 1.0) / t_next
        if self.restart:
            dz = jax.tree_util.tree_map(jnp.subtract, z, state.x)
            if problem.inner is None:
                inner = _reduce(
                    jax.tree_util.tree_map(jnp.multiply, diff_yz, dz),
                    lambda a, axis=None: jnp.sum(a, axis=axis),
                    jnp.add,
                    rows,
                )
            else:
                inner = problem.inner(diff_yz, dz)
            bad = inner > 0
            t_next = jnp.where(bad, 1.0, t_next)
            beta = jnp.where(bad, 0.0, beta)
        y_next = _axpy(beta, jax.tree_util.tree_map(jnp.subtract, z, state.x), z, rows)
        finite = jnp.all(jnp.isfinite(residual))
        # Freeze problems that had already converged.
        keep = state.done
        new_x = _select(keep, state.x, z, rows)
        new_warm = None if warm is None else _select(keep, state.warm, warm, rows)
        new_y = _select(keep, state.y, y_next, rows)
        new_t = jnp.where(keep, state.t, t_next)
        new_res = jnp.where(keep, state.residual, residual)
        done = keep | (new_res <= self.tol)
        return FISTAState(
            x=new_x,
            y=new_y,
            t=new_t,
            residual=new_res,
            done=done,
            step=state.step + 1,
            nonfinite=state.nonfinite | ~finite,
            warm=new_warm,
        )

    def iterate(self, problem: Composite, state: FISTAState, lipschitz) -> FISTAState:
        """`update` under `lax.while_loop` from `state` until every problem has converged, `state.step` reaches
        max_steps, or a non-finite value appears. A state whose first steps were taken otherwise (in closed form,
        say) resumes here with its step count, momentum and residual."""

        def cond(s):
            return (s.step < self.max_steps) & ~jnp.all(s.done) & ~s.nonfinite

        return jax.lax.while_loop(cond, lambda s: self.update(problem, s, lipschitz), state)

    def run(self, problem: Composite, x0: PyTree, lipschitz, value0=None) -> tuple[PyTree, SolveInfo]:
        """Minimise f + g from the feasible x0 with step 1/lipschitz.

        value0: f + g at x0 (per row when row-separable), when the caller has it more cheaply than an
        evaluation (e.g. in closed form); None evaluates it. The safeguard compares the result against it.
        """
        lipschitz = jnp.asarray(lipschitz, _leaves(x0)[0].dtype)
        state = self.iterate(problem, self.init(problem, x0, lipschitz), lipschitz)
        if value0 is None:
            value0 = problem.smooth(x0) + problem.nonsmooth(x0)
        value = problem.smooth(state.x) + problem.nonsmooth(state.x)
        better = jnp.isfinite(value) & (value <= value0)
        x = _select(better, state.x, x0, self.row_separable)
        value = jnp.where(better, value, value0)
        return x, SolveInfo(result=result_code(state), residual=state.residual, steps=state.step, value=value)


def result_code(state: FISTAState) -> jax.Array:
    """Why the iterations of `state` stopped (`Result`), per row when row-separable."""
    return jnp.where(
        state.nonfinite | ~jnp.isfinite(state.residual),
        Result.NONFINITE,
        jnp.where(state.done, Result.CONVERGED, Result.MAX_STEPS),
    ).astype(jnp.int32)


def gram_majoriser(a: jax.Array, curvature, diag: jax.Array) -> jax.Array:
    """c·AᵀA + diag(d): the metric of a proximal or majorised step for a linear layer with input matrix A.

    The lifted W blocks' `primal_mm` form (A = [Z 1], c the fit's curvature, d = μ) and ProxProp's exact
    step (A = [Z 1], c = 1, d = 1/τ_θ) both precondition with it.
    """
    return curvature * (a.T @ a) + jnp.diag(diag)


def _equilibrated_cholesky(m: jax.Array, jitter: float) -> tuple[jax.Array, jax.Array]:
    """(L_Q, d): Q + jitter·I = L_Q L_Qᵀ for Q = D⁻¹MD⁻¹, D = diag(d), d = diag(M)^½ (a zero entry taken as 1)."""
    d = jnp.sqrt(jnp.diag(m))
    d = jnp.where(d > 0, d, 1.0)
    eye = jnp.eye(m.shape[0], dtype=m.dtype)
    return jnp.linalg.cholesky(m / d[:, None] / d[None, :] + jitter * eye), d


def cholesky_inverse(m: jax.Array, jitter: float = 0.0) -> jax.Array:
    """L⁻¹ for the SPD M + jitter·diag(M) = LLᵀ, so that its inverse times R is two matrix products, L⁻ᵀ(L⁻¹R).

    L⁻¹ is formed explicitly (one triangular solve against I): the block solvers apply M⁻¹ once per iteration
    with the same M, and two triangular solves with many right-hand sides cost more than one product with M⁻¹
    (about 290 against 58 µs for N = 100 and 300 columns on the 2-core CPU, 2026-11-27; 20× more under two
    OpenBLAS threads earlier); with few right-hand sides in all the solves cost less (`spd_solver` chooses).
    The solve is XLᵀ = I (X = L⁻ᵀ, then transposed): on the CPU it takes 13–22% less time than LX = I with the
    factor and the product L⁻ᵀL⁻¹ included (N = 100, 300; docs/benchmarks.md, "The triangular solve's side").

    M is equilibrated first: with D = diag(M)^½, M = D Q D and Q (unit diagonal) is factored, so L = D L_Q and
    L⁻¹ = L_Q⁻¹D⁻¹, the same L in exact arithmetic (a zero diagonal entry is scaled by 1). jitter > 0 factors
    Q + jitter·I instead, i.e. M + jitter·diag(M) (plus jitter at a zero diagonal entry): larger than M, so the
    factor of a majoriser stays that of a majoriser, and, relative to each diagonal entry, it spares features
    of small scale. Q + jitter·I has a condition number of at most (1 + jitter)/jitter, so with
    `majoriser_jitter` a rank-deficient Gram matrix of nearly collinear inputs (saturated or constant features,
    raw scales of 10⁴) factors in float32 in practice, where M itself does not.
    """
    chol, d = _equilibrated_cholesky(m, jitter)
    eye = jnp.eye(m.shape[0], dtype=m.dtype)
    l_inv_t = jax.lax.linalg.triangular_solve(chol, eye, left_side=False, lower=True, transpose_a=True)
    return l_inv_t.T / d[None, :]


def spd_solver(m: jax.Array, columns: int, applications: int, jitter: float = 0.0) -> Callable[[jax.Array], jax.Array]:
    """R ↦ M⁻¹R (M + jitter·diag(M) in place of M, equilibrated as in `cholesky_inverse`) for `applications` calls
    with R of `columns` columns, by whichever of two routes costs less on the CPU:
    - few right-hand sides in all (columns · applications < N): two triangular solves with the factor per call,
      M⁻¹R = D⁻¹L_Q⁻ᵀ(L_Q⁻¹(D⁻¹R));
    - otherwise: M⁻¹ = L⁻ᵀL⁻¹ formed once (`cholesky_inverse`), then one product per call.
    The cost of both crosses near columns · applications ≈ N (N = 100, 2026-11-27; docs/benchmarks.md, "Few
    right-hand sides"): a 10-class output layer's W block at one W iteration, 45–48 against 100 µs.
    """
    if int(columns) * int(applications) < m.shape[0]:
        chol, d = _equilibrated_cholesky(m, jitter)

        def solve(r):
            d_r = d.reshape((-1,) + (1,) * (r.ndim - 1))  # D along R's rows, for a vector or a matrix R
            z = jax.lax.linalg.triangular_solve(chol, (r / d_r).reshape(r.shape[0], -1), left_side=True, lower=True)
            z = jax.lax.linalg.triangular_solve(chol, z, left_side=True, lower=True, transpose_a=True)
            return z.reshape(r.shape) / d_r

        return solve
    l_inv = cholesky_inverse(m, jitter)
    m_inv = l_inv.T @ l_inv
    return lambda r: m_inv @ r


def majoriser_jitter(n: int, dtype) -> float:
    """10·n·ε of the dtype: a relative diagonal increment with which a Cholesky factorisation of an n × n Gram
    matrix in that precision succeeds in practice (2.5·10⁻⁵ for n = 21 in float32; 5·10⁻¹⁴ in float64; the
    worst-case bound is of order n²ε), and that changes an MM step by about as much."""
    return 10.0 * n * float(jnp.finfo(dtype).eps)


def spd_solve(m: jax.Array, r: jax.Array) -> jax.Array:
    """M⁻¹R for an SPD M (`cholesky_inverse`)."""
    inv = cholesky_inverse(m)
    return inv.T @ (inv @ r)


def power_iteration(matvec: Callable, v0: jax.Array, iters: int = 20) -> jax.Array:
    """Estimate λ_max of the PSD operator `matvec` (Rayleigh quotient, lower bound)."""

    def normalise(v):
        return v / jnp.maximum(jnp.linalg.norm(v.ravel()), 1e-30)

    def body(_, v):
        return normalise(matvec(v))

    v = jax.lax.fori_loop(0, iters, body, normalise(v0))
    return jnp.vdot(v, matvec(v)).real
