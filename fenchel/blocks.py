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
    """Stopping rule of one block solve: ‖gradient mapping‖_∞ ≤ tol or max_steps."""

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


def input_operator_norm_sq(kernel, sample_shape, linear_map: Callable, iters: int) -> jax.Array:
    """‖A(·; W)‖₂² for one sample: λ_max(AᵀA) by power iteration, Aᵀ from vjp."""
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


def _proximal_term(layer, anchor, rho_prox):
    if anchor is None:
        return 0.0
    return rho_prox * _sq_norm(jax.tree_util.tree_map(jnp.subtract, layer, anchor))


def _identity_composite(smooth):
    return Composite(smooth=smooth, prox=lambda z, s: z, nonsmooth=lambda z: 0.0)


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
) -> tuple[dict, SolveInfo]:
    """argmin_{W,b} (λ/N) Σ P(A(X_in; W) + b, X_out) + ρ‖W‖² + ρ'‖(W, b) − anchor‖²."""
    n = x_in.shape[0]

    def smooth(p):
        u = preactivation(p, x_in, linear_map)
        fit = lam / n * jnp.sum(penalty.smooth_u(u, x_out))
        return fit + rho * jnp.sum(p["kernel"] ** 2) + _proximal_term(p, anchor, rho_prox)

    op = weight_operator_norm_sq(x_in, layer["kernel"], linear_map, cfg.power_iters)
    prox_curv = 2.0 * rho_prox if anchor is not None else 0.0
    lip = cfg.lipschitz_margin * (lam / n * penalty.curvature_u * op) + 2.0 * rho + prox_curv
    solver = FISTA(cfg.tol, cfg.max_steps)
    return solver.run(_identity_composite(smooth), layer, jnp.maximum(lip, _MIN_LIPSCHITZ))


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
) -> tuple[dict, SolveInfo]:
    """argmin_{W,b} (1/N) Σ loss(Y, A(X_L; W) + b) + ρ‖W‖² + ρ'‖(W, b) − anchor‖²."""

    def smooth(p):
        logits = preactivation(p, x_in, linear_map)
        fit = jnp.mean(loss_per_sample(loss, y, logits))
        return fit + rho * jnp.sum(p["kernel"] ** 2) + _proximal_term(p, anchor, rho_prox)

    op = weight_operator_norm_sq(x_in, layer["kernel"], linear_map, cfg.power_iters)
    prox_curv = 2.0 * rho_prox if anchor is not None else 0.0
    n = x_in.shape[0]
    lip = cfg.lipschitz_margin * (loss_curvature(loss) / n * op) + 2.0 * rho + prox_curv
    solver = FISTA(cfg.tol, cfg.max_steps)
    return solver.run(_identity_composite(smooth), layer, jnp.maximum(lip, _MIN_LIPSCHITZ))
