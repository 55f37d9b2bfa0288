"""The lifted objective of a Fenchel lifted network.

Notation (row-major, sample axis leading): data X_0 ∈ R^{N×n_0}, targets
Y ∈ R^{N×n_{L+1}}, hidden activations X_1..X_L, layers l = 0..L with
parameters {"kernel": W_l, "bias": b_l} and pre-activation
U_l = A_l(X_l; W_l) + b_l (A_l is the layer spec's linear map, `fenchel.layers`;
dense: X W).

Scaling convention (used everywhere in this package): *mean over samples,
sum over features*,

    F(W, X) = (1/N) [ Σ_i loss(Y_i, U_{L,i}) + Σ_{l<L} λ_l Σ_i Σ_j P(U_{l,ij}, X_{l+1,ij}) ]
              + Σ_l ρ_l ‖W_l‖²,

with loss the softmax cross-entropy −Σ_k Y_k log softmax(U)_k ("softmax") or
½‖Y − U‖² ("squared"). Biases are not regularised. At X from a forward pass
every penalty is zero, so F equals network_loss + regulariser. For the
Fenchel–Young penalties (P ≥ 0, zero on the graph) min_X F is therefore a
lower bound of the training objective at the same W; LNN's squared penalty
gives no such bound.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from fenchel.layers import Dense
from fenchel.penalties import Penalty

Params = Sequence[dict]  # one {"kernel", "bias"} dict per layer
LOSSES = ("softmax", "squared")


def layers_of(params: Params, layers: Optional[Sequence] = None) -> tuple:
    """The layer specs of `params`: `layers` if given, else dense layers inferred from 2-D kernels."""
    if layers is not None:
        if len(layers) != len(params):
            raise ValueError(f"{len(layers)} layer specs for {len(params)} parameter sets")
        return tuple(layers)
    if any(jnp.ndim(p["kernel"]) != 2 for p in params):
        raise ValueError("layer specs are needed for parameters that are not dense (2-D kernels)")
    return tuple(Dense(int(p["kernel"].shape[-1])) for p in params)


def preactivation(spec, layer: dict, x: jax.Array) -> jax.Array:
    """U = A(X; W) + b for the layer type `spec`."""
    return spec.linear_map(x, layer["kernel"]) + layer["bias"]


def loss_per_sample(kind: str, y: jax.Array, logits: jax.Array) -> jax.Array:
    """Per-sample loss: softmax cross-entropy −Σ y log softmax(u), or ½‖y − u‖² (optax's losses)."""
    if kind == "softmax":
        return optax.softmax_cross_entropy(logits, y)
    if kind == "squared":
        return jnp.sum(optax.l2_loss(logits, y), axis=-1)
    raise ValueError(f"unknown loss {kind!r}; known: {', '.join(LOSSES)}")


def loss_curvature(kind: str) -> float:
    """Upper bound on the Hessian of the per-sample loss in the logits."""
    return {"softmax": 0.5, "squared": 1.0}[kind]


def forward(params: Params, x0: jax.Array, penalty: Penalty, layers: Optional[Sequence] = None):
    """Feed-forward pass X_{l+1} = φ(U_l): returns ([X_1, .., X_L], logits U_L)."""
    layers = layers_of(params, layers)
    xs = []
    x = x0
    for spec, layer in zip(layers[:-1], params[:-1]):
        x = penalty.forward(preactivation(spec, layer, x))
        xs.append(x)
    return xs, preactivation(layers[-1], params[-1], x)


def regulariser(params: Params, rho) -> jax.Array:
    """Σ_l ρ_l ‖W_l‖² (kernels only)."""
    rho = broadcast_per_layer(rho, len(params), "rho")
    return sum(r * optax.tree_utils.tree_norm(layer["kernel"], squared=True) for r, layer in zip(rho, params))


def broadcast_per_layer(value, n: int, name: str) -> tuple:
    """A float or a length-n sequence → a length-n tuple."""
    if not isinstance(value, (list, tuple)) and jnp.ndim(value) == 0:
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{name} needs one value or {n} values (one per layer), got {len(value)}")
    return value


def objective_terms(
    params: Params,
    xs: Sequence[jax.Array],
    x0: jax.Array,
    y: jax.Array,
    penalty: Penalty,
    lambdas,
    rho,
    loss: str = "softmax",
    layers: Optional[Sequence] = None,
) -> dict:
    """Breakdown of F(W, X): loss, each layer's λ-weighted penalty, regulariser, total."""
    n_layers = len(params)
    layers = layers_of(params, layers)
    if len(xs) != n_layers - 1:
        raise ValueError(f"need {n_layers - 1} hidden activations, got {len(xs)}")
    lambdas = broadcast_per_layer(lambdas, n_layers - 1, "lambda")
    n = x0.shape[0]
    inputs = [x0, *xs]
    penalties = []
    for l in range(n_layers - 1):
        u = preactivation(layers[l], params[l], inputs[l])
        penalties.append(jnp.sum(lambdas[l] * penalty.value(u, xs[l])) / n)  # λ_l: scalar or per neuron
    logits = preactivation(layers[-1], params[-1], inputs[-1])
    data_loss = jnp.mean(loss_per_sample(loss, y, logits))
    reg = regulariser(params, rho)
    total = data_loss + sum(penalties) + reg
    return {"loss": data_loss, "penalties": penalties, "regulariser": reg, "total": total}


def lifted_objective(params, xs, x0, y, penalty, lambdas, rho, loss="softmax", layers=None):
    """F(W, X) as defined in the module docstring."""
    return objective_terms(params, xs, x0, y, penalty, lambdas, rho, loss, layers)["total"]


def network_loss(params, x0, y, penalty, loss="softmax", layers=None) -> jax.Array:
    """(1/N) Σ_i loss(Y_i, f(X_0,i)) of the plain feed-forward network."""
    _, logits = forward(params, x0, penalty, layers)
    return jnp.mean(loss_per_sample(loss, y, logits))
