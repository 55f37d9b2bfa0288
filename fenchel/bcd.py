"""Block-coordinate descent (BCD) on the lifted objective.

Schedules of one sweep (X blocks, then all W blocks, which are independent
given X):
  "sequential"  Gauss–Seidel: X_L, X_{L−1}, …, X_1 one after another (the
                authors' order), then W_0..W_L.
  "parallel"    odd hidden layers at once, then even hidden layers at once
                (each half-sweep's blocks are independent), then all W at once.

Training modes:
  full batch  X persists across sweeps (initialised by a forward pass), no
              proximal term; every block solve is monotone, so the objective
              never increases.
  minibatch   per minibatch: X ← forward pass with the current weights,
              anchors ← current weights, then `alternations` rounds of
              (X step, W step) with the proximal term ρ'‖(W, b) − anchor‖².
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from fenchel import blocks
from fenchel.blocks import SolverConfig
from fenchel.data import epoch_batches
from fenchel.lifted import LOSSES, broadcast_per_layer, dense, forward, loss_per_sample, objective_terms, preactivation
from fenchel.penalties import get_penalty
from fenchel.solvers import Result

SCHEDULES = ("sequential", "parallel")
PerLayer = Union[float, Sequence[float]]


@dataclasses.dataclass(frozen=True)
class LiftedConfig:
    """Hyperparameters of lifted BCD training.

    lambdas: λ_l, one value or one per penalty (L values for L hidden layers).
    rho: ρ_l, one value or one per layer (L + 1 values).
    rho_prox: ρ' of the proximal term in minibatch mode, one value or one per layer.
    lbd_coef: κ, the weight of the downstream term in each X step (1 = exact BCD).
    alternations: (X step, W step) rounds per minibatch.
    """

    activation: str = "relu"
    negative_slope: float = 0.01
    lifting: str = "fenchel"
    loss: str = "softmax"
    lambdas: PerLayer = 1.0
    rho: PerLayer = 0.0
    rho_prox: PerLayer = 0.0
    lbd_coef: float = 1.0
    alternations: int = 1
    schedule: str = "sequential"
    x_mode: str = "batched"
    w_mode: str = "auto"
    x_solver: SolverConfig = SolverConfig(tol=1e-5, max_steps=100)
    w_solver: SolverConfig = SolverConfig(tol=1e-5, max_steps=100)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; known: {', '.join(LOSSES)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")
        if self.w_mode not in blocks.W_MODES:
            raise ValueError(f"unknown w_mode {self.w_mode!r}; known: {', '.join(blocks.W_MODES)}")
        if self.x_mode not in blocks.X_MODES:
            raise ValueError(f"unknown x_mode {self.x_mode!r}; known: {', '.join(blocks.X_MODES)}")
        for name in ("lambdas", "rho", "rho_prox"):
            vals = getattr(self, name)
            vals = list(vals) if isinstance(vals, (list, tuple)) else [vals]
            if any(not (v >= 0) for v in vals):
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if not self.lbd_coef > 0:
            raise ValueError(f"lbd_coef must be positive, got {self.lbd_coef}")
        if int(self.alternations) < 1:
            raise ValueError(f"alternations must be ≥ 1, got {self.alternations}")
        _ = self.penalty  # validates activation / lifting

    @property
    def penalty(self):
        params = {"negative_slope": self.negative_slope} if self.activation == "leaky_relu" else {}
        return get_penalty(self.activation, self.lifting, **params)


class SweepInfo(NamedTuple):
    """Worst-case solver diagnostics of one sweep."""

    x_residual: jax.Array
    x_steps: jax.Array
    w_residual: jax.Array
    w_steps: jax.Array
    nonfinite: jax.Array


def _worst(infos):
    res = jnp.max(jnp.stack([jnp.max(i.residual) for i in infos])) if infos else jnp.zeros(())
    steps = jnp.max(jnp.stack([jnp.max(i.steps) for i in infos])) if infos else jnp.zeros((), jnp.int32)
    bad = jnp.any(jnp.stack([jnp.any(i.result == Result.NONFINITE) for i in infos])) if infos else jnp.zeros((), bool)
    return res, steps, bad


class LiftedTrainer:
    """Jitted BCD for an MLP (dense layers; `linear_map` generalises the layer).

    Parameters are a list of {"kernel", "bias"} dicts (flax.linen.Dense layout).
    Every public method is jitted once per input shape.
    """

    def __init__(self, config: LiftedConfig, n_layers: int, linear_map: Callable = dense):
        if n_layers < 2:
            raise ValueError("lifted training needs at least one hidden layer (n_layers ≥ 2)")
        self.config = config
        self.n_layers = n_layers
        self.linear_map = linear_map
        self.penalty = config.penalty
        self.lambdas = broadcast_per_layer(config.lambdas, n_layers - 1, "lambdas")
        self.rhos = broadcast_per_layer(config.rho, n_layers, "rho")
        self.rho_proxes = broadcast_per_layer(config.rho_prox, n_layers, "rho_prox")
        self.forward = jax.jit(lambda p, x0: forward(p, x0, self.penalty, linear_map)[0])
        self.predict = jax.jit(lambda p, x0: forward(p, x0, self.penalty, linear_map)[1])
        self.objective_terms = jax.jit(self._objective_terms)
        self.x_step = jax.jit(self._x_step)
        self.w_step = jax.jit(self._w_step)
        self.sweep = jax.jit(self._sweep)
        self.minibatch_update = jax.jit(self._minibatch_update)
        self.minibatch_objective = jax.jit(self._minibatch_objective)
        self.w_block = jax.jit(self._w_block, static_argnums=0)

    # ------------------------------------------------------------ objective
    def _objective_terms(self, params, xs, x0, y):
        c = self.config
        return objective_terms(params, xs, x0, y, self.penalty, self.lambdas, self.rhos, c.loss, self.linear_map)

    # ------------------------------------------------------------ X blocks
    def _x_block(self, l, params, xs, x0, y):
        """Update hidden activation X_l (1 ≤ l ≤ L) given its neighbours."""
        c = self.config
        inputs = [x0, *xs]
        u_prev = preactivation(params[l - 1], inputs[l - 1], self.linear_map)
        if l == self.n_layers - 1:
            return blocks.solve_x_last(
                self.penalty, xs[l - 1], u_prev, params[l], y, self.lambdas[l - 1], c.loss,
                c.x_solver, c.x_mode, loss_weight=c.lbd_coef, linear_map=self.linear_map,
            )
        return blocks.solve_x_hidden(
            self.penalty, xs[l - 1], u_prev, params[l], xs[l], self.lambdas[l - 1],
            c.lbd_coef * self.lambdas[l], c.x_solver, c.x_mode, self.linear_map,
        )

    def _x_step(self, params, xs, x0, y):
        """One pass over the X blocks in the configured schedule."""
        xs = list(xs)
        n_hidden = self.n_layers - 1
        infos = []
        if self.config.schedule == "sequential":
            for l in range(n_hidden, 0, -1):
                xs[l - 1], info = self._x_block(l, params, xs, x0, y)
                infos.append(info)
        else:
            for parity in (1, 0):
                layers = [l for l in range(1, n_hidden + 1) if l % 2 == parity]
                new = [self._x_block(l, params, xs, x0, y) for l in layers]  # all read the same xs
                for l, (x, info) in zip(layers, new):
                    xs[l - 1] = x
                    infos.append(info)
        return xs, infos

    # ------------------------------------------------------------ W blocks
    def _w_block(self, l, params, xs, x0, y, anchors=None):
        """Update layer l's (W, b) given X; layers are independent of each other."""
        c = self.config
        inputs = [x0, *xs]
        anchor = None if anchors is None else anchors[l]
        if l == self.n_layers - 1:
            return blocks.solve_w_out(
                params[l], inputs[l], y, self.rhos[l], c.loss, c.w_solver, anchor, self.rho_proxes[l], self.linear_map,
                c.w_mode,
            )
        return blocks.solve_w_hidden(
            self.penalty, params[l], inputs[l], xs[l], self.lambdas[l], self.rhos[l], c.w_solver,
            anchor, self.rho_proxes[l], self.linear_map, c.w_mode,
        )

    def _w_step(self, params, xs, x0, y, anchors=None):
        """All W blocks at once (they are independent given X)."""
        out = [self._w_block(l, params, xs, x0, y, anchors) for l in range(self.n_layers)]
        return [p for p, _ in out], [i for _, i in out]

    def _round(self, params, xs, x0, y, anchors=None):
        xs, x_infos = self._x_step(params, xs, x0, y)
        params, w_infos = self._w_step(params, xs, x0, y, anchors)
        xr, xsteps, xbad = _worst(x_infos)
        wr, wsteps, wbad = _worst(w_infos)
        return params, xs, SweepInfo(xr, xsteps, wr, wsteps, xbad | wbad)

    def _sweep(self, params, xs, x0, y):
        """One full-batch BCD sweep: X blocks in schedule order, then all W blocks."""
        return self._round(params, xs, x0, y)

    def _minibatch_update(self, params, x0, y):
        """Minibatch BCD: X from a forward pass, anchors = current weights, k rounds.

        Returns (params, SweepInfo of the last round). The objective is not
        evaluated here (it would cost a forward pass per step): use
        `objective_terms` / `minibatch_objective` at logging time.
        """
        anchors = params
        xs = forward(params, x0, self.penalty, self.linear_map)[0]
        info = None
        for _ in range(self.config.alternations):
            params, xs, info = self._round(params, xs, x0, y, anchors)
        return params, info

    def _minibatch_objective(self, params, x0, y):
        """Terms of F after one minibatch update's X step from the forward pass, at fixed W.

        This is the lifted objective the minibatch algorithm sees (a lower
        bound of the network loss + regulariser on this batch); also returns
        the network loss on the batch.
        """
        xs, logits = forward(params, x0, self.penalty, self.linear_map)
        xs, _ = self._x_step(params, xs, x0, y)
        terms = self._objective_terms(params, xs, x0, y)
        terms["network_loss"] = jnp.mean(loss_per_sample(self.config.loss, y, logits))
        return terms

    # ------------------------------------------------------------ drivers
    def fit_full_batch(self, params, x0, y, sweeps: int, callback: Optional[Callable] = None):
        """Full-batch BCD for `sweeps` sweeps; returns (params, xs, objective history)."""
        xs = self.forward(params, x0)
        history = [float(self.objective_terms(params, xs, x0, y)["total"])]
        for k in range(sweeps):
            params, xs, info = self.sweep(params, xs, x0, y)
            history.append(float(self.objective_terms(params, xs, x0, y)["total"]))
            if not jnp.isfinite(history[-1]):
                raise FloatingPointError(f"non-finite lifted objective at sweep {k + 1}")
            if callback is not None:
                callback(k, params, xs, info)
        return params, xs, history

    def run_epoch(self, params, x_train, y_train, batch_size: int, key: jax.Array,
                  callback: Optional[Callable] = None):
        """One epoch of minibatch BCD over seeded-shuffled data (the last partial batch is dropped).

        Returns (params, SweepInfo of the last minibatch, seconds).
        """
        batches = epoch_batches(key, x_train.shape[0], batch_size)
        start = time.perf_counter()
        metrics = None
        for i, idx in enumerate(batches):
            params, metrics = self.minibatch_update(params, x_train[idx], y_train[idx])
            if callback is not None:
                callback(i, len(batches), params, metrics)
        jax.block_until_ready(params)
        return params, metrics, time.perf_counter() - start
