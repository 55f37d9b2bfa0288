"""Flax models of the lifted architectures, and warm start.

The lifted parameters are a list of {"kernel", "bias"} dicts, the layout of
flax's Dense layer, so loading lifted weights into the flax network
(`to_flax`) is a relabelling: layer l is the submodule "layer_<l>".
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fenchel.penalties import activation_penalty


class Network(nn.Module):
    """The layers in order (each spec's flax layer), the activation between them, logits out."""

    layers: Sequence
    activation: Callable = nn.relu

    @nn.compact
    def __call__(self, x):
        for i, spec in enumerate(self.layers):
            x = spec.flax_layer(x, name=f"layer_{i}")
            if i < len(self.layers) - 1:
                x = self.activation(x)
        return x


def make_network(layers: Sequence, activation: str = "relu", negative_slope: float = 0.01) -> Network:
    """The flax network of `layers` with the lifted activation's forward map φ."""
    return Network(layers=tuple(layers), activation=activation_penalty(activation, negative_slope).forward)


def to_flax(params: Sequence[dict]) -> dict:
    """Lifted params [{"kernel", "bias"}, …] → flax variables {"params": {"layer_i": …}}."""
    return {"params": {f"layer_{i}": {"kernel": p["kernel"], "bias": p["bias"]} for i, p in enumerate(params)}}


def from_flax(variables: dict) -> list[dict]:
    """Inverse of `to_flax`."""
    layers = variables["params"]
    return [dict(layers[f"layer_{i}"]) for i in range(len(layers))]


_JITTED_APPLY: dict = {}


def jitted_apply(model: nn.Module):
    """jax.jit(model.apply), built once per model so evaluations never retrace."""
    key = id(model)
    if key not in _JITTED_APPLY or _JITTED_APPLY[key][0] is not model:
        _JITTED_APPLY[key] = (model, jax.jit(model.apply))
    return _JITTED_APPLY[key][1]


def evaluate(model: nn.Module, variables, x, labels, batch_size: int = 10000) -> float:
    """Top-1 accuracy of the flax model: mean over samples of [argmax f(x) = label]."""
    apply = jitted_apply(model)
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        logits = apply(variables, x[i:i + batch_size])
        correct += int(jnp.sum(jnp.argmax(logits, -1) == labels[i:i + batch_size]))
    return correct / max(int(np.shape(x)[0]), 1)
