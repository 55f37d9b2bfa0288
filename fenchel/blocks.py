"""Convex block subproblems of lifted BCD, each solved by FISTA.

Every block is generic over the layer's linear map A(X; W) (dense or, later,
convolutional): gradients come from autodiff and Lipschitz constants from
power iteration on AᵀA with adjoints from `jax.vjp`, so no transpose is
written by hand. Per-sample state keeps the sample axis leading.

Blocks (P = F(u) + G(v) − c·u·v is the penalty, see `penalties`):
  X hidden:  min_X  λ_{l−1} Σ P(U_{l−1}, X) + κ λ_l Σ P(A(X; W_l) + b_l, X_{l+1})
  X last:    min_X  κ Σ loss(Y, A(X; W_L) + b_L) + λ_{L−1} Σ P(U_{L−1}, X)
  W hidden:  min_{W,b} (λ_l/N) Σ P(A(X_l; W) + b, X_{l+1}) + ρ_l‖W‖² + ρ'‖(W, b) − anchor‖²
  W output:  min_{W,b} (1/N) Σ loss(Y, A(X_L; W) + b) + ρ_L‖W‖² + ρ'‖(W, b) − anchor‖²
κ = `lbd_coef` (1 gives exact BCD). X blocks separate over samples: they are
written per sample (sums over features) and so are solved either batched
(one FISTA over the matrix, per-row momentum and stopping) or vmapped.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from fenchel.lifted import dense, loss_curvature, loss_per_sample, preactivation
from fenchel.penalties import Penalty
from fenchel.solvers import FISTA, Composite, SolveInfo, power_iteration

X_MODES = ("batched", "vmap")
_MIN_LIPSCHITZ = 1e-8


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """Stopping rule of one block solve: residual ≤ tol, or max_steps iterations.

    The residual is the norm of the gradient mapping: max-abs per sample for X
    blocks (each sample stops on its own), Frobenius for W blocks in the
    primal and kernel forms, ‖∇f‖_{P⁻¹} in the kernel_mm form. Lipschitz
    constants come from `power_iters` power iterations times
    `lipschitz_margin` (power iteration approaches λ_max from below).
    """

    tol: float = 1e-5
    max_steps: int = 100
    power_iters: int = 20
    lipschitz_margin: float = 1.05

    def __post_init__(self):
        if not self.tol > 0:
            raise ValueError(f"tol must be positive, got {self.tol}")
        if int(self.max_steps) < 1:
            raise ValueError(f"max_steps must be ≥ 1, got {self.max_steps}")
        if int(self.power_iters) < 1:
            raise ValueError(f"power_iters must be ≥ 1, got {self.power_iters}")
        if not self.lipschitz_margin >= 1.0:
            raise ValueError(f"lipschitz_margin must be ≥ 1, got {self.lipschitz_margin}")


def _row_sum(a: jax.Array) -> jax.Array:
    return jnp.sum(a.reshape(a.shape[0], -1), axis=1)


def _sq_norm(tree) -> jax.Array:
    return sum(jnp.sum(leaf**2) for leaf in jax.tree_util.tree_leaves(tree))


EXACT_GRAM_MAX = 128  # dense layers with a side this small get an exact eigvalsh


def input_operator_norm_sq(kernel, sample_shape, linear_map: Callable, iters: int) -> jax.Array:
    """‖A(·; W)‖₂² for one sample: λ_max(AᵀA) by power iteration, Aᵀ from vjp.

    A dense layer with a side ≤ EXACT_GRAM_MAX gets λ_max of its small Gram
    matrix exactly instead.
    """
    if linear_map is dense and kernel.ndim == 2 and min(kernel.shape) <= EXACT_GRAM_MAX:
        small = kernel.T @ kernel if kernel.shape[1] <= kernel.shape[0] else kernel @ kernel.T
        return jnp.linalg.eigvalsh(small)[-1]
    x = jnp.ones((1, *sample_shape), kernel.dtype)

    def matvec(v):
        out, vjp = jax.vjp(lambda z: linear_map(z, kernel), v)
        return vjp(out)[0]

    return power_iteration(matvec, x, iters)


def weight_operator_norm_sq(x_in, kernel, linear_map: Callable, iters: int) -> jax.Array:
    """‖(W, b) ↦ A(X; W) + b‖₂², i.e. λ_max([X 1]ᵀ[X 1]) for a dense layer.

    The operator acts on each output neuron alike, so one output column is
    enough; its adjoint comes from vjp.
    """
    k1 = jnp.ones(kernel.shape[:-1] + (1,), kernel.dtype)
    b1 = jnp.ones((1,), kernel.dtype)

    def apply(p):
        return linear_map(x_in, p[0]) + p[1]

    def matvec(p):
        out, vjp = jax.vjp(apply, p)
        return vjp(out)[0]

    def flat_matvec(v):
        k, b = v[:-1].reshape(k1.shape), v[-1:]
        gk, gb = matvec((k, b))
        return jnp.concatenate([gk.ravel(), gb.ravel()])

    v0 = jnp.concatenate([k1.ravel(), b1])
    return power_iteration(flat_matvec, v0, iters)


def _solve_rows(problem_fn, x_init, lipschitz, cfg: SolverConfig, mode: str):
    """Solve a row-separable problem batched or vmapped over rows.

    problem_fn(row_data) builds a Composite whose functions take (rows, ...)
    arrays; row_data is a tuple of per-row arrays (first: the start point).
    """
    if mode == "batched":
        solver = FISTA(cfg.tol, cfg.max_steps, row_separable=True)
        return solver.run(problem_fn(x_init[1:]), x_init[0], lipschitz)
    if mode == "vmap":
        solver = FISTA(cfg.tol, cfg.max_steps, row_separable=False)

        def one(*row):
            row = tuple(r[None] for r in row)
            prob = problem_fn(row[1:])
            single = Composite(
                smooth=lambda x: prob.smooth(x)[0],
                prox=prob.prox,
                nonsmooth=lambda x: prob.nonsmooth(x)[0],
            )
            x, info = solver.run(single, row[0], lipschitz)
            return x[0], info

        x, info = jax.vmap(one)(*x_init)
        return x, SolveInfo(info.result, info.residual, jnp.max(info.steps), info.value)
    raise ValueError(f"unknown x solve mode {mode!r}; known: {', '.join(X_MODES)}")


def solve_x_hidden(
    penalty: Penalty,
    x: jax.Array,
    u_prev: jax.Array,
    next_layer: dict,
    x_next: jax.Array,
    lam_prev: float,
    lam_next: float,
    cfg: SolverConfig,
    mode: str = "batched",
    linear_map: Callable = dense,
) -> tuple[jax.Array, SolveInfo]:
    """argmin_X λ_prev Σ P(U_prev, X) + λ_next Σ P(A(X; W) + b, X_next) (λ_next includes κ)."""
    c = penalty.coupling

    def problem(rows):
        u_p, x_n = rows

        def smooth(z):
            u = preactivation(next_layer, z, linear_map)
            return -c * lam_prev * _row_sum(u_p * z) + lam_next * _row_sum(penalty.smooth_u(u, x_n))

        return Composite(
            smooth=smooth,
            prox=lambda z, s: penalty.prox_G(z, s * lam_prev),
            nonsmooth=lambda z: lam_prev * _row_sum(penalty.G(z)),
        )

    op = input_operator_norm_sq(next_layer["kernel"], x.shape[1:], linear_map, cfg.power_iters)
    lip = jnp.maximum(cfg.lipschitz_margin * lam_next * penalty.curvature_u * op, _MIN_LIPSCHITZ)
    return _solve_rows(problem, (penalty.project(x), u_prev, x_next), lip, cfg, mode)


def solve_x_last(
    penalty: Penalty,
    x: jax.Array,
    u_prev: jax.Array,
    out_layer: dict,
    y: jax.Array,
    lam_prev: float,
    loss: str,
    cfg: SolverConfig,
    mode: str = "batched",
    loss_weight: float = 1.0,
    linear_map: Callable = dense,
) -> tuple[jax.Array, SolveInfo]:
    """argmin_X κ Σ loss(Y, A(X; W_L) + b_L) + λ_prev Σ P(U_prev, X)."""
    c = penalty.coupling

    def problem(rows):
        u_p, yy = rows

        def smooth(z):
            logits = preactivation(out_layer, z, linear_map)
            return loss_weight * loss_per_sample(loss, yy, logits) - c * lam_prev * _row_sum(u_p * z)

        return Composite(
            smooth=smooth,
            prox=lambda z, s: penalty.prox_G(z, s * lam_prev),
            nonsmooth=lambda z: lam_prev * _row_sum(penalty.G(z)),
        )

    op = input_operator_norm_sq(out_layer["kernel"], x.shape[1:], linear_map, cfg.power_iters)
    lip = jnp.maximum(cfg.lipschitz_margin * loss_weight * loss_curvature(loss) * op, _MIN_LIPSCHITZ)
    return _solve_rows(problem, (penalty.project(x), u_prev, y), lip, cfg, mode)


W_MODES = ("auto", "primal", "kernel", "kernel_mm")


def _proximal_term(layer, anchor, rho_prox):
    if anchor is None:
        return 0.0
    return rho_prox * _sq_norm(jax.tree_util.tree_map(jnp.subtract, layer, anchor))


def _frobenius(tree) -> jax.Array:
    return jnp.sqrt(_sq_norm(tree))


def _resolve_w_mode(w_mode: str, x_in, linear_map, mu) -> str:
    """"auto": kernel_mm for a dense layer with N ≤ n_in and μ > 0, kernel if μ = 0, else primal."""
    if w_mode not in W_MODES:
        raise ValueError(f"unknown w_mode {w_mode!r}; known: {', '.join(W_MODES)}")
    fits = linear_map is dense and x_in.ndim == 2
    if w_mode in ("kernel", "kernel_mm") and not fits:
        raise ValueError(f"w_mode={w_mode!r} needs a dense layer with 2-D input")
    if w_mode == "kernel_mm" and not mu > 0:
        raise ValueError("w_mode='kernel_mm' needs ρ + ρ' > 0 (a strongly convex W block)")
    if w_mode != "auto":
        return w_mode
    if not fits or x_in.shape[0] > x_in.shape[1]:
        return "primal"
    return "kernel_mm" if mu > 0 else "kernel"


def _solve_w(fit, fit_curvature, layer, x_in, rho, cfg, anchor, rho_prox, linear_map, w_mode):
    """argmin_{W,b} fit(A(X; W) + b) + ρ‖W‖² + ρ'‖(W, b) − anchor‖² by FISTA.

    fit: U ↦ scalar, convex with ∇² ⪯ fit_curvature·I in U. The residual is the
    Frobenius norm of the gradient mapping. Primal form: iterate on (W, b).
    Kernel form (dense, N ≤ n_in): the gradient Xᵀg + 2ρW + 2ρ'(W − W_a) keeps
    every iterate in span{W_0, W_a} ⊕ rowspace(X), so W = a·W_0 + c·W_a + Xᵀβ
    and each iteration costs N×N products instead of N×n_in ones; the
    iterates are the primal ones, exactly.
    Kernel MM form (Newton-type): FISTA in the metric of the majoriser
    P = c_f ZᵀZ + μI ⪰ ∇²(objective), Z = [X 1], i.e. steps z = y − P⁻¹∇f(y),
    with P⁻¹ = (I − Zᵀ(μ/c_f·I + ZZᵀ)⁻¹Z)/μ from one N×N Cholesky factor.
    It is exact on the quadratic part and monotone like any MM step; its
    residual is ‖∇f(y)‖_{P⁻¹}.
    """
    has_anchor = anchor is not None
    rp = rho_prox if has_anchor else 0.0
    mu = 2.0 * (rho + rp)  # curvature of the regulariser + proximal term
    mode = _resolve_w_mode(w_mode, x_in, linear_map, mu)
    if mode == "primal":
        def smooth(p):
            u = preactivation(p, x_in, linear_map)
            return fit(u) + rho * jnp.sum(p["kernel"] ** 2) + _proximal_term(p, anchor, rho_prox)

        op = weight_operator_norm_sq(x_in, layer["kernel"], linear_map, cfg.power_iters)
        lip = jnp.maximum(cfg.lipschitz_margin * fit_curvature * op + mu, _MIN_LIPSCHITZ)
        problem = Composite(smooth=smooth, prox=lambda z, s: z, nonsmooth=lambda z: 0.0, norm=_frobenius)
        return FISTA(cfg.tol, cfg.max_steps).run(problem, layer, lip)

    w0, b0 = layer["kernel"], layer["bias"]
    wa = anchor["kernel"] if has_anchor else jnp.zeros_like(w0)
    ba = anchor["bias"] if has_anchor else jnp.zeros_like(b0)
    gram = x_in @ x_in.T  # K = X Xᵀ
    x_w0 = x_in @ w0
    same = has_anchor and anchor["kernel"] is layer["kernel"]  # the first round of a minibatch
    x_wa = x_w0 if same else x_in @ wa
    g00 = jnp.sum(w0 * w0)
    g0a, gaa = (g00, g00) if same else (jnp.sum(w0 * wa), jnp.sum(wa * wa))

    # The representation also carries kbeta = Kβ: every FISTA operation is
    # linear, so the invariant holds and each iteration needs one K product.
    def w_inner(p, q):
        """⟨W_p, W_q⟩ for W = a·W_0 + c·W_a + Xᵀβ."""
        return (p["a"] * q["a"] * g00 + (p["a"] * q["c"] + p["c"] * q["a"]) * g0a + p["c"] * q["c"] * gaa
                + jnp.sum(x_w0 * (p["a"] * q["beta"] + q["a"] * p["beta"]))
                + jnp.sum(x_wa * (p["c"] * q["beta"] + q["c"] * p["beta"]))
                + jnp.sum(p["beta"] * q["kbeta"]))

    def inner(p, q):
        return w_inner(p, q) + jnp.sum(p["b"] * q["b"])

    def preact(p):
        return p["a"] * x_w0 + p["c"] * x_wa + p["kbeta"] + p["b"]

    def diff_anchor(p):  # (W, b) − anchor in the representation
        return {**p, "c": p["c"] - 1.0, "b": p["b"] - ba}

    def smooth(p):
        val = fit(preact(p)) + rho * w_inner(p, p)
        if has_anchor:
            d = diff_anchor(p)
            val = val + rho_prox * inner(d, d)
        return val

    def grad(p):
        g = jax.grad(fit)(preact(p))
        return {
            "a": mu * p["a"],
            "c": mu * p["c"] - 2.0 * rp,
            "beta": g + mu * p["beta"],
            "kbeta": gram @ g + mu * p["kbeta"],
            "b": jnp.sum(g, axis=0) + 2.0 * rp * (p["b"] - ba),
        }

    dtype = w0.dtype
    beta0 = jnp.zeros((x_in.shape[0], w0.shape[-1]), dtype)
    rep0 = {"a": jnp.ones((), dtype), "c": jnp.zeros((), dtype), "beta": beta0, "kbeta": beta0, "b": b0}
    ones = jnp.ones((x_in.shape[0], 1), x_in.dtype)
    if mode == "kernel":
        op = power_iteration(lambda v: gram @ v + ones @ (ones.T @ v), ones, cfg.power_iters)
        lip = jnp.maximum(cfg.lipschitz_margin * fit_curvature * op + mu, _MIN_LIPSCHITZ)
        problem = Composite(smooth=smooth, prox=lambda z, s: z, nonsmooth=lambda z: 0.0, grad=grad,
                            inner=inner, norm=lambda p: jnp.sqrt(jnp.maximum(inner(p, p), 0.0)))
        rep, info = FISTA(cfg.tol, cfg.max_steps).run(problem, rep0, lip)
    else:
        # With S = ZZᵀ + sI, s = μ/c_f: P⁻¹∇ = (∇ − Zᵀq)/μ, q = S⁻¹Z∇. Writing
        # Z∇ = (ZZᵀ)g + r' and using ZZᵀS⁻¹ = I − sS⁻¹ leaves one product per
        # step: d = g − q = S⁻¹(s·g − r'), and K·d = s·g − r' − s·d − 1(1ᵀd).
        shift = mu / fit_curvature
        eye = jnp.eye(x_in.shape[0], dtype=dtype)
        s_inv = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(gram + 1.0 + shift * eye), eye)

        def z_apply(p):  # Z(W, b) = XW + 1bᵀ for a representation p
            return p["a"] * x_w0 + p["c"] * x_wa + p["kbeta"] + p["b"]

        def precond_grad(p):
            g = jax.grad(fit)(preact(p))
            a_g, c_g = mu * p["a"], mu * p["c"] - 2.0 * rp
            b_prox = 2.0 * rp * (p["b"] - ba)
            r_rest = a_g * x_w0 + c_g * x_wa + mu * p["kbeta"] + b_prox
            rhs = shift * g - r_rest
            d = s_inv @ rhs
            d_sum = jnp.sum(d, axis=0)
            k_d = rhs - shift * d - d_sum
            return {
                "a": a_g / mu,
                "c": c_g / mu,
                "beta": p["beta"] + d / mu,
                "kbeta": p["kbeta"] + k_d / mu,
                "b": (b_prox + d_sum) / mu,
            }

        def inner_p(p, q):  # ⟨p, q⟩_P = μ⟨p, q⟩ + c_f ⟨Zp, Zq⟩
            return mu * inner(p, q) + fit_curvature * jnp.sum(z_apply(p) * z_apply(q))

        problem = Composite(smooth=smooth, prox=lambda z, s: z, nonsmooth=lambda z: 0.0, grad=precond_grad,
                            inner=inner_p, norm=lambda p: jnp.sqrt(jnp.maximum(inner_p(p, p), 0.0)))
        rep, info = FISTA(cfg.tol, cfg.max_steps).run(problem, rep0, 1.0)
    kernel = rep["a"] * w0 + rep["c"] * wa + x_in.T @ rep["beta"]
    return {"kernel": kernel, "bias": rep["b"]}, info


def solve_w_hidden(
    penalty: Penalty,
    layer: dict,
    x_in: jax.Array,
    x_out: jax.Array,
    lam: float,
    rho: float,
    cfg: SolverConfig,
    anchor: Optional[dict] = None,
    rho_prox: float = 0.0,
    linear_map: Callable = dense,
    w_mode: str = "auto",
) -> tuple[dict, SolveInfo]:
    """argmin_{W,b} (λ/N) Σ P(A(X_in; W) + b, X_out) + ρ‖W‖² + ρ'‖(W, b) − anchor‖²."""
    n = x_in.shape[0]

    def fit(u):
        return lam / n * jnp.sum(penalty.smooth_u(u, x_out))

    return _solve_w(fit, lam / n * penalty.curvature_u, layer, x_in, rho, cfg, anchor, rho_prox,
                    linear_map, w_mode)


def solve_w_out(
    layer: dict,
    x_in: jax.Array,
    y: jax.Array,
    rho: float,
    loss: str,
    cfg: SolverConfig,
    anchor: Optional[dict] = None,
    rho_prox: float = 0.0,
    linear_map: Callable = dense,
    w_mode: str = "auto",
) -> tuple[dict, SolveInfo]:
    """argmin_{W,b} (1/N) Σ loss(Y, A(X_L; W) + b) + ρ‖W‖² + ρ'‖(W, b) − anchor‖²."""
    n = x_in.shape[0]

    def fit(u):
        return jnp.mean(loss_per_sample(loss, y, u))

    return _solve_w(fit, loss_curvature(loss) / n, layer, x_in, rho, cfg, anchor, rho_prox,
                    linear_map, w_mode)
