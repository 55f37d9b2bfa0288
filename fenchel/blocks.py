"""Convex block subproblems of lifted BCD, each solved by FISTA.

Every block is generic over the layer spec (`fenchel.layers`) and its linear
map A(X; W): gradients come from autodiff and Lipschitz constants from power
iteration on AᵀA with adjoints from `jax.vjp`, so no transpose is written by
hand. Per-sample state keeps the sample axis leading.

Blocks (P = F(u) + G(v) − c·u·v is the penalty, see `penalties`):
  X hidden:  min_X  λ_{l−1} Σ P(U_{l−1}, X) + κ λ_l Σ P(A(X; W_l) + b_l, X_{l+1})
  X last:    min_X  κ Σ loss(Y, A(X; W_L) + b_L) + λ_{L−1} Σ P(U_{L−1}, X)
  W hidden:  min_{W,b} (λ_l/N) Σ P(A(X_l; W) + b, X_{l+1}) + ρ_l‖W‖² + ρ'‖(W, b) − anchor‖²
  W output:  min_{W,b} (1/N) Σ loss(Y, A(X_L; W) + b) + ρ_L‖W‖² + ρ'‖(W, b) − anchor‖²
With a multi-branch head (`fenchel.heads`) the output layer has K·C columns and
the loss is taken on the merged logits (A(X_L; W) + b) M, M fixed during the
solve (`merge=` of the X-last and W-out blocks): still convex in X and in W.
κ = `lbd_coef` (1 gives exact BCD). X blocks separate over samples: they are
written per sample (sums over features) and so are solved either batched
(one FISTA over the matrix, per-row momentum and stopping) or vmapped.

W blocks are solved in one of the forms of `W_SOLVERS` (one function each),
chosen by the layer spec (`spec.w_form`): "primal" FISTA on (W, b),
"primal_mm" FISTA on (W, b) preconditioned by the exact patch-matrix
majoriser (the convolution default), "kernel" FISTA in the representation
W = a·W_0 + c·W_a + Xᵀβ (dense, N ≤ n_in), and "kernel_mm", that
representation in the metric of a quadratic majoriser.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fenchel.lifted import loss_curvature, loss_per_sample, preactivation
from fenchel.penalties import Penalty
from fenchel.solvers import (
    FISTA,
    Composite,
    FISTAState,
    Result,
    SolveInfo,
    cholesky_inverse,
    gram_majoriser,
    majoriser_jitter,
    power_iteration,
    result_code,
    row_sums,
    spd_solver,
)

X_MODES = ("batched", "vmap")
_MIN_LIPSCHITZ = 1e-8


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """Stopping rule of one block solve: residual ≤ tol, or max_steps iterations.

    tol and max_steps have no defaults here: `LiftedConfig` owns them.

    The residual is the norm of the gradient mapping: max-abs per sample for X
    blocks (each sample stops on its own), Frobenius for W blocks in the
    primal and kernel forms, ‖∇f‖_{P⁻¹} in the kernel_mm form. Lipschitz
    constants come from `power_iters` power iterations times
    `lipschitz_margin` (power iteration approaches λ_max from below).

    chunk_bytes (batched X blocks): solve the rows in consecutive chunks of about this many bytes of X
    (`lax.map` over chunks, each its own FISTA loop) instead of all at once; 0 solves all rows at once. The rows
    are independent problems with per-row momentum, restart and stopping, so the iterates are the same; what
    changes is that each chunk's loop state stays in cache (`LiftedConfig.x_chunk_bytes`).
    """

    tol: float
    max_steps: int
    power_iters: int = 20
    lipschitz_margin: float = 1.05
    chunk_bytes: int = 0

    def __post_init__(self):
        if not self.tol > 0:
            raise ValueError(f"tol must be positive, got {self.tol}")
        if int(self.max_steps) < 1:
            raise ValueError(f"max_steps must be ≥ 1, got {self.max_steps}")
        if int(self.power_iters) < 1:
            raise ValueError(f"power_iters must be ≥ 1, got {self.power_iters}")
        if not self.lipschitz_margin >= 1.0:
            raise ValueError(f"lipschitz_margin must be ≥ 1, got {self.lipschitz_margin}")
        if int(self.chunk_bytes) < 0:
            raise ValueError(f"chunk_bytes must be ≥ 0, got {self.chunk_bytes}")


def _largest(lam):
    """max_j λ_j of per-neuron multipliers; a scalar λ as it is (a Python float keeps its weak type)."""
    return lam if jnp.ndim(lam) == 0 else jnp.max(lam)


def _sq_norm(tree) -> jax.Array:
    return optax.tree_utils.tree_norm(tree, squared=True)


def _random_start(shape, dtype) -> jax.Array:
    """A fixed Gaussian start for power iteration: almost surely not orthogonal to the top eigenvector
    (an all-ones start is an exact eigenvector of some structured operators, e.g. K + 11ᵀ for a centred batch)."""
    return jax.random.normal(jax.random.PRNGKey(0), shape, dtype)


EXACT_GRAM_MAX = 128  # dense layers with a side this small get an exact eigvalsh


def input_operator_norm_sq(spec, kernel, sample_shape, iters: int) -> jax.Array:
    """‖A(·; W)‖₂² for one sample: λ_max(AᵀA) by power iteration, Aᵀ from vjp.

    A dense layer with a side ≤ EXACT_GRAM_MAX gets λ_max of its small Gram
    matrix exactly instead (divided by pool², a bound when its input is pooled).
    """
    if spec.kind == "dense" and min(kernel.shape) <= EXACT_GRAM_MAX:
        small = kernel.T @ kernel if kernel.shape[1] <= kernel.shape[0] else kernel @ kernel.T
        # Average pooling by p is P with PPᵀ = I/p², so ‖W P‖² ≤ ‖W‖²/p² (exact without pooling).
        return jnp.linalg.eigvalsh(small)[-1] / spec.pool**2

    def matvec(v):
        out, vjp = jax.vjp(lambda z: spec.linear_map(z, kernel), v)
        return vjp(out)[0]

    return power_iteration(matvec, _random_start((1, *sample_shape), kernel.dtype), iters)


def weight_operator_norm_sq(spec, x_in, kernel, iters: int) -> jax.Array:
    """‖(W, b) ↦ A(X; W) + b‖₂², i.e. λ_max([X 1]ᵀ[X 1]) for a dense layer.

    The operator acts on each output neuron alike, so one output column is
    enough; its adjoint comes from vjp.
    """
    k_shape = kernel.shape[:-1] + (1,)
    k_size = 1
    for d in k_shape:
        k_size *= d

    def apply(p):
        return spec.linear_map(x_in, p[0]) + p[1]

    def flat_matvec(v):
        p = (v[:-1].reshape(k_shape), v[-1:])
        out, vjp = jax.vjp(apply, p)
        gk, gb = vjp(out)[0]
        return jnp.concatenate([gk.ravel(), gb.ravel()])

    return power_iteration(flat_matvec, _random_start((k_size + 1,), kernel.dtype), iters)


# ---------------------------------------------------------------- X blocks
def _x_problem(penalty: Penalty, lam_prev, downstream: Callable) -> Callable:
    """Row data (U_prev, extra) ↦ the X block Σ λ_prev P(U_prev, X) + downstream(X, extra), per row.

    Σ λ_prev P(U_prev, X) = Σ λ_prev [G(X) − c·U_prev·X] + const: the G part is the
    prox-friendly term, the coupling joins the smooth part. λ_prev is a scalar or
    one value per neuron (broadcast over X's last axis, its features or channels).
    An iterative prox (sigmoid, tanh) runs warm: FISTA carries its root from call to call.
    """
    c = penalty.coupling
    warm = penalty.prox_G_warm

    def problem(rows):
        u_p, extra = rows
        return Composite(
            smooth=lambda z: downstream(z, extra) - c * row_sums(lam_prev * u_p * z),
            prox=lambda z, s: penalty.prox_G(z, s * lam_prev),
            prox_warm=None if warm is None else lambda z, s, t: warm(z, s * lam_prev, t),
            warm_start=None if warm is None else penalty.prox_G_start,
            nonsmooth=lambda z: row_sums(lam_prev * penalty.G(z)),
        )

    return problem


def _in_row_chunks(solve: Callable, rows, chunk: int):
    """solve(rows) → (x, row-separable SolveInfo), computed on consecutive chunks of `chunk` rows in turn
    (`lax.map`; the remainder rows in one more solve) and joined: per-row fields concatenated, steps the most."""
    n = jax.tree_util.tree_leaves(rows)[0].shape[0]
    if chunk >= n:
        return solve(rows)
    k = n // chunk
    m = k * chunk
    x, info = jax.lax.map(solve, jax.tree_util.tree_map(lambda a: a[:m].reshape((k, chunk) + a.shape[1:]), rows))
    steps = jnp.max(info.steps)
    x, per_row = jax.tree_util.tree_map(lambda a: a.reshape((m,) + a.shape[2:]), (x, info._replace(steps=None)))
    if m < n:
        x_rest, info_rest = solve(jax.tree_util.tree_map(lambda a: a[m:], rows))
        steps = jnp.maximum(steps, info_rest.steps)
        x, per_row = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), (x, per_row),
                                            (x_rest, info_rest._replace(steps=None)))
    return x, per_row._replace(steps=steps)


def _solve_rows(problem_fn, x_init, lipschitz, cfg: SolverConfig, mode: str):
    """Solve a row-separable problem batched or vmapped over rows.

    problem_fn(row_data) builds a Composite whose functions take (rows, ...)
    arrays; x_init = (start point, *row_data), all with rows leading.
    """
    if mode == "batched":
        solver = FISTA(cfg.tol, cfg.max_steps, row_separable=True)
        row_bytes = x_init[0][0].size * x_init[0].dtype.itemsize
        chunk = max(1, cfg.chunk_bytes // row_bytes) if cfg.chunk_bytes else x_init[0].shape[0]
        return _in_row_chunks(lambda rows: solver.run(problem_fn(rows[1:]), rows[0], lipschitz), x_init, chunk)
    if mode == "vmap":
        solver = FISTA(cfg.tol, cfg.max_steps, row_separable=False)

        def one(*row):
            row = tuple(r[None] for r in row)  # a batch of one row
            prob = problem_fn(row[1:])
            scalar = prob._replace(smooth=lambda x: prob.smooth(x)[0], nonsmooth=lambda x: prob.nonsmooth(x)[0])
            x, info = solver.run(scalar, row[0], lipschitz)
            return x[0], info

        x, info = jax.vmap(one)(*x_init)
        return x, SolveInfo(info.result, info.residual, jnp.max(info.steps), info.value)
    raise ValueError(f"unknown x solve mode {mode!r}; known: {', '.join(X_MODES)}")


def solve_x_hidden(
    penalty: Penalty,
    x: jax.Array,
    u_prev: jax.Array,
    next_spec,
    next_layer: dict,
    x_next: jax.Array,
    lam_prev: float,
    lam_next: float,
    cfg: SolverConfig,
    mode: str = "batched",
) -> tuple[jax.Array, SolveInfo]:
    """argmin_X Σ λ_prev P(U_prev, X) + Σ λ_next P(A(X; W) + b, X_next) (λ_next includes κ).

    Each λ is a scalar or one value per neuron of its layer (per-neuron multipliers); the
    Lipschitz bound then takes the largest λ_next.
    """

    def downstream(z, x_n):
        return row_sums(lam_next * penalty.smooth_u(preactivation(next_spec, next_layer, z), x_n))

    op = input_operator_norm_sq(next_spec, next_layer["kernel"], x.shape[1:], cfg.power_iters)
    lip = jnp.maximum(cfg.lipschitz_margin * _largest(lam_next) * penalty.curvature_u * op, _MIN_LIPSCHITZ)
    return _solve_rows(_x_problem(penalty, lam_prev, downstream), (penalty.project(x), u_prev, x_next), lip, cfg,
                       mode)


def solve_x_last(
    penalty: Penalty,
    x: jax.Array,
    u_prev: jax.Array,
    out_spec,
    out_layer: dict,
    y: jax.Array,
    lam_prev: float,
    loss: str,
    cfg: SolverConfig,
    mode: str = "batched",
    loss_weight: float = 1.0,
    merge: Optional[jax.Array] = None,
) -> tuple[jax.Array, SolveInfo]:
    """argmin_X κ Σ loss(Y, (A(X; W_L) + b_L) M) + λ_prev Σ P(U_prev, X).

    merge: M ∈ R^{KC×C} of a multi-branch head (`fenchel.heads`; None: M = I). A dense layer's map is linear
    in W column by column, so (A(X; W) + b) M = A(X; W M) + b M: the block is the plain one for the merged
    layer (W M, b M), with its operator norm.
    """
    if merge is not None:
        out_layer = {"kernel": out_layer["kernel"] @ merge, "bias": out_layer["bias"] @ merge}
        out_spec = dataclasses.replace(out_spec, features=merge.shape[1])

    def downstream(z, yy):
        return loss_weight * loss_per_sample(loss, yy, preactivation(out_spec, out_layer, z))

    op = input_operator_norm_sq(out_spec, out_layer["kernel"], x.shape[1:], cfg.power_iters)
    lip = jnp.maximum(cfg.lipschitz_margin * loss_weight * loss_curvature(loss) * op, _MIN_LIPSCHITZ)
    return _solve_rows(_x_problem(penalty, lam_prev, downstream), (penalty.project(x), u_prev, y), lip, cfg, mode)


# ---------------------------------------------------------------- W blocks
class WBlock(NamedTuple):
    """min_{W,b} fit(A(X; W) + b) + ρ‖W‖² + ρ'‖(W, b) − anchor‖².

    fit: U ↦ scalar, convex with ∇² ⪯ fit_curvature·I in U. anchor None: no
    proximal term. anchor_is_start: the anchor equals the start point (the
    first round of a minibatch), which saves products in the kernel forms.
    """

    spec: Any
    fit: Callable
    fit_curvature: Any
    layer: dict
    x_in: jax.Array
    rho: Any
    anchor: Optional[dict]
    rho_prox: Any
    anchor_is_start: bool = False

    @property
    def mu(self):
        """Curvature of the regulariser + proximal term: 2(ρ + ρ')."""
        return _w_curvature(self.rho, self.rho_prox, self.anchor is not None)

    def objective(self, p):
        val = self.fit(preactivation(self.spec, p, self.x_in)) + self.rho * _sq_norm(p["kernel"])
        if self.anchor is not None:
            val = val + self.rho_prox * _sq_norm(jax.tree_util.tree_map(jnp.subtract, p, self.anchor))
        return val


def _w_curvature(rho, rho_prox, has_anchor: bool):
    """μ = 2(ρ + ρ') of a W block, ρ' counted only with an anchor (no proximal term without one)."""
    return 2.0 * (rho + (rho_prox if has_anchor else 0.0))


def _frobenius(tree) -> jax.Array:
    return jnp.sqrt(_sq_norm(tree))


def solve_w_primal(block: WBlock, cfg: SolverConfig) -> tuple[dict, SolveInfo]:
    """FISTA on (W, b) with L = margin·c_f·‖[X 1]‖² + μ; the residual is the Frobenius gradient-mapping norm."""
    op = weight_operator_norm_sq(block.spec, block.x_in, block.layer["kernel"], cfg.power_iters)
    lip = jnp.maximum(cfg.lipschitz_margin * block.fit_curvature * op + block.mu, _MIN_LIPSCHITZ)
    problem = Composite(smooth=block.objective, prox=lambda z, s: z, nonsmooth=lambda z: 0.0, norm=_frobenius)
    return FISTA(cfg.tol, cfg.max_steps).run(problem, block.layer, lip)


class _KernelRep:
    """W = a·W_0 + c·W_a + Xᵀβ for a dense layer with N ≤ n_in (W_0 the start, W_a the anchor).

    The gradient Xᵀg + 2ρW + 2ρ'(W − W_a) keeps every FISTA iterate in this
    set, so each iteration costs N×N products instead of N×n_in ones. The
    representation also carries kβ = Kβ (K = XXᵀ): every FISTA operation is
    linear, so the invariant holds and one K product per iteration suffices.
    """

    def __init__(self, block: WBlock):
        x = block.spec.patches(block.x_in)
        self.x = x
        self.w0, self.b0 = block.layer["kernel"], block.layer["bias"]
        has_anchor = block.anchor is not None
        self.wa = block.anchor["kernel"] if has_anchor else jnp.zeros_like(self.w0)
        self.ba = block.anchor["bias"] if has_anchor else jnp.zeros_like(self.b0)
        self.gram = x @ x.T
        self.x_w0 = x @ self.w0
        if block.anchor_is_start:  # W_a = W_0: skip one N×n_in product and two inner products
            self.x_wa = self.x_w0
            self.g00 = self.g0a = self.gaa = jnp.sum(self.w0 * self.w0)
        else:
            self.x_wa = x @ self.wa
            self.g00, self.g0a, self.gaa = (jnp.sum(self.w0 * self.w0), jnp.sum(self.w0 * self.wa),
                                            jnp.sum(self.wa * self.wa))

    def start(self):
        beta0 = jnp.zeros((self.x.shape[0], self.w0.shape[-1]), self.w0.dtype)
        return {"a": jnp.ones((), self.w0.dtype), "c": jnp.zeros((), self.w0.dtype), "beta": beta0, "kbeta": beta0,
                "b": self.b0}

    def w_inner(self, p, q):
        """⟨W_p, W_q⟩ = a_p a_q‖W_0‖² + (a_p c_q + c_p a_q)⟨W_0, W_a⟩ + c_p c_q‖W_a‖² + a_p⟨XW_0, β_q⟩
        + a_q⟨XW_0, β_p⟩ + c_p⟨XW_a, β_q⟩ + c_q⟨XW_a, β_p⟩ + ⟨β_p, Kβ_q⟩.

        Every reduction is a plain inner product with the scalars applied outside it: on the CPU a scalar
        inside a fused reduction is materialised as a full array first. For p = q (a norm) the repeated
        products are computed once.
        """
        x_w0_q, x_wa_q = jnp.sum(self.x_w0 * q["beta"]), jnp.sum(self.x_wa * q["beta"])
        if p is q:
            x_w0_p, x_wa_p = x_w0_q, x_wa_q
        else:
            x_w0_p, x_wa_p = jnp.sum(self.x_w0 * p["beta"]), jnp.sum(self.x_wa * p["beta"])
        return (p["a"] * q["a"] * self.g00 + (p["a"] * q["c"] + p["c"] * q["a"]) * self.g0a
                + p["c"] * q["c"] * self.gaa + p["a"] * x_w0_q + q["a"] * x_w0_p + p["c"] * x_wa_q
                + q["c"] * x_wa_p + jnp.sum(p["beta"] * q["kbeta"]))

    def inner(self, p, q):
        """⟨(W_p, b_p), (W_q, b_q)⟩."""
        return self.w_inner(p, q) + jnp.sum(p["b"] * q["b"])

    def preactivation(self, p):
        """U = XW + 1bᵀ."""
        return p["a"] * self.x_w0 + p["c"] * self.x_wa + p["kbeta"] + p["b"]

    def objective(self, block: WBlock, p):
        val = block.fit(self.preactivation(p)) + block.rho * self.w_inner(p, p)
        if block.anchor is not None:
            d = {**p, "c": p["c"] - 1.0, "b": p["b"] - self.ba}  # (W, b) − anchor
            val = val + block.rho_prox * self.inner(d, d)
        return val

    def start_objective(self, block: WBlock):
        """The objective at the start (W_0, b_0), in closed form: fit(XW_0 + 1b_0ᵀ) + ρ‖W_0‖²
        + ρ'(‖W_0‖² − 2⟨W_0, W_a⟩ + ‖W_a‖² + ‖b_0 − b_a‖²)."""
        val = block.fit(self.x_w0 + self.b0) + block.rho * self.g00
        if block.anchor is not None:
            val = val + block.rho_prox * (self.g00 - 2.0 * self.g0a + self.gaa + _sq_norm(self.b0 - self.ba))
        return val

    def params(self, p) -> dict:
        return {"kernel": p["a"] * self.w0 + p["c"] * self.wa + self.x.T @ p["beta"], "bias": p["b"]}


def _check_dense(block: WBlock, form: str):
    if block.spec.kind != "dense":
        raise ValueError(f"w_mode={form!r} needs a dense layer, got {block.spec.kind!r}")


def solve_w_kernel(block: WBlock, cfg: SolverConfig) -> tuple[dict, SolveInfo]:
    """FISTA in the kernel representation; the same iterates as `solve_w_primal` (with exact L)."""
    _check_dense(block, "kernel")
    rep = _KernelRep(block)
    mu, rp = block.mu, block.rho_prox if block.anchor is not None else 0.0

    def grad(p):
        g = jax.grad(block.fit)(rep.preactivation(p))
        return {"a": mu * p["a"], "c": mu * p["c"] - 2.0 * rp, "beta": g + mu * p["beta"],
                "kbeta": rep.gram @ g + mu * p["kbeta"], "b": jnp.sum(g, axis=0) + 2.0 * rp * (p["b"] - rep.ba)}

    # λ_max([X 1][X 1]ᵀ) = λ_max(K + 11ᵀ), exactly (the matrix is N×N)
    op = jnp.linalg.eigvalsh(rep.gram + 1.0)[-1]
    lip = jnp.maximum(cfg.lipschitz_margin * block.fit_curvature * op + mu, _MIN_LIPSCHITZ)
    problem = Composite(smooth=lambda p: rep.objective(block, p), prox=lambda z, s: z, nonsmooth=lambda z: 0.0,
                        grad=grad, inner=rep.inner, norm=lambda p: jnp.sqrt(jnp.maximum(rep.inner(p, p), 0.0)))
    out, info = FISTA(cfg.tol, cfg.max_steps).run(problem, rep.start(), lip, rep.start_objective(block))
    return rep.params(out), info


def solve_w_kernel_mm(block: WBlock, cfg: SolverConfig) -> tuple[dict, SolveInfo]:
    """Newton-type FISTA in the metric of the majoriser P = c·ZᵀZ + μI ⪰ ∇²(objective), Z = [X 1].

    Steps z = y − P⁻¹∇f(y), with P⁻¹ = (I − Zᵀ(μ/c·I + ZZᵀ)⁻¹Z)/μ from one N×N
    Cholesky factor. Exact on the quadratic part. c = max(c_f, 1e-12·μ): any
    c ≥ c_f gives a valid majoriser, so λ = 0 (c_f = 0, a pure quadratic)
    is solved too. The residual is ‖∇f(y)‖_{P⁻¹}. Like every block, the
    returned point never has a higher objective than the start (the FISTA
    safeguard); the accelerated steps themselves are not monotone.

    The part of W orthogonal to the rows of X enters only ρ‖W‖² + ρ'‖W − W_a‖², whose curvature is μ, so
    every step puts it at its minimiser: after the first step every iterate is W = c*·W_a + Xᵀβ with
    c* = 2ρ'/μ (0 without an anchor). The first step is taken in closed form from the start
    W_0 = 1·W_0 + 0·W_a + Xᵀ0 (its momentum is 0); FISTA then goes on in (β, Kβ, b), whose P-inner
    products of differences are μ(⟨β_p, Kβ_q⟩ + ⟨b_p, b_q⟩) + c⟨Kβ_p + 1b_p, Kβ_q + 1b_q⟩: the same iterates
    with three leaves instead of five and two reductions per inner product instead of seven.
    """
    _check_dense(block, "kernel_mm")
    rep = _KernelRep(block)
    mu, rp = block.mu, block.rho_prox if block.anchor is not None else 0.0
    curv = jnp.maximum(block.fit_curvature, 1e-12 * mu)
    # With S = ZZᵀ + sI, s = μ/c: P⁻¹∇ = (∇ − Zᵀq)/μ, q = S⁻¹Z∇. Writing
    # Z∇ = (ZZᵀ)g + r' and using ZZᵀS⁻¹ = I − sS⁻¹ leaves one product per
    # step: d = g − q = S⁻¹(s·g − r'), and K·d = s·g − r' − s·d − 1(1ᵀd).
    shift = mu / curv
    eye = jnp.eye(rep.x.shape[0], dtype=rep.w0.dtype)
    # S⁻¹ is applied once per step (the first, closed-form one included) to N × n_out right-hand sides
    s_inv = spd_solver(rep.gram + 1.0 + shift * eye, rep.w0.shape[-1], cfg.max_steps)
    c_star = 2.0 * rp / mu  # the W_a coefficient of every iterate after the first step

    def step_parts(g, r_prime):
        """d = S⁻¹(s·g − r') and K·d, for the fit gradient g and r' = Z(∇f − Zᵀg)."""
        rhs = shift * g - r_prime
        d = s_inv(rhs)
        d_sum = jnp.sum(d, axis=0)
        return d, rhs - shift * d - d_sum, d_sum

    # ---- the first step, from (a, c, β, Kβ, b) = (1, 0, 0, 0, b_0): z = (0, c*, −d/μ, −Kd/μ, b_0 − (r_b + 1ᵀd)/μ)
    b_prox0 = 2.0 * rp * (rep.b0 - rep.ba)
    d, k_d, d_sum = step_parts(jax.grad(block.fit)(rep.x_w0 + rep.b0),
                               mu * rep.x_w0 - 2.0 * rp * rep.x_wa + b_prox0)
    first = {"beta": -d / mu, "kbeta": -k_d / mu, "b": rep.b0 - (b_prox0 + d_sum) / mu}
    # its residual ‖δ‖_P, δ = P⁻¹∇f(start): W_δ = V + Xᵀd/μ with V = W_0 − c*·W_a, b_δ = (r_b + 1ᵀd)/μ. ‖V‖² is
    # formed from V itself: ‖W_0‖² − 2c*⟨W_0, W_a⟩ + c*²‖W_a‖² cancels catastrophically when c* ≈ 1 and W_a = W_0.
    if block.anchor_is_start:
        v_sq = (1.0 - c_star) ** 2 * rep.g00
    else:
        v_sq = _sq_norm(rep.w0 - c_star * rep.wa)
    x_v = rep.x_w0 - c_star * rep.x_wa  # XV
    b_delta = (b_prox0 + d_sum) / mu
    w_sq = v_sq + 2.0 * jnp.sum(x_v * d) / mu + jnp.sum(d * k_d) / mu**2
    u_delta = x_v + k_d / mu + b_delta
    residual_sq = mu * (w_sq + jnp.sum(b_delta * b_delta)) + curv * jnp.sum(row_sums(u_delta * u_delta))
    residual = jnp.sqrt(jnp.maximum(residual_sq, 0.0))

    # ---- the following steps in θ = (β, Kβ, b), W = c*·W_a + Xᵀβ
    x_anchor = c_star * rep.x_wa  # X(c*·W_a), 0 without an anchor

    def preactivation(th):
        return x_anchor + th["kbeta"] + th["b"]

    def precond_grad(th):
        b_prox = 2.0 * rp * (th["b"] - rep.ba)
        d, k_d, d_sum = step_parts(jax.grad(block.fit)(preactivation(th)), mu * th["kbeta"] + b_prox)
        return {"beta": th["beta"] + d / mu, "kbeta": th["kbeta"] + k_d / mu, "b": (b_prox + d_sum) / mu}

    def inner_p(p, q):  # ⟨p, q⟩_P of two differences of iterates (their W_0 and W_a coefficients are 0)
        u_p, u_q = p["kbeta"] + p["b"], q["kbeta"] + q["b"]
        return (mu * (jnp.sum(p["beta"] * q["kbeta"]) + jnp.sum(p["b"] * q["b"]))
                + curv * jnp.sum(row_sums(u_p * u_q)))

    def objective(th):
        """fit + ρ‖W‖² + ρ'(‖W − W_a‖² + ‖b − b_a‖²) at W = c*·W_a + Xᵀβ: `_KernelRep.objective` at a = 0, without
        its two ⟨XW_0, β⟩ reductions (calling it costs 2–3% of a default minibatch step)."""
        wa_beta, beta_kbeta = jnp.sum(rep.x_wa * th["beta"]), jnp.sum(th["beta"] * th["kbeta"])
        val = block.fit(preactivation(th)) + block.rho * (c_star**2 * rep.gaa + 2.0 * c_star * wa_beta + beta_kbeta)
        if block.anchor is not None:
            val = val + block.rho_prox * ((c_star - 1.0)**2 * rep.gaa + 2.0 * (c_star - 1.0) * wa_beta + beta_kbeta
                                          + _sq_norm(th["b"] - rep.ba))
        return val

    problem = Composite(smooth=objective, prox=lambda z, s: z, nonsmooth=lambda z: 0.0, grad=precond_grad,
                        inner=inner_p, norm=lambda p: jnp.sqrt(jnp.maximum(inner_p(p, p), 0.0)))
    solver = FISTA(cfg.tol, cfg.max_steps)
    dtype = rep.w0.dtype
    # FISTA's state after that step: x = y = z (its momentum β = 0), t = (1 + √5)/2 (the update of t = 1), step 1
    state = FISTAState(x=first, y=first, t=jnp.asarray(0.5 * (1.0 + 5.0**0.5), dtype), residual=residual,
                       done=residual <= cfg.tol, step=jnp.ones((), jnp.int32), nonfinite=~jnp.isfinite(residual))
    state = solver.iterate(problem, state, 1.0)
    # the safeguard: keep the start unless the result is no worse
    value0, value = rep.start_objective(block), objective(state.x)
    better = jnp.isfinite(value) & (value <= value0)
    out = {"kernel": c_star * rep.wa + rep.x.T @ state.x["beta"], "bias": state.x["b"]}
    out = jax.tree_util.tree_map(lambda new, old: jnp.where(better, new, old), out, block.layer)
    info = SolveInfo(result=result_code(state), residual=state.residual, steps=state.step,
                     value=jnp.where(better, value, value0))
    return out, info


def solve_w_primal_mm(block: WBlock, cfg: SolverConfig) -> tuple[dict, SolveInfo]:
    """FISTA on (W, b) in the metric of the majoriser P = c·Z̃ᵀZ̃ + diag(μ_W, …, μ_W, μ_b) ⪰ ∇²(objective).

    Z̃ = [Z 1] is the layer's patch matrix (`spec.patches`: one row per sample ×
    output position, k²C_in + 1 columns for a convolution), so P is small and
    one Cholesky factor per solve gives P⁻¹ exactly: steps z = y − P⁻¹∇f(y),
    the same P for every output unit. μ_W = 2(ρ + ρ'), μ_b = 2ρ'; c is the
    fit's curvature bound, raised to a tiny multiple of P's scale where needed
    so P stays positive definite (a larger majoriser is still a majoriser), and P is taken as
    P + δ·diag(P), δ = `majoriser_jitter` (10·n·ε: nothing in float64), so that float32 can factor it.
    The residual is ‖∇f(y)‖_{P⁻¹}.
    """
    spec, layer = block.spec, block.layer
    z = spec.patches(block.x_in)
    z1 = jnp.concatenate([z, jnp.ones((z.shape[0], 1), z.dtype)], axis=1)
    rp = block.rho_prox if block.anchor is not None else 0.0
    mu = jnp.concatenate([jnp.full((z.shape[1],), 2.0 * (block.rho + rp), z.dtype), jnp.full((1,), 2.0 * rp, z.dtype)])
    p_mat = gram_majoriser(z1, block.fit_curvature, mu)  # the metric of ProxProp's exact step, too
    p_mat = p_mat + 1e-10 * (jnp.trace(p_mat) / p_mat.shape[0] + 1e-30) * jnp.eye(p_mat.shape[0], dtype=z.dtype)
    # P⁻¹R = L⁻ᵀ(L⁻¹R), two products per iteration; L is the factor of P + δ·diag(P), δ = 10·n·ε, a majoriser too,
    # which float32 can factor when inputs are nearly collinear (saturated or constant features, raw scales).
    # The steps, the restart test and the residual all use that one metric.
    jitter = majoriser_jitter(p_mat.shape[0], z.dtype)
    l_inv = cholesky_inverse(p_mat, jitter)
    p_mat = p_mat + jitter * jnp.diag(jnp.diag(p_mat))
    k_shape = layer["kernel"].shape
    u_shape = (block.x_in.shape[0], *spec.out_shape(block.x_in.shape[1:]))

    def objective(p):
        """The block's objective with A(X; W) = Z W_flat computed once as the patch matrix (one GEMM per
        evaluation instead of a convolution, and Zᵀ·g for its gradient)."""
        u = (z @ p["kernel"].reshape(-1, k_shape[-1]) + p["bias"]).reshape(u_shape)
        val = block.fit(u) + block.rho * _sq_norm(p["kernel"])
        if block.anchor is not None:
            val = val + block.rho_prox * _sq_norm(jax.tree_util.tree_map(jnp.subtract, p, block.anchor))
        return val

    def stack(p):  # (W, b) → the (d + 1) × out matrix [W_flat; bᵀ]
        return jnp.concatenate([p["kernel"].reshape(-1, k_shape[-1]), p["bias"][None, :]], axis=0)

    def unstack(m):
        return {"kernel": m[:-1].reshape(k_shape), "bias": m[-1]}

    def precond_grad(p):
        return unstack(l_inv.T @ (l_inv @ stack(jax.grad(objective)(p))))

    def inner_p(p, q):  # ⟨p, q⟩_P
        return jnp.sum(stack(p) * (p_mat @ stack(q)))

    problem = Composite(smooth=objective, prox=lambda v, s: v, nonsmooth=lambda v: 0.0, grad=precond_grad,
                        inner=inner_p, norm=lambda p: jnp.sqrt(jnp.maximum(inner_p(p, p), 0.0)))
    return FISTA(cfg.tol, cfg.max_steps).run(problem, layer, 1.0)


W_SOLVERS = {"primal": solve_w_primal, "primal_mm": solve_w_primal_mm, "kernel": solve_w_kernel,
             "kernel_mm": solve_w_kernel_mm}


def solve_w(block: WBlock, cfg: SolverConfig, w_mode: str = "auto", fallback: bool = True) -> tuple[dict, SolveInfo]:
    """Solve a W block in the form the layer spec picks for `w_mode`.

    fallback: a kernel_mm solve that meets a non-finite value is solved again in the primal_mm form. The
    kernel form's N × N system ZZᵀ + (μ/c)I cannot be factored in float32 when the block's inputs are huge
    or nearly collinear (raw features of scale 10⁴: condition numbers of 10¹⁰), where the primal majoriser,
    equilibrated and jittered (`cholesky_inverse`), can. The retry runs only when needed (`lax.cond`); under
    `vmap`, where both branches would run, pass False and retry outside it (`solve_w_hidden_stacked`). It is
    compiled for float32 and narrower only (its second branch adds about a quarter to a step's compile time;
    float64's rounding leaves the kernel system factorable up to scales far beyond these).
    """
    form = block.spec.w_form(w_mode, block.x_in, block.mu)
    out, info = W_SOLVERS[form](block, cfg)
    if not fallback or not _has_fallback(form, block.x_in.dtype):
        return out, info
    return _retry_nonfinite((out, info), lambda: solve_w_primal_mm(block, cfg))


def _has_fallback(form: str, dtype) -> bool:
    """Whether a W block solved in `form` is solved again in the primal_mm form when non-finite (`solve_w`)."""
    return form == "kernel_mm" and jnp.finfo(dtype).bits <= 32


def _retry_nonfinite(solved: tuple, solve_again: Callable) -> tuple:
    """(params, SolveInfo) of one block, or of a stack of blocks (leading axis), with every block whose result is
    NONFINITE replaced by its `solve_again()`; the retry runs (`lax.cond`) only when some block needs it."""
    bad = solved[1].result == Result.NONFINITE

    def retry():
        again = solve_again()
        return jax.tree_util.tree_map(lambda new, old: jnp.where(bad.reshape(bad.shape + (1,) * (new.ndim - bad.ndim)),
                                                                 new, old), again, solved)

    return jax.lax.cond(jnp.any(bad), retry, lambda: solved)


def solve_w_hidden(
    penalty: Penalty,
    spec,
    layer: dict,
    x_in: jax.Array,
    x_out: jax.Array,
    lam: float,
    rho: float,
    cfg: SolverConfig,
    anchor: Optional[dict] = None,
    rho_prox: float = 0.0,
    w_mode: str = "auto",
    anchor_is_start: bool = False,
    fallback: bool = True,
) -> tuple[dict, SolveInfo]:
    """argmin_{W,b} (1/N) Σ λ P(A(X_in; W) + b, X_out) + ρ‖W‖² + ρ'‖(W, b) − anchor‖².

    λ is a scalar or one value per output neuron; the majoriser's curvature then takes the largest.
    fallback: see `solve_w`.
    """
    n = x_in.shape[0]

    def fit(u):
        return jnp.sum(row_sums(lam * penalty.smooth_u(u, x_out))) / n

    block = WBlock(spec, fit, _largest(lam) / n * penalty.curvature_u, layer, x_in, rho, anchor, rho_prox,
                   anchor_is_start)
    return solve_w(block, cfg, w_mode, fallback)


def solve_w_hidden_stacked(
    penalty: Penalty,
    spec,
    layers: dict,
    x_ins: jax.Array,
    x_outs: jax.Array,
    lams: jax.Array,
    rho: float,
    cfg: SolverConfig,
    anchors: Optional[dict] = None,
    rho_prox: float = 0.0,
    w_mode: str = "auto",
    anchor_is_start: bool = False,
    fallback: bool = True,
) -> tuple[dict, SolveInfo]:
    """`solve_w_hidden` for K hidden blocks of one spec, shape, ρ and ρ', stacked on a leading axis (layers,
    inputs, outputs, λ and anchors): one solve vmapped over the K blocks, each block's result that of its own solve.

    The primal_mm fallback of a non-finite kernel_mm solve in float32 or narrower (`solve_w`) is taken outside
    the vmap, where a `lax.cond` would run both branches: when any block is non-finite, all K blocks are solved
    again in the primal_mm form (vmapped) and only the non-finite ones take that result (fallback=False: never).
    """
    def one(form, layer, x_in, x_out, lam, anchor):
        return solve_w_hidden(penalty, spec, layer, x_in, x_out, lam, rho, cfg, anchor, rho_prox, form,
                              anchor_is_start, fallback=False)

    args = (layers, x_ins, x_outs, lams, anchors)
    form = spec.w_form(w_mode, x_ins[0], _w_curvature(rho, rho_prox, anchors is not None))  # the same for all K
    solved = jax.vmap(functools.partial(one, form))(*args)
    if not fallback or not _has_fallback(form, x_ins.dtype):
        return solved
    return _retry_nonfinite(solved, lambda: jax.vmap(functools.partial(one, "primal_mm"))(*args))


def solve_w_out(
    spec,
    layer: dict,
    x_in: jax.Array,
    y: jax.Array,
    rho: float,
    loss: str,
    cfg: SolverConfig,
    anchor: Optional[dict] = None,
    rho_prox: float = 0.0,
    w_mode: str = "auto",
    anchor_is_start: bool = False,
    merge: Optional[jax.Array] = None,
    fallback: bool = True,
) -> tuple[dict, SolveInfo]:
    """argmin_{W,b} (1/N) Σ loss(Y, (A(X_L; W) + b) M) + ρ‖W‖² + ρ'‖(W, b) − anchor‖².

    merge: M ∈ R^{KC×C} of a multi-branch head (`fenchel.heads`; None: M = I) acting on the stacked
    K·C-column layer. The fit U ↦ mean loss(Y, U M) is convex with curvature ≤ c_loss ‖M‖₂²/N; with a guide
    selection a column outside it enters only ρ‖W‖² + ρ'‖(W, b) − anchor‖² (minimiser ρ'/(ρ + ρ')·anchor,
    and the anchor's bias). fallback: see `solve_w`.
    """
    n = x_in.shape[0]

    if merge is None:
        def fit(u):
            return jnp.mean(loss_per_sample(loss, y, u))

        curvature = loss_curvature(loss) / n
    else:
        def fit(u):
            return jnp.mean(loss_per_sample(loss, y, u @ merge))

        # λ_max(MᵀM) from the small C×C matrix, exact for any merge
        curvature = loss_curvature(loss) / n * jnp.linalg.eigvalsh(merge.T @ merge)[-1]

    block = WBlock(spec, fit, curvature, layer, x_in, rho, anchor, rho_prox, anchor_is_start)
    return solve_w(block, cfg, w_mode, fallback)
