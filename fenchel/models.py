"""Flax models of the lifted architectures, warm start and optax training.

The lifted parameters are a list of {"kernel", "bias"} dicts, exactly the
layout of flax.linen.Dense, so warm starting is a relabelling.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fenchel.data import epoch_batches
from fenchel.lifted import loss_per_sample
from fenchel.penalties import get_penalty


class MLP(nn.Module):
    """Dense layers of widths `features`, activation between them, logits out."""

    features: Sequence[int]
    activation: Callable = nn.relu

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.features):
            x = nn.Dense(width, name=f"Dense_{i}")(x)
            if i < len(self.features) - 1:
                x = self.activation(x)
        return x


def make_mlp(sizes: Sequence[int], activation: str = "relu", negative_slope: float = 0.01) -> MLP:
    """The flax MLP with layer sizes (n_0, …, n_{L+1}) and the lifted activation's forward map."""
    params = {"negative_slope": negative_slope} if activation == "leaky_relu" else {}
    return MLP(features=tuple(sizes[1:]), activation=get_penalty(activation, **params).forward)


def to_flax(params: Sequence[dict]) -> dict:
    """Lifted params [{"kernel", "bias"}, …] → flax variables {"params": {"Dense_i": …}}."""
    return {"params": {f"Dense_{i}": {"kernel": p["kernel"], "bias": p["bias"]} for i, p in enumerate(params)}}


def from_flax(variables: dict) -> list[dict]:
    """Inverse of `to_flax`."""
    layers = variables["params"]
    return [dict(layers[f"Dense_{i}"]) for i in range(len(layers))]


def init_params(model: MLP, key: jax.Array, n_in: int, dtype=jnp.float32) -> list[dict]:
    """Flax's default initialisation, in the lifted layout (shared by every trainer)."""
    variables = model.init(key, jnp.zeros((1, n_in), dtype))
    return from_flax(jax.tree_util.tree_map(lambda a: a.astype(dtype), variables))


def make_optimizer(name: str, learning_rate: float, momentum: float = 0.9) -> optax.GradientTransformation:
    """optax optimiser by name: "sgd" (with momentum) or "adam"."""
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    if name == "sgd":
        return optax.sgd(learning_rate, momentum=momentum or None)
    if name == "adam":
        return optax.adam(learning_rate)
    raise ValueError(f"unknown optimizer {name!r}; known: sgd, adam")


class OptaxTrainer:
    """Minibatch training of a flax model with an optax optimiser (jitted step)."""

    def __init__(self, model: MLP, optimizer: optax.GradientTransformation, loss: str = "softmax",
                 num_classes: int = 10):
        self.model = model
        self.optimizer = optimizer
        self.loss = loss
        self.num_classes = num_classes

        def loss_fn(variables, x, labels):
            logits = model.apply(variables, x)
            return jnp.mean(loss_per_sample(loss, jax.nn.one_hot(labels, num_classes, dtype=logits.dtype), logits))

        def step(variables, opt_state, x, labels):
            value, grads = jax.value_and_grad(loss_fn)(variables, x, labels)
            updates, opt_state = optimizer.update(grads, opt_state, variables)
            return optax.apply_updates(variables, updates), opt_state, value

        self.step = jax.jit(step)
        self.loss_fn = jax.jit(loss_fn)

    def init(self, params: Sequence[dict]):
        variables = to_flax(params)
        return variables, self.optimizer.init(variables)

    def run_epoch(self, variables, opt_state, x_train, y_train, batch_size: int, key: jax.Array,
                  callback: Optional[Callable] = None):
        """One epoch over seeded-shuffled data (last partial batch dropped); returns (…, seconds)."""
        batches = epoch_batches(key, x_train.shape[0], batch_size)
        start = time.perf_counter()
        value = None
        for i, idx in enumerate(batches):
            variables, opt_state, value = self.step(variables, opt_state, x_train[idx], y_train[idx])
            if callback is not None:
                callback(i, len(batches), variables, value)
        jax.block_until_ready(variables)
        return variables, opt_state, value, time.perf_counter() - start


_JITTED_APPLY: dict = {}


def jitted_apply(model: nn.Module):
    """jax.jit(model.apply), built once per model so evaluations never retrace."""
    key = id(model)
    if key not in _JITTED_APPLY or _JITTED_APPLY[key][0] is not model:
        _JITTED_APPLY[key] = (model, jax.jit(model.apply))
    return _JITTED_APPLY[key][1]


def evaluate(model: MLP, variables, x, labels, batch_size: int = 10000) -> float:
    """Top-1 accuracy of the flax model."""
    apply = jitted_apply(model)
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        logits = apply(variables, x[i:i + batch_size])
        correct += int(jnp.sum(jnp.argmax(logits, -1) == labels[i:i + batch_size]))
    return correct / max(int(np.shape(x)[0]), 1)
