"""ProxProp (Frerix, Möllenhoff, Moeller, Cremers, ICLR 2018) for dense and convolutional networks.

Each hidden linear layer takes an implicit (proximal) step, the output layer an explicit one.
For hidden layer l with inputs A = [Z_l 1] (a column of ones for the bias), where Z_l is the layer's patch
matrix (`spec.patches`: flatten(pool(X_l)) for a dense layer, one row per sample; for a convolution one row
per sample × output position, k²C_in columns), parameters Θ = [W; b] (the kernel flattened to
(fan_in, n_out)), pre-activations Z = AΘ_k and

    z^{k+½} = Z − τ ∂J/∂Z,     J = (1/N) Σ_i loss_i   (the mean batch loss),

the step is the paper's

    Θ_{k+1} = argmin_Θ ½‖AΘ − z^{k+½}‖² + 1/(2τ_θ)‖Θ − Θ_k‖²
            = Θ_k − τ (I/τ_θ + AᵀA)⁻¹ ∇_Θ J,

because AΘ_k = Z and Aᵀ ∂J/∂Z = ∇_Θ J (the backprop gradient at the old weights).

Scaling convention: J is the *mean* over the batch and AᵀA is the *unscaled* sum over the
batch, exactly the paper's proximal problem above (its quadratic term sums over samples).
The bias is part of Θ, so it is damped by the same proximal term. As τ_θ → 0 the hidden
step tends to −τ τ_θ ∇_Θ J (plain gradient descent); as τ_θ → ∞ to a Gauss-Newton-like step.

Solvers of (I/τ_θ + AᵀA) Δ = −τ ∇_Θ J:
  "exact"  Cholesky of the (n_in+1)×(n_in+1) matrix, or, when N < n_in + 1, of the N×N matrix
           through the push-through identity (I/τ_θ + AᵀA)⁻¹ = τ_θ (I − Aᵀ(I/τ_θ + AAᵀ)⁻¹A);
  "cg"     `cg_steps` conjugate-gradient steps (one CG per output column, run together),
           warm-started at Θ_k, i.e. initial residual −τ ∇_Θ J.

Outer optimiser: the trainer feeds the "gradient" g = −(Θ_{k+1} − Θ_k)/τ of every layer
(the preconditioned gradient (I/τ_θ + AᵀA)⁻¹ ∇_Θ J for hidden layers, ∇_Θ J for the output
layer) into an optax optimiser (Nesterov SGD, momentum 0.95 as in the paper, or Adam).
The proximal step is linear in τ, so with an outer optimiser τ cancels (up to rounding);
it matters only for `proximal_update` itself.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from fenchel.heads import Head
from fenchel.lifted import forward, loss_per_sample
from fenchel.penalties import Penalty
from fenchel.solvers import gram_majoriser, spd_solve
from fenchel.trainer import OptaxTrainer, head_loss

SOLVERS = ("exact", "cg")
OPTIMIZERS = ("sgd", "adam")
NESTEROV_MOMENTUM = 0.95


def _with_ones(a: jax.Array) -> jax.Array:
    """[A 1]: the layer input flattened, with a column of ones for the bias."""
    a = a.reshape(a.shape[0], -1)
    return jnp.concatenate([a, jnp.ones((a.shape[0], 1), a.dtype)], axis=1)


def _stack(layer: dict) -> jax.Array:
    """Θ = [W; b], shape (fan_in + 1, n_out), the kernel flattened as the patch matrix's columns are."""
    kernel = layer["kernel"]
    return jnp.concatenate([kernel.reshape(-1, kernel.shape[-1]), layer["bias"][None, :]], axis=0)


def _unstack(theta: jax.Array, kernel_shape) -> dict:
    return {"kernel": theta[:-1].reshape(kernel_shape), "bias": theta[-1]}


def solve_exact(a: jax.Array, g: jax.Array, tau_theta) -> jax.Array:
    """(I/τ_θ + AᵀA)⁻¹ G by Cholesky (`fenchel.solvers.gram_majoriser`, shared with the lifted W blocks'
    primal_mm form); the N×N push-through form when N < columns of A."""
    n, m = a.shape
    if n < m:  # (I/τ_θ + AᵀA)⁻¹ G = τ_θ (G − Aᵀ (I/τ_θ + AAᵀ)⁻¹ A G)
        return tau_theta * (g - a.T @ spd_solve(gram_majoriser(a.T, 1.0, jnp.full((n,), 1.0 / tau_theta, a.dtype)),
                                                 a @ g))
    return spd_solve(gram_majoriser(a, 1.0, jnp.full((m,), 1.0 / tau_theta, a.dtype)), g)


def solve_cg(a: jax.Array, g: jax.Array, tau_theta, steps: int) -> jax.Array:
    """`steps` CG iterations for (I/τ_θ + AᵀA) X = G from X = 0, one CG per column of G (vectorised)."""

    def matvec(v):
        return v / tau_theta + a.T @ (a @ v)

    def safe_div(num, den):
        ok = den > 0
        return jnp.where(ok, num / jnp.where(ok, den, 1), 0)

    def body(_, carry):
        x, r, p, rr = carry
        mp = matvec(p)
        alpha = safe_div(rr, jnp.sum(p * mp, axis=0))
        x = x + alpha * p
        r = r - alpha * mp
        rr_new = jnp.sum(r * r, axis=0)
        p = r + safe_div(rr_new, rr) * p
        return x, r, p, rr_new

    x0 = jnp.zeros_like(g)
    carry = (x0, g, g, jnp.sum(g * g, axis=0))
    return jax.lax.fori_loop(0, steps, body, carry)[0]


def precondition(a: jax.Array, g: jax.Array, tau_theta, solver: str = "exact", cg_steps: int = 10) -> jax.Array:
    """(I/τ_θ + AᵀA)⁻¹ G for a layer's patch matrix (without the ones column) and G = ∇_Θ J, Θ = [W; b]."""
    a1 = _with_ones(a)
    if solver == "exact":
        return solve_exact(a1, g, tau_theta)
    if solver == "cg":
        return solve_cg(a1, g, tau_theta, cg_steps)
    raise ValueError(f"unknown ProxProp solver {solver!r}; known: {', '.join(SOLVERS)}")


def loss_and_inputs(params, x, y, penalty: Penalty, layers: Sequence, loss: str = "softmax"):
    """(J, layer inputs [X_0, …, X_L]) with J = (1/N) Σ_i loss(Y_i, f(X_0,i))."""
    xs, logits = forward(params, x, penalty, layers)
    return jnp.mean(loss_per_sample(loss, y, logits)), [x, *xs]


def _head_loss_and_inputs(params, x, y, penalty, layers, loss, head, head_state):
    """(J, (layer inputs, head state')) with J the head's merged loss (`fenchel.heads`)."""
    xs, logits = forward(params, x, penalty, layers)
    value, head_state = head_loss(head, loss, logits, y, head_state)
    return value, ([x, *xs], head_state)


def proxprop_gradient(params, x, y, penalty: Penalty, layers: Sequence, loss: str = "softmax",
                      tau_theta=0.05, solver: str = "exact", cg_steps: int = 10, head: Optional[Head] = None,
                      head_state=None):
    """(J, g): g_l = (I/τ_θ + A_lᵀA_l)⁻¹ ∇_{Θ_l} J for hidden layers, g_L = ∇_{Θ_L} J; g = −(Θ_{k+1} − Θ_k)/τ.

    With a multi-branch `head` (layers with the K·C-column output layer), J is the merged loss and the
    result is (J, g, head state')."""
    if head is None:
        (value, inputs), grads = jax.value_and_grad(loss_and_inputs, has_aux=True)(params, x, y, penalty, layers,
                                                                                    loss)
    else:
        (value, (inputs, head_state)), grads = jax.value_and_grad(_head_loss_and_inputs, has_aux=True)(
            params, x, y, penalty, layers, loss, head, head_state)
    out = []
    for l, (spec, grad, a) in enumerate(zip(layers, grads, inputs)):
        if l == len(params) - 1:
            out.append(dict(grad))
        else:
            z = spec.patches(jax.lax.stop_gradient(a))
            out.append(_unstack(precondition(z, _stack(grad), tau_theta, solver, cg_steps), grad["kernel"].shape))
    return (value, out) if head is None else (value, out, head_state)


def proximal_update(params, x, y, penalty: Penalty, layers: Sequence, loss: str = "softmax", tau=1.0,
                    tau_theta=0.05, solver: str = "exact", cg_steps: int = 10) -> list[dict]:
    """One plain ProxProp step: Θ_l ← Θ_l − τ (I/τ_θ + A_lᵀA_l)⁻¹ ∇J (hidden), Θ_L ← Θ_L − τ ∇J (output)."""
    _, g = proxprop_gradient(params, x, y, penalty, layers, loss, tau_theta, solver, cg_steps)
    return jax.tree_util.tree_map(lambda p, d: p - tau * d, [dict(p) for p in params], g)


def make_outer_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
    """"sgd": Nesterov momentum 0.95 (the paper's); "adam": optax defaults."""
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    if name == "sgd":
        return optax.sgd(learning_rate, momentum=NESTEROV_MOMENTUM, nesterov=True)
    if name == "adam":
        return optax.adam(learning_rate)
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")


class ProxPropTrainer(OptaxTrainer):
    """ProxProp: optax(g) with g_l = −(Θ_{k+1} − Θ_k)/τ the proximal (hidden) or explicit (output) step.

    State: (params, optax state), with a multi-branch `head` (params, optax state, head state).
    One jitted step, one compilation per batch shape.
    """

    def __init__(self, layers: Sequence, penalty: Penalty, tau: float = 1.0, tau_theta: float = 0.05,
                 solver: str = "exact", cg_steps: int = 10, optimizer: str = "sgd", learning_rate: float = 0.5,
                 loss: str = "softmax", head: Optional[Head] = None):
        if not tau > 0:
            raise ValueError(f"tau={tau} must be > 0")
        if not tau_theta > 0:
            raise ValueError(f"tau_theta={tau_theta} must be > 0")
        if solver not in SOLVERS:
            raise ValueError(f"solver={solver!r}, expected one of {SOLVERS}")
        if not (isinstance(cg_steps, int) and cg_steps >= 1):
            raise ValueError(f"cg_steps={cg_steps!r} must be an integer ≥ 1")
        self.layers = tuple(layers)
        self.tau, self.tau_theta, self.solver, self.cg_steps = tau, tau_theta, solver, cg_steps

        train_layers = self.layers if head is None else head.training_layers(self.layers)

        def direction(params, x, y, *head_state):
            # g = −(Θ_{k+1} − Θ_k)/τ, computed without forming Θ_{k+1} (no rounding from − τ, / τ)
            return proxprop_gradient(params, x, y, penalty, train_layers, loss, tau_theta, solver, cg_steps, head,
                                     *head_state)

        super().__init__(direction, make_outer_optimizer(optimizer, learning_rate), head)
