"""Per-layer specifications of a lifted network.

A network is a sequence of layer specs; layer l maps its input X_l to the
pre-activation U_l = A_l(X_l; W_l) + b_l. A spec owns everything that depends
on the layer type:

  init(key, in_shape, dtype)   parameters {"kernel", "bias"} (LeCun-normal kernel, zero bias)
  out_shape(in_shape)          shape of U_l for one sample
  linear_map(x, kernel)        A(X; W), sample axis leading
  flax_layer(x, name)          the same affine map as a flax layer, inside a compact module
  w_forms                      the W-block solver forms it supports (see `fenchel.blocks`)
  w_form(requested, x_in, mu)  the form a W block uses ("auto" resolved)

Adding a layer type (e.g. convolution) is one class here plus its name in
`LAYER_TYPES`; the blocks, objective and trainers only call the methods above.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

W_FORMS = ("auto", "primal", "kernel", "kernel_mm")


@dataclasses.dataclass(frozen=True)
class Dense:
    """Fully connected layer U = flatten(X) W + b; a multi-axis input is flattened first."""

    features: int
    kind = "dense"
    w_forms = W_FORMS

    def __post_init__(self):
        if not isinstance(self.features, int) or isinstance(self.features, bool) or self.features < 1:
            raise ValueError(f"dense layer needs a positive integer width, got {self.features!r}")

    def fan_in(self, in_shape: Sequence[int]) -> int:
        size = 1
        for d in in_shape:
            size *= int(d)
        return size

    def init(self, key: jax.Array, in_shape: Sequence[int], dtype=jnp.float32) -> dict:
        """LeCun-normal kernel (fan_in × features) and zero bias, as flax.linen.Dense."""
        kernel = jax.nn.initializers.lecun_normal()(key, (self.fan_in(in_shape), self.features), dtype)
        return {"kernel": kernel, "bias": jnp.zeros((self.features,), dtype)}

    def out_shape(self, in_shape: Sequence[int]) -> tuple:
        del in_shape
        return (self.features,)

    def linear_map(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """A(X; W) = flatten(X) W."""
        return x.reshape(x.shape[0], -1) @ kernel

    def flax_layer(self, x: jax.Array, name: str) -> jax.Array:
        return nn.Dense(self.features, name=name)(x.reshape(x.shape[0], -1))

    def w_form(self, requested: str, x_in: jax.Array, mu) -> str:
        """"auto": kernel_mm when N ≤ n_in and the block is strongly convex (μ > 0), kernel when μ = 0,
        primal when N > n_in (the N×N kernel would cost more than the n_in×n_in primal work)."""
        if requested not in self.w_forms:
            raise ValueError(f"unknown w_mode {requested!r}; known: {', '.join(self.w_forms)}")
        if requested == "kernel_mm" and not mu > 0:
            raise ValueError("w_mode='kernel_mm' needs ρ + ρ' > 0 (a strongly convex W block)")
        if requested != "auto":
            return requested
        n, n_in = x_in.shape[0], self.fan_in(x_in.shape[1:])
        if n > n_in:
            return "primal"
        return "kernel_mm" if mu > 0 else "kernel"


LAYER_TYPES = {"dense": Dense}


def parse_layers(spec: str) -> tuple:
    """"dense:300,dense:100" → (Dense(300), Dense(100)); the output layer is added by `network`."""
    if not isinstance(spec, str):
        raise ValueError(f"layers must be a string like 'dense:300,dense:100', got {spec!r}")
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        kind, _, arg = item.partition(":")
        if kind not in LAYER_TYPES:
            raise ValueError(f"layers: unknown layer type {kind!r} in {item!r}; known: {', '.join(LAYER_TYPES)}")
        try:
            width = int(arg)
        except ValueError:
            raise ValueError(f"layers: {item!r} needs an integer width, e.g. '{kind}:300'") from None
        out.append(LAYER_TYPES[kind](width))
    return tuple(out)


def mlp(sizes: Sequence[int]) -> tuple:
    """Dense layers for widths (n_0, n_1, …, n_{L+1}): (Dense(n_1), …, Dense(n_{L+1}))."""
    return tuple(Dense(int(n)) for n in sizes[1:])


def init_params(key: jax.Array, layers: Sequence, in_shape: Sequence[int], dtype=jnp.float32) -> list[dict]:
    """Parameters of every layer, one key per layer; the one initialiser shared by every trainer."""
    params = []
    shape = tuple(in_shape)
    for k, layer in zip(jax.random.split(key, len(layers)), layers):
        params.append(layer.init(k, shape, dtype))
        shape = layer.out_shape(shape)
    return params


def architecture_name(layers: Sequence, in_shape: Sequence[int]) -> str:
    """"784-300-10" for dense networks (input size, then each layer's width)."""
    size = 1
    for d in in_shape:
        size *= int(d)
    return "-".join([str(size)] + [str(getattr(layer, "features", layer.kind)) for layer in layers])
