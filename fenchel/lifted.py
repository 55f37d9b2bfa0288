"""The lifted objective of a Fenchel lifted network.

Notation (row-major, sample axis leading): data X_0 ∈ R^{N×n_0}, targets
Y ∈ R^{N×n_{L+1}}, hidden activations X_1..X_L, layers l = 0..L with
parameters {"kernel": W_l, "bias": b_l} and pre-activation
U_l = A(X_l; W_l) + b_l (A is the layer's linear map; dense: X W).

Scaling convention (used everywhere in this package): *mean over samples,
sum over features*,

    F(W, X) = (1/N) [ Σ_i loss(Y_i, U_{L,i}) + Σ_{l<L} λ_l Σ_i Σ_j P(U_{l,ij}, X_{l+1,ij}) ]
              + Σ_l ρ_l ‖W_l‖²,

with loss the softmax cross-entropy −Σ_k Y_k log softmax(U)_k ("softmax") or
½‖Y − U‖² ("squared"). Biases are not regularised. At X from a forward pass
every penalty is zero, so F equals network_loss + regulariser, and
min_X F is a lower bound of the training objective.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from fenchel.penalties import Penalty

Params = Sequence[dict]  # one {"kernel", "bias"} dict per layer
LOSSES = ("softmax", "squared")


def dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The dense linear map A(X; W) = X W."""
    return x @ kernel


def preactivation(layer: dict, x: jax.Array, linear_map: Callable = dense) -> jax.Array:
    """U = A(X; W) + b."""
    return linear_map(x, layer["kernel"]) + layer["bias"]


def loss_per_sample(kind: str, y: jax.Array, logits: jax.Array) -> jax.Array:
    """Per-sample loss: softmax cross-entropy −Σ y log softmax(u), or ½‖y − u‖²."""
    if kind == "softmax":
        return -jnp.sum(y * jax.nn.log_softmax(logits, axis=-1), axis=-1)
    if kind == "squared":
        return 0.5 * jnp.sum((y - logits) ** 2, axis=-1)
    raise ValueError(f"unknown loss {kind!r}; known: {', '.join(LOSSES)}")


def loss_curvature(kind: str) -> float:
    """Upper bound on the Hessian of the per-sample loss in the logits."""
    return {"softmax": 0.5, "squared": 1.0}[kind]


def init_mlp(key: jax.Array, sizes: Sequence[int], dtype=jnp.float32) -> list[dict]:
    """LeCun-normal kernels and zero biases (flax.linen.Dense's defaults)."""
    params = []
    for k, (n_in, n_out) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
        w = jax.nn.initializers.lecun_normal()(k, (n_in, n_out), dtype)
        params.append({"kernel": w, "bias": jnp.zeros((n_out,), dtype)})
    return params


def forward(params: Params, x0: jax.Array, penalty: Penalty, linear_map: Callable = dense):
    """Feed-forward pass: returns ([X_1, .., X_L], logits U_L)."""
    xs = []
    x = x0
    for layer in params[:-1]:
        x = penalty.forward(preactivation(layer, x, linear_map))
        xs.append(x)
    return xs, preactivation(params[-1], x, linear_map)


def regulariser(params: Params, rho) -> jax.Array:
    """Σ_l ρ_l ‖W_l‖² (kernels only)."""
    rho = broadcast_per_layer(rho, len(params), "rho")
    return sum(r * jnp.sum(layer["kernel"] ** 2) for r, layer in zip(rho, params))


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
    linear_map: Callable = dense,
) -> dict:
    """Breakdown of F(W, X): loss, each layer's λ-weighted penalty, regulariser, total."""
    n_layers = len(params)
    if len(xs) != n_layers - 1:
        raise ValueError(f"need {n_layers - 1} hidden activations, got {len(xs)}")
    lambdas = broadcast_per_layer(lambdas, n_layers - 1, "lambda")
    n = x0.shape[0]
    inputs = [x0, *xs]
    penalties = []
    for l in range(n_layers - 1):
        u = preactivation(params[l], inputs[l], linear_map)
        penalties.append(lambdas[l] * jnp.sum(penalty.value(u, xs[l])) / n)
    logits = preactivation(params[-1], inputs[-1], linear_map)
    data_loss = jnp.mean(loss_per_sample(loss, y, logits))
    reg = regulariser(params, rho)
    total = data_loss + sum(penalties) + reg
    return {"loss": data_loss, "penalties": penalties, "regulariser": reg, "total": total}


def lifted_objective(params, xs, x0, y, penalty, lambdas, rho, loss="softmax", linear_map=dense):
    """F(W, X) as defined in the module docstring."""
    return objective_terms(params, xs, x0, y, penalty, lambdas, rho, loss, linear_map)["total"]


def network_loss(params, x0, y, penalty, loss="softmax", linear_map=dense) -> jax.Array:
    """(1/N) Σ_i loss(Y_i, f(X_0,i)) of the plain feed-forward network."""
    _, logits = forward(params, x0, penalty, linear_map)
    return jnp.mean(loss_per_sample(loss, y, logits))


def accuracy(params, x0, labels, penalty, linear_map=dense) -> jax.Array:
    """Top-1 accuracy of the feed-forward network."""
    _, logits = forward(params, x0, penalty, linear_map)
    return jnp.mean(jnp.argmax(logits, -1) == labels)
