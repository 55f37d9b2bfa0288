"""Per-layer specifications of a lifted network.

A network is a sequence of layer specs; layer l maps its input X_l to the
pre-activation U_l = A_l(X_l; W_l) + b_l. A spec owns everything that depends
on the layer type:

  init(key, in_shape, dtype)   parameters {"kernel", "bias"} (LeCun-normal kernel, zero bias)
  out_shape(in_shape)          shape of U_l for one sample
  linear_map(x, kernel)        A(X; W), sample axis leading
  patches(x)                   the matrix Z with A(X; W) = Z · W.reshape(-1, features) (rows: samples ×
                               output positions), used by the preconditioned W solvers
  flax_layer(x, name)          the same affine map as a flax layer, inside a compact module
  w_forms                      the W-block solver forms it supports (see `fenchel.blocks`)
  w_form(requested, x_in, mu)  the form a W block uses ("auto" resolved)

Average pooling (window = stride = `pool`) of a layer's input is folded into
its linear map, as the authors do: the lifted variable X holds the un-pooled
post-activation maps and every block stays convex.

Adding a layer type is one class here plus its name in `LAYER_TYPES`; the
blocks, objective and trainers only call the methods above.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

W_FORMS = ("auto", "primal", "primal_mm", "kernel", "kernel_mm")


def _positive_int(value, what):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")


def _pool_shape(in_shape, pool: int) -> tuple:
    """Shape of one sample after average pooling its (H, W, C) map by `pool`."""
    if pool == 1:
        return tuple(in_shape)
    if len(in_shape) != 3 or in_shape[0] % pool or in_shape[1] % pool:
        raise ValueError(f"average pooling by {pool} needs an (H, W, C) input with H and W divisible by {pool}, "
                         f"got {tuple(in_shape)}")
    return (in_shape[0] // pool, in_shape[1] // pool, in_shape[2])


def avg_pool(x: jax.Array, pool: int) -> jax.Array:
    """Average pooling of NHWC maps over non-overlapping pool×pool windows."""
    if pool == 1:
        return x
    n, h, w, c = x.shape
    return x.reshape(n, h // pool, pool, w // pool, pool, c).mean(axis=(2, 4))


@dataclasses.dataclass(frozen=True)
class Dense:
    """Fully connected layer U = flatten(pool(X)) W + b; a multi-axis input is (pooled and) flattened first."""

    features: int
    pool: int = 1
    kind = "dense"
    w_forms = W_FORMS

    def __post_init__(self):
        _positive_int(self.features, "a dense layer's width")
        _positive_int(self.pool, "pool")

    def fan_in(self, in_shape: Sequence[int]) -> int:
        size = 1
        for d in _pool_shape(in_shape, self.pool):
            size *= int(d)
        return size

    def init(self, key: jax.Array, in_shape: Sequence[int], dtype=jnp.float32) -> dict:
        """LeCun-normal kernel (fan_in × features) and zero bias, as flax.linen.Dense."""
        kernel = jax.nn.initializers.lecun_normal()(key, (self.fan_in(in_shape), self.features), dtype)
        return {"kernel": kernel, "bias": jnp.zeros((self.features,), dtype)}

    def out_shape(self, in_shape: Sequence[int]) -> tuple:
        del in_shape
        return (self.features,)

    def patches(self, x: jax.Array) -> jax.Array:
        """Z = flatten(pool(X)), one row per sample."""
        x = avg_pool(x, self.pool) if self.pool > 1 else x
        return x.reshape(x.shape[0], -1)

    def linear_map(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """A(X; W) = flatten(pool(X)) W."""
        return self.patches(x) @ kernel

    def flax_layer(self, x: jax.Array, name: str) -> jax.Array:
        if self.pool > 1:
            x = nn.avg_pool(x, (self.pool, self.pool), strides=(self.pool, self.pool))
        return nn.Dense(self.features, name=name)(x.reshape(x.shape[0], -1))

    def w_form(self, requested: str, x_in: jax.Array, mu) -> str:
        """"auto": kernel_mm when N ≤ n_in and the block is strongly convex (μ > 0), kernel when μ = 0,
        primal_mm when N > n_in (the N×N kernel would cost more than the (n_in+1)² majoriser; preconditioned,
        3 iterations of a full-batch sweep do what unpreconditioned primal FISTA does in far more:
        `tests/test_blocks.py`; docs/benchmarks.md, "Full-batch sweeps")."""
        _check_form(self, requested, mu)
        if requested != "auto":
            return requested
        n, n_in = x_in.shape[0], self.fan_in(x_in.shape[1:])
        if n > n_in:
            return "primal_mm"
        return "kernel_mm" if mu > 0 else "kernel"


def _check_form(spec, requested: str, mu) -> None:
    if requested not in spec.w_forms:
        raise ValueError(f"unknown w_mode {requested!r} for a {spec.kind} layer; known: {', '.join(spec.w_forms)}")
    if requested == "kernel_mm" and not mu > 0:
        raise ValueError("w_mode='kernel_mm' needs ρ + ρ' > 0 (a strongly convex W block)")


CONV_IMPLS = ("auto", "im2col", "toeplitz", "lax")
CONV_IMPL = "auto"  # the convolution's implementation; set it (tests do) to force one
TOEPLITZ_MAX_WIDTH_RATIO = 4  # "auto" takes the row-Toeplitz form when the padded input width ≤ this × kernel size


def conv_impl(narrow: bool = False) -> str:
    """"im2col", "toeplitz" or "lax": `CONV_IMPL`, where "auto" means lax off the CPU backend and on it a
    matrix-product form: row-Toeplitz for a narrow map (see `Conv.linear_map`), else im2col."""
    if CONV_IMPL not in CONV_IMPLS:
        raise ValueError(f"unknown CONV_IMPL {CONV_IMPL!r}; known: {', '.join(CONV_IMPLS)}")
    if CONV_IMPL != "auto":
        return CONV_IMPL
    if jax.default_backend() != "cpu":
        return "lax"
    return "toeplitz" if narrow else "im2col"


@dataclasses.dataclass(frozen=True)
class Conv:
    """2-D convolution U = conv(pool(X), W) + b on NHWC maps; kernel (k, k, C_in, features) (flax's HWIO).

    stride and padding ("VALID" or "SAME") as in `jax.lax.conv_general_dilated`;
    pool: average pooling of the input folded into the map.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: str = "VALID"
    pool: int = 1
    kind = "conv"
    w_forms = ("auto", "primal", "primal_mm")

    def __post_init__(self):
        _positive_int(self.features, "a conv layer's number of features")
        _positive_int(self.kernel_size, "kernel_size")
        _positive_int(self.stride, "stride")
        _positive_int(self.pool, "pool")
        if self.padding not in ("VALID", "SAME"):
            raise ValueError(f"padding must be 'VALID' or 'SAME', got {self.padding!r}")

    def _check_input(self, in_shape) -> tuple:
        if len(in_shape) != 3:
            raise ValueError(f"a conv layer needs (H, W, C) inputs, got a sample shape {tuple(in_shape)}")
        return _pool_shape(in_shape, self.pool)

    def init(self, key: jax.Array, in_shape: Sequence[int], dtype=jnp.float32) -> dict:
        """LeCun-normal kernel (k, k, C_in, features) and zero bias, as flax.linen.Conv."""
        c_in = self._check_input(in_shape)[2]
        shape = (self.kernel_size, self.kernel_size, c_in, self.features)
        return {"kernel": jax.nn.initializers.lecun_normal()(key, shape, dtype),
                "bias": jnp.zeros((self.features,), dtype)}

    def out_shape(self, in_shape: Sequence[int]) -> tuple:
        h, w, _ = self._check_input(in_shape)
        k, s = self.kernel_size, self.stride
        if self.padding == "SAME":
            return (-(-h // s), -(-w // s), self.features)
        if h < k or w < k:
            raise ValueError(f"a {k}×{k} VALID convolution needs maps of at least {k}×{k}, got {h}×{w}")
        return ((h - k) // s + 1, (w - k) // s + 1, self.features)

    def fan_in(self, in_shape: Sequence[int]) -> int:
        return self.kernel_size * self.kernel_size * self._check_input(in_shape)[2]

    def _shifted_windows(self, x: jax.Array) -> jax.Array:
        """im2col by k² strided slices of the padded, pooled input: (N, H', W', k²C), last axis in (kh, kw, c)
        order, so that conv(pool(X), W) = windows · W.reshape(k²C, features)."""
        x = self._padded_pooled(x)
        k, s = self.kernel_size, self.stride
        ho, wo = (x.shape[1] - k) // s + 1, (x.shape[2] - k) // s + 1
        return jnp.concatenate([x[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s, :]
                                for i in range(k) for j in range(k)], axis=-1)

    def _pads(self, hw) -> list:
        """[(top, bottom), (left, right)] padding of a pooled H×W map."""
        k, s = self.kernel_size, self.stride
        return lax.padtype_to_pads(tuple(hw), (k, k), (s, s), self.padding)

    def _padded_pooled(self, x: jax.Array) -> jax.Array:
        x = avg_pool(x, self.pool)
        return jnp.pad(x, ((0, 0), *self._pads(x.shape[1:3]), (0, 0)))

    def _row_toeplitz_map(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """conv(pool(X), W) as k products of input rows with row-Toeplitz matrices:
        U[:, i] = Σ_kh X̃[:, s·i + kh] T_kh, X̃ the padded, pooled input with rows flattened to (W_p·C), and
        T_kh[(w, c), (j, o)] = W[kh, w − s·j, c, o] where 0 ≤ w − s·j < k (0 elsewhere).

        k products instead of im2col's k² slices: its adjoint (from autodiff) sums k shifted row blocks, not k²
        shifted windows, which XLA:CPU recomputes in every fused consumer inside an X block's FISTA loop.
        Costs W_p/k times im2col's multiply-adds, so `linear_map` takes it only for narrow maps."""
        x = self._padded_pooled(x)
        k, s = self.kernel_size, self.stride
        n, hp, wp, c = x.shape
        ho, wo = (hp - k) // s + 1, (wp - k) // s + 1
        select = np.zeros((wp, wo, k), np.float32)  # select[w, j, q] = 1 where w = s·j + q
        for j in range(wo):
            select[s * j + np.arange(k), j, np.arange(k)] = 1.0
        toeplitz = jnp.einsum("wjq,hqco->hwcjo", jnp.asarray(select, kernel.dtype), kernel)
        toeplitz = toeplitz.reshape(k, wp * c, wo * kernel.shape[-1])
        rows = x.reshape(n, hp, wp * c)
        out = sum(rows[:, kh:kh + s * (ho - 1) + 1:s] @ toeplitz[kh] for kh in range(k))
        return out.reshape(n, ho, wo, kernel.shape[-1])

    def linear_map(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """A(X; W) = conv(pool(X), W), NHWC × HWIO → NHWC.

        On the CPU as matrix products: XLA:CPU runs a convolution inside a `while_loop` (every FISTA iteration
        of an X block) about 3× slower than at top level, a matrix product it does not. "auto" takes the
        row-Toeplitz form (`_row_toeplitz_map`) when the padded, pooled input is at most
        TOEPLITZ_MAX_WIDTH_RATIO kernel sizes wide (LeNet-5's second convolution: 14 columns, k = 5), else
        im2col (k² strided slices times the kernel matrix). Elsewhere `lax.conv_general_dilated`.
        """
        h, w, _ = _pool_shape(x.shape[1:], self.pool)
        padded_width = w + sum(self._pads((h, w))[1])
        impl = conv_impl(narrow=padded_width <= TOEPLITZ_MAX_WIDTH_RATIO * self.kernel_size)
        if impl == "toeplitz":
            return self._row_toeplitz_map(x, kernel)
        if impl == "im2col":
            return self._shifted_windows(x) @ kernel.reshape(-1, kernel.shape[-1])
        return lax.conv_general_dilated(avg_pool(x, self.pool), kernel, (self.stride, self.stride), self.padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def patches(self, x: jax.Array) -> jax.Array:
        """Z with rows (sample, output position) and columns (kh, kw, c) in kernel order: A(X; W) = Z W_flat
        (im2col for the matrix-product forms, computed once per W block solve)."""
        if conv_impl() != "lax":
            z = self._shifted_windows(x)
            return z.reshape(-1, z.shape[-1])
        k = self.kernel_size
        z = lax.conv_general_dilated_patches(avg_pool(x, self.pool), (k, k), (self.stride, self.stride),
                                             self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        n, h, w, _ = z.shape
        c = z.shape[-1] // (k * k)
        return z.reshape(n, h, w, c, k, k).transpose(0, 1, 2, 4, 5, 3).reshape(n * h * w, k * k * c)

    def flax_layer(self, x: jax.Array, name: str) -> jax.Array:
        if self.pool > 1:
            x = nn.avg_pool(x, (self.pool, self.pool), strides=(self.pool, self.pool))
        k, s = self.kernel_size, self.stride
        return nn.Conv(self.features, (k, k), strides=(s, s), padding=self.padding, name=name)(x)

    def w_form(self, requested: str, x_in: jax.Array, mu) -> str:
        """"auto": primal_mm (FISTA preconditioned by the exact (k²C_in+1)² majoriser)."""
        del x_in
        _check_form(self, requested, mu)
        return "primal_mm" if requested == "auto" else requested


LAYER_TYPES = {"dense": Dense, "conv": Conv}
_SYNTAX = ("'dense:WIDTH', 'conv:FEATURES:KERNEL[:STRIDE][:same|valid]', and 'pool:P' (average pooling folded "
           "into the next layer)")


def _parse_item(item: str, pool: int):
    kind, *args = item.split(":")
    try:
        if kind == "dense" and len(args) == 1:
            return Dense(int(args[0]), pool=pool)
        if kind == "conv" and 2 <= len(args) <= 4:
            padding = "VALID"
            if args[-1].lower() in ("same", "valid"):
                padding = args.pop().upper()
            stride = int(args[2]) if len(args) == 3 else 1
            return Conv(int(args[0]), int(args[1]), stride=stride, padding=padding, pool=pool)
    except ValueError as err:
        raise ValueError(f"layers: {item!r}: {err}") from None
    if kind not in LAYER_TYPES:
        raise ValueError(f"layers: unknown layer type {kind!r} in {item!r}; known: {_SYNTAX}")
    raise ValueError(f"layers: {item!r} does not fit the syntax {_SYNTAX}")


def parse_layers(spec: str) -> tuple:
    """"conv:6:5:same,pool:2,conv:16:5,pool:2,dense:120" → layer specs; the output layer is added by the caller.

    'dense:WIDTH'; 'conv:FEATURES:KERNEL[:STRIDE][:same|valid]'; 'pool:P' sets the average pooling
    folded into the next layer (a trailing pool goes to the output layer: see `output_layer`).
    """
    if not isinstance(spec, str):
        raise ValueError(f"layers must be a string like 'dense:300,dense:100', got {spec!r}")
    out, pool = [], 1
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item.startswith("pool:"):
            try:
                pool = int(item[5:])
                _positive_int(pool, "pool")
            except ValueError:
                raise ValueError(f"layers: {item!r} needs a positive integer, e.g. 'pool:2'") from None
            continue
        if item.split(":")[0] == "dense" and len(item.split(":")) == 2:
            try:
                int(item.split(":")[1])
            except ValueError:
                raise ValueError(f"layers: {item!r} needs an integer width, e.g. 'dense:300'") from None
        out.append(_parse_item(item, pool))
        pool = 1
    return tuple(out)


def trailing_pool(spec: str) -> int:
    """The pooling a layer string leaves for the output layer ('…,pool:2' at the end), else 1."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    return int(items[-1][5:]) if items and items[-1].startswith("pool:") else 1


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


def _layer_name(layer) -> str:
    pool = f"p{layer.pool}-" if layer.pool > 1 else ""
    if layer.kind == "conv":
        return f"{pool}c{layer.features}x{layer.kernel_size}" + (f"s{layer.stride}" if layer.stride > 1 else "")
    return f"{pool}{layer.features}"


def architecture_name(layers: Sequence, in_shape: Sequence[int]) -> str:
    """"784-300-10" for dense networks (input size, then each layer's width); conv layers read "c6x5",
    a folded pooling "p2-"; image inputs read "28x28x1"."""
    first = "x".join(str(int(d)) for d in in_shape) if len(in_shape) > 1 else str(int(in_shape[0]))
    return "-".join([first] + [_layer_name(layer) for layer in layers])
