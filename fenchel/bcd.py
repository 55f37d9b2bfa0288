"""Block-coordinate descent (BCD) on the lifted objective.

Schedules of one sweep (X blocks, then all W blocks, which are independent
given X):
  "sequential"  Gauss–Seidel: X_L, X_{L−1}, …, X_1 one after another (the
                authors' order), then W_0..W_L.
  "parallel"    odd hidden layers at once, then even hidden layers at once
                (each half-sweep's blocks are independent), then all W at once.

Training modes:
  full batch  X persists across sweeps (initialised by a forward pass), no
              proximal term; every block solve returns a point no worse than
              its start (the solver's safeguard), so for κ = lbd_coef = 1 the
              objective never increases.
  minibatch   per minibatch: X ← forward pass with the current weights,
              anchors ← current weights, then `alternations` rounds of
              (X step, W step) with the proximal term ρ'‖(W, b) − anchor‖².
              With outer_momentum β > 0, the update's change is fed to heavy-ball
              momentum as a pseudo-gradient: v ← βv + (W_t − W'), W_t+1 = W_t − v.

Multi-branch heads (`fenchel.heads`, minibatch mode): the output layer has
K·C columns and the loss is taken on the merged logits U M. Per minibatch,
GuideBP's weakness scores are first updated from the forward pass's logits;
M (the guide selection) then stays fixed for the minibatch's blocks, so the
X-last and W-out blocks stay convex (`blocks.solve_x_last`,
`blocks.solve_w_out` with `merge=M`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from fenchel import blocks, heads, lifted
from fenchel.blocks import SolverConfig
from fenchel.heads import Head
from fenchel.layers import W_FORMS
from fenchel.lifted import LOSSES, broadcast_per_layer, forward, loss_per_sample, objective_terms, preactivation
from fenchel.penalties import activation_penalty
from fenchel.solvers import Result
from fenchel.trainer import StepInfo, Trainer, make_optimizer

SCHEDULES = ("sequential", "parallel")
LAMBDA_UPDATES = ("fixed", "continuation", "dual")
LAMBDA_GRANULARITIES = ("layer", "neuron")
STACK_LAYERS = ("auto", "on", "off")
BOUND_X_TOL = 1e-6  # each X block of the relaxation bound's sweeps (metrics) is solved to this
BOUND_X_MAX_STEPS = 200
X_CHUNK_BYTES_CPU = 2**21  # `x_chunk_bytes` "auto" on the CPU: chunks of X that fit in L2/L3 with FISTA's state
BOUND_RTOL = 1e-7  # the bound's sweeps stop once F decreases by less than this, relative
PerLayer = Union[float, Sequence[float]]


@dataclasses.dataclass(frozen=True)
class LiftedConfig:
    """Hyperparameters of lifted BCD training; the defaults are the tuned MNIST settings (see README).

    Each field has its one default here; the launcher's config fields take theirs from this class.

    lambdas: λ_l, one value or one per penalty (L values for L hidden layers).
    rho: ρ_l, one value or one per layer (L + 1 values).
    rho_prox: ρ' of the proximal term in minibatch mode, one value or one per layer.
    lbd_coef: κ, the weight of the downstream term in each X step (1 = exact BCD).
    alternations: (X step, W step) rounds per minibatch.
    schedule: order of the X blocks (`SCHEDULES`).
    x_mode: X blocks batched over samples or vmapped ("batched", "vmap").
    w_mode: W-block solver form (`fenchel.layers.W_FORMS`; "auto": the layer chooses).
    x_tol, x_max_steps, w_tol, w_max_steps: stopping rule of each X / W block solve. One W iteration is one
      majorise-minimise step from the block's start (exact on the quadratic part); 784-300-10 trained with one
      (since 2026-11-27) as accurately as with three on MNIST and 1.2 points better on Fashion-MNIST, and
      784-300-100-10 within 0.11 on both (0.12 after warm start), at less cost per step; LeNet-5, 0.05–0.16
      lower in a short run, keeps 3 in its configs (docs/benchmarks.md, "One W iteration").
    lambda_update: how λ changes during training (`LAMBDA_UPDATES`), after every minibatch update:
      "fixed"         λ stays at `lambdas`;
      "continuation"  λ_l ← min(lambda_growth · λ_l, lambda_max);
      "dual"          dual ascent on the Lagrange relaxation of the constraints B_l(U_l, X_l+1) = 0:
                      λ_l ← min(λ_l + lambda_step · p_l, lambda_max), p_l = (1/N) Σ_i B_l(U_l,i, X_l+1,i) ≥ 0
                      at the update's (W, X) — a subgradient of the dual function; λ never decreases.
    lambda_granularity: "layer" (one λ per penalty) or "neuron" (one λ per neuron — a channel of a conv
      layer — of each hidden layer, each with its own dual-ascent step on its own mean penalty
      p_l,j = (1/N) Σ_i Σ_positions B; `lambdas` is every neuron's start value). "neuron" needs
      lambda_update="dual": the other updates treat every neuron of a layer alike.
    x_chunk_bytes: batched X blocks with more rows than fit this many bytes of X are solved in consecutive chunks
      of rows that do (`SolverConfig.chunk_bytes`): the same iterates, with each chunk's FISTA loop state in
      cache. -1 ("auto"): `X_CHUNK_BYTES_CPU` on the CPU backend (a full-batch sweep of 784-300-10 on 60,000
      samples: X₁ block 0.60 → 0.39 s on 2 cores; docs/benchmarks.md) and off elsewhere, where one large
      solve keeps the device busy; 0: off. Minibatches of 100 are below it and unaffected.
    bound_max_sweeps: the most X sweeps of the relaxation bound min_X F(W, X) that `metrics` logs (each
      sweep costs up to 200 iterations per X block on the objective batch: minutes per evaluation for a
      CNN); 0 logs the network objective J(W) without the bound.
    outer_momentum: β of heavy-ball momentum on the minibatch updates (0: none). Each update's change is a
      pseudo-gradient g = W_t − W' (W' the rounds' result from W_t) for optax SGD with learning rate 1 and
      momentum β: v ← βv + g, W_t+1 = W_t − v (β = 0 gives W'). Pair it with a larger ρ' (smaller, less noisy
      steps that momentum then accumulates), larger still on the output layer, whose scale otherwise runs
      away (`configs/mnist_mlp_momentum.py`; docs/outer_momentum.md). Weights only: λ and a head's state
      follow their own rules, computed at W'. Full-batch sweeps ignore it.
    stack_layers: hidden W blocks of the same shape (layer spec, input shape, ρ, ρ') solved as one block
      vmapped over their stacked layers: "on", "off", or "auto" (on except on the CPU backend, where it does
      not pay; docs/benchmarks.md). The result is the same up to float rounding.
    w_retry: a float32 (or narrower) W block solved in the kernel_mm form that comes back non-finite (raw-scale,
      nearly collinear inputs whose N × N system float32 cannot factor) is solved again in the primal_mm form
      (`blocks.solve_w`). It is one `lax.cond` per W solve (a block, or a stacked group) and round: within the
      CPU's noise, but on a GPU a round trip to the host each, and slower under XLA's WHILE/CONDITIONAL command
      buffers (docs/benchmarks.md, "The W retry and command buffers on the GPU"). False: such a block keeps its
      start and is reported non-finite (`SweepInfo.nonfinite`), which stops a launcher run as diverged and a
      full-batch fit with FloatingPointError; a run that goes on is the same either way.
    """

    activation: str = "relu"
    negative_slope: float = 0.01
    lifting: str = "fenchel"
    loss: str = "softmax"
    lambdas: PerLayer = 3.0
    rho: PerLayer = 1e-5
    rho_prox: PerLayer = 0.1
    lbd_coef: float = 1.0
    alternations: int = 1
    schedule: str = "sequential"
    x_mode: str = "batched"
    w_mode: str = "auto"
    x_tol: float = 1e-4
    x_max_steps: int = 10
    w_tol: float = 1e-4
    w_max_steps: int = 1
    lambda_update: str = "fixed"
    lambda_step: float = 1.0
    lambda_growth: float = 1.001
    lambda_max: float = 1e3
    lambda_granularity: str = "layer"
    outer_momentum: float = 0.0
    stack_layers: str = "auto"
    bound_max_sweeps: int = 50
    x_chunk_bytes: int = -1
    w_retry: bool = True

    def __post_init__(self):
        def need(cond, field, msg):
            if not cond:
                raise ValueError(f"{field}={getattr(self, field)!r}: {msg}")

        need(self.loss in LOSSES, "loss", f"unknown loss; known: {', '.join(LOSSES)}")
        need(self.schedule in SCHEDULES, "schedule", f"unknown schedule; known: {', '.join(SCHEDULES)}")
        need(self.w_mode in W_FORMS, "w_mode", f"unknown w_mode; known: {', '.join(W_FORMS)}")
        need(isinstance(self.w_retry, bool), "w_retry", "must be True or False")
        need(self.x_mode in blocks.X_MODES, "x_mode", f"unknown x_mode; known: {', '.join(blocks.X_MODES)}")
        for name, upper in (("lambdas", 1e6), ("rho", None), ("rho_prox", None)):
            vals = getattr(self, name)
            vals = list(vals) if isinstance(vals, (list, tuple)) else [vals]
            need(all(isinstance(v, (int, float)) and v >= 0 and v < float("inf") for v in vals), name,
                 "must be finite and non-negative")
            # Beyond 1e6 the λ-weighted penalties swamp the data loss in float32 arithmetic.
            if upper is not None:
                need(all(v <= upper for v in vals), name, f"must be at most {upper:g}")
        need(self.lbd_coef > 0, "lbd_coef", "must be positive")
        need(self.lambda_update in LAMBDA_UPDATES, "lambda_update",
             f"unknown lambda_update; known: {', '.join(LAMBDA_UPDATES)}")
        need(self.lambda_step > 0, "lambda_step", "must be positive")
        need(self.lambda_granularity in LAMBDA_GRANULARITIES, "lambda_granularity",
             f"unknown lambda_granularity; known: {', '.join(LAMBDA_GRANULARITIES)}")
        need(self.lambda_granularity == "layer" or self.lambda_update == "dual", "lambda_granularity",
             "per-neuron multipliers need lambda_update='dual' (fixed and continuation treat every neuron alike)")
        need(0 <= self.outer_momentum < 1, "outer_momentum", "must be in [0, 1)")
        need(int(self.bound_max_sweeps) >= 0, "bound_max_sweeps", "must be ≥ 0")
        need(int(self.x_chunk_bytes) >= -1, "x_chunk_bytes", "must be -1 (auto), 0 (off) or a number of bytes")
        need(self.stack_layers in STACK_LAYERS, "stack_layers",
             f"unknown stack_layers; known: {', '.join(STACK_LAYERS)}")
        need(self.lambda_growth >= 1, "lambda_growth", "must be ≥ 1 (λ grows under continuation)")
        lams = list(self.lambdas) if isinstance(self.lambdas, (list, tuple)) else [self.lambdas]
        need(max(lams) <= self.lambda_max <= 1e6, "lambda_max", f"must be in [max(lambdas) = {max(lams)}, 1e6]")
        need(int(self.alternations) >= 1, "alternations", "must be ≥ 1")
        for prefix in ("x", "w"):
            need(getattr(self, f"{prefix}_tol") > 0, f"{prefix}_tol", "must be positive")
            need(int(getattr(self, f"{prefix}_max_steps")) >= 1, f"{prefix}_max_steps", "must be ≥ 1")
        _ = self.penalty  # validates activation / lifting / negative_slope

    @property
    def penalty(self):
        return activation_penalty(self.activation, self.negative_slope, self.lifting)

    @property
    def x_solver(self) -> SolverConfig:
        chunk = int(self.x_chunk_bytes)
        if chunk == -1:
            chunk = X_CHUNK_BYTES_CPU if jax.default_backend() == "cpu" else 0
        return SolverConfig(tol=self.x_tol, max_steps=int(self.x_max_steps), chunk_bytes=chunk)

    @property
    def w_solver(self) -> SolverConfig:
        return SolverConfig(tol=self.w_tol, max_steps=int(self.w_max_steps))


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


class LiftedTrainer(Trainer):
    """Jitted BCD for a network given as a sequence of layer specs (`fenchel.layers`).

    Parameters are a list of {"kernel", "bias"} dicts (flax.linen.Dense layout).
    Every public method is jitted once per input shape. As a `Trainer`, its
    state is the parameter list and `step` is one minibatch update.
    """

    def __init__(self, config: LiftedConfig, layers: Sequence, head: Optional[Head] = None):
        layers = tuple(layers)
        if len(layers) < 2:
            raise ValueError("lifted training needs at least one hidden layer (two or more layers)")
        self.head = head
        self.eval_layers = layers
        if head is not None:
            layers = head.training_layers(layers)
        self.config = config
        self.layers = layers
        self.n_layers = len(layers)
        self.penalty = config.penalty
        self.lambdas = broadcast_per_layer(config.lambdas, self.n_layers - 1, "lambdas")
        self.rhos = broadcast_per_layer(config.rho, self.n_layers, "rho")
        self.rho_proxes = broadcast_per_layer(config.rho_prox, self.n_layers, "rho_prox")
        self._outer = make_optimizer("sgd", 1.0, config.outer_momentum) if config.outer_momentum else None
        self.stack_w = config.stack_layers == "on" or (config.stack_layers == "auto" and jax.default_backend() != "cpu")
        self.forward = jax.jit(lambda p, x0: forward(p, x0, self.penalty, layers)[0])
        self.predict = jax.jit(lambda p, x0: forward(p, x0, self.penalty, layers)[1])
        self.objective_terms = jax.jit(self._objective_terms)
        self.x_step = jax.jit(self._x_step)
        self.w_step = jax.jit(self._w_step, static_argnames=("anchor_is_start",))
        self.sweep = jax.jit(self._sweep)
        self.minibatch_update = jax.jit(self._minibatch_update)
        self.head_update = jax.jit(self._head_update)
        self.minibatch_objective = jax.jit(self._minibatch_objective)
        self.multiplier_update = jax.jit(self._multiplier_update)
        self.relaxation = jax.jit(self._relaxation)
        self.x_block = jax.jit(self._x_block, static_argnums=0)
        self.w_block = jax.jit(self._w_block, static_argnums=0, static_argnames=("anchor_is_start",))

    def with_config(self, config: LiftedConfig) -> "LiftedTrainer":
        """The same network and head, trained with `config`."""
        return LiftedTrainer(config, self.eval_layers, self.head)

    # ------------------------------------------------------------ Trainer interface
    def init(self, params):
        """The parameter list; with a head, (parameters with the K·C-column output layer, head state); with a
        λ update other than "fixed", (that state, λ): λ an array of one value per hidden layer, or with
        lambda_granularity="neuron" a tuple of one array per hidden layer, one value per neuron; with
        outer_momentum > 0, (that state, the momentum's optax state)."""
        params = [dict(p) for p in params]
        if self.head is None:
            inner = params
        else:
            params = self.head.expand(params)
            inner = params, self.head.init_state(params)
        if self.config.lambda_update != "fixed":
            dtype = params[0]["kernel"].dtype
            if self.config.lambda_granularity == "neuron":
                lams = tuple(jnp.full((self.layers[l].features,), self.lambdas[l], dtype)
                             for l in range(self.n_layers - 1))
            else:
                lams = jnp.asarray(self.lambdas, dtype=dtype)
            inner = inner, lams
        return (inner, self._outer.init(params)) if self._outer is not None else inner

    def _weights(self, state):
        """The trained weights of a state without its momentum part (with a head: the K·C-column layout)."""
        if self.config.lambda_update != "fixed":
            state = state[0]
        return state if self.head is None else state[0]

    def _with_weights(self, state, weights):
        """`state` (without its momentum part) holding `weights` instead."""
        lam = self.config.lambda_update != "fixed"
        inner = state[0] if lam else state
        inner = weights if self.head is None else (weights, inner[1])
        return (inner, state[1]) if lam else inner

    def step(self, state, x, y):
        if self._outer is None:
            return self._step_without_momentum(state, x, y)
        state, outer = state
        before = self._weights(state)
        state, info = self._step_without_momentum(state, x, y)
        pseudo_gradient = jax.tree_util.tree_map(jnp.subtract, before, self._weights(state))  # W_t − W'
        updates, outer = self._outer.update(pseudo_gradient, outer, before)
        return (self._with_weights(state, optax.apply_updates(before, updates)), outer), info

    def _step_without_momentum(self, state, x, y):
        if self.config.lambda_update != "fixed":
            inner, lams, info = self.multiplier_update(*state, x, y)
            return (inner, lams), StepInfo(jnp.full((), jnp.nan, x.dtype), info.nonfinite)
        if self.head is None:
            params, info = self.minibatch_update(state, x, y)
            return params, StepInfo(jnp.full((), jnp.nan, x.dtype), info.nonfinite)
        params, head_state, info = self.head_update(*state, x, y)
        return (params, head_state), StepInfo(jnp.full((), jnp.nan, x.dtype), info.nonfinite)

    def params(self, state):
        """The network's weights; with a head, the evaluation network (mean of the branches' logits)."""
        weights = self._weights(state[0] if self._outer is not None else state)
        return weights if self.head is None else self.head.collapse(weights)

    def metrics(self, state, x, y) -> dict:
        """The lifted objective after one X step at fixed W, its terms, and the network loss, on (x, y).

        With a head: the merged objective with the state's merge (no weakness update), and for guide the branch
        guiding each class."""
        extra = {}
        lams = None
        if self._outer is not None:
            state = state[0]
        if self.config.lambda_update != "fixed":
            state, lams = state
            lams = tuple(lams[l] for l in range(self.n_layers - 1))
            extra["lambdas"] = [float(jnp.mean(v)) for v in lams]  # per layer; with per-neuron λ their mean
            if self.config.lambda_granularity == "neuron":
                extra["lambdas_min"] = [float(jnp.min(v)) for v in lams]
                extra["lambdas_max"] = [float(jnp.max(v)) for v in lams]
        if self.head is None:
            params, merge = state, None
        else:
            params, head_state = state
            merge = self.head.matrix(head_state, x.dtype)
            if self.head.guided:
                extra["guide_selection"] = [int(s) for s in heads.selection(head_state)]
        terms = self.minibatch_objective(params, x, y, merge, lams)
        if self.config.bound_max_sweeps > 0:
            network, bound, sweeps = self.relaxation(params, x, y, merge, lams)
            extra.update({"lifted_bound": float(bound), "relaxation_gap": float(network - bound),
                          "bound_sweeps": int(sweeps)})
        else:  # J(W) alone: F at the feed-forward X
            network = self.objective_terms(params, self.forward(params, x), x, y, merge, lams)["total"]
        return {"lifted_objective": float(terms["total"]), "penalties": [float(p) for p in terms["penalties"]],
                "network_loss_same_batch": float(terms["network_loss"]),
                "regulariser": float(terms["regulariser"]), "network_objective": float(network), **extra}

    # ------------------------------------------------------------ objective
    def _objective_terms(self, params, xs, x0, y, merge=None, lams=None):
        """Terms of F(W, X); with a head's `merge` M, the loss is loss(Y, U_L M) and ρ_L‖W_L‖² is on the stacked W_L.
        lams: the multipliers λ (default: the config's)."""
        c = self.config
        lams = self.lambdas if lams is None else lams
        if merge is None:
            return objective_terms(params, xs, x0, y, self.penalty, lams, self.rhos, c.loss, self.layers)
        merged = [*params[:-1], heads.merge_layer(params[-1], merge)]
        terms = objective_terms(merged, xs, x0, y, self.penalty, lams, self.rhos, c.loss, self.eval_layers)
        reg = lifted.regulariser(params, self.rhos)
        return {**terms, "regulariser": reg, "total": terms["total"] - terms["regulariser"] + reg}

    # ------------------------------------------------------------ X blocks
    def _x_block(self, l, params, xs, x0, y, merge=None, lams=None):
        """Update hidden activation X_l (1 ≤ l ≤ L) given its neighbours (merge: a head's M, last block only)."""
        c = self.config
        lams = self.lambdas if lams is None else lams
        inputs = [x0, *xs]
        u_prev = preactivation(self.layers[l - 1], params[l - 1], inputs[l - 1])
        if l == self.n_layers - 1:
            return blocks.solve_x_last(
                self.penalty, xs[l - 1], u_prev, self.layers[l], params[l], y, lams[l - 1], c.loss,
                c.x_solver, c.x_mode, loss_weight=c.lbd_coef, merge=merge,
            )
        return blocks.solve_x_hidden(
            self.penalty, xs[l - 1], u_prev, self.layers[l], params[l], xs[l], lams[l - 1],
            c.lbd_coef * lams[l], c.x_solver, c.x_mode,
        )

    def _x_step(self, params, xs, x0, y, merge=None, lams=None):
        """One pass over the X blocks in the configured schedule.

        sequential: X_L, …, X_1, each block reading the blocks already updated
        (Gauss–Seidel). parallel: all odd layers from the current X, then all
        even layers from the X with the odd layers updated.
        """
        xs = list(xs)
        n_hidden = self.n_layers - 1
        infos = []
        if self.config.schedule == "sequential":
            for l in range(n_hidden, 0, -1):
                xs[l - 1], info = self._x_block(l, params, xs, x0, y, merge, lams)
                infos.append(info)
        else:
            for parity in (1, 0):
                layers = [l for l in range(1, n_hidden + 1) if l % 2 == parity]
                new = [self._x_block(l, params, xs, x0, y, merge, lams) for l in layers]  # all read the same xs
                for l, (x, info) in zip(layers, new):
                    xs[l - 1] = x
                    infos.append(info)
        return xs, infos

    # ------------------------------------------------------------ W blocks
    def _w_block(self, l, params, xs, x0, y, anchors=None, anchor_is_start=False, merge=None, lams=None):
        """Update layer l's (W, b) given X; layers are independent of each other (merge: a head's M)."""
        c = self.config
        lams = self.lambdas if lams is None else lams
        inputs = [x0, *xs]
        anchor = None if anchors is None else anchors[l]
        if l == self.n_layers - 1:
            return blocks.solve_w_out(
                self.layers[l], params[l], inputs[l], y, self.rhos[l], c.loss, c.w_solver, anchor,
                self.rho_proxes[l], c.w_mode, anchor_is_start, merge, c.w_retry,
            )
        return blocks.solve_w_hidden(
            self.penalty, self.layers[l], params[l], inputs[l], xs[l], lams[l], self.rhos[l], c.w_solver,
            anchor, self.rho_proxes[l], c.w_mode, anchor_is_start, c.w_retry,
        )

    def _w_groups(self, xs, x0) -> list:
        """The W blocks in groups solved together: with `stack_w`, hidden layers of the same spec, input and
        output shapes, ρ and ρ' share a group (their blocks are one problem vmapped over the layers); every
        other layer (the output layer always) is a group of one."""
        if not self.stack_w:
            return [[l] for l in range(self.n_layers)]
        inputs = [x0, *xs]
        groups: dict = {}
        for l in range(self.n_layers - 1):
            key = (self.layers[l], inputs[l].shape, xs[l].shape, self.rhos[l], self.rho_proxes[l])
            groups.setdefault(key, []).append(l)
        return sorted(groups.values()) + [[self.n_layers - 1]]

    def _stacked_w_blocks(self, group, params, xs, x0, anchors, anchor_is_start, lams) -> dict:
        """Hidden W blocks of `group` (equal shapes, ρ, ρ') as one solve vmapped over the stacked layers
        (`blocks.solve_w_hidden_stacked`); λ (a scalar or one per neuron) is stacked too.
        Returns {l: (params_l, SolveInfo_l)}."""
        c, first = self.config, group[0]
        inputs = [x0, *xs]

        def stack(trees):
            return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)

        dtype = params[first]["kernel"].dtype
        anchor = None if anchors is None else stack([anchors[l] for l in group])
        new, info = blocks.solve_w_hidden_stacked(
            self.penalty, self.layers[first], stack([params[l] for l in group]), stack([inputs[l] for l in group]),
            stack([xs[l] for l in group]), stack([jnp.asarray(lams[l], dtype) for l in group]), self.rhos[first],
            c.w_solver, anchor, self.rho_proxes[first], c.w_mode, anchor_is_start, c.w_retry)
        return {l: jax.tree_util.tree_map(lambda a, k=k: a[k], (new, info)) for k, l in enumerate(group)}

    def _w_step(self, params, xs, x0, y, anchors=None, anchor_is_start=False, merge=None, lams=None):
        """All W blocks at once (they are independent given X); see `stack_layers` for equal hidden blocks."""
        lams = self.lambdas if lams is None else lams
        out = {}
        for group in self._w_groups(xs, x0):
            if len(group) == 1:
                out[group[0]] = self._w_block(group[0], params, xs, x0, y, anchors, anchor_is_start, merge, lams)
            else:
                out.update(self._stacked_w_blocks(group, params, xs, x0, anchors, anchor_is_start, lams))
        return [out[l][0] for l in range(self.n_layers)], [out[l][1] for l in range(self.n_layers)]

    def _round(self, params, xs, x0, y, anchors=None, anchor_is_start=False, merge=None, lams=None):
        xs, x_infos = self._x_step(params, xs, x0, y, merge, lams)
        params, w_infos = self._w_step(params, xs, x0, y, anchors, anchor_is_start, merge, lams)
        xr, xsteps, xbad = _worst(x_infos)
        wr, wsteps, wbad = _worst(w_infos)
        return params, xs, SweepInfo(xr, xsteps, wr, wsteps, xbad | wbad)

    def _sweep(self, params, xs, x0, y):
        """One full-batch BCD sweep: X blocks in schedule order, then all W blocks.

        Every block solve returns a point no worse than its start, so a sweep
        never increases F (for κ = lbd_coef = 1; with κ ≠ 1 the X steps
        minimise a reweighted objective and monotonicity of F is not assured).
        """
        return self._round(params, xs, x0, y)

    def _minibatch_update(self, params, x0, y, merge=None, xs=None):
        """Minibatch BCD: X from a forward pass, anchors = current weights, `alternations` rounds.

        Returns (params, SweepInfo of the last round). The objective is not
        evaluated here (it would cost a forward pass per step): use
        `objective_terms` / `minibatch_objective` at logging time.
        """
        params, _, info = self._minibatch_rounds(params, x0, y, merge, xs)
        return params, info

    def _minibatch_rounds(self, params, x0, y, merge=None, xs=None, lams=None):
        """`_minibatch_update` at multipliers `lams`; returns (params, X after the last round, SweepInfo of the last
        round, its `nonfinite` that of any round: a block that met a non-finite value and kept its start in one
        round must still stop the run when a later round's blocks are finite)."""
        anchors = params
        if xs is None:
            xs = forward(params, x0, self.penalty, self.layers)[0]
        info, bad = None, jnp.zeros((), bool)
        for k in range(self.config.alternations):
            params, xs, info = self._round(params, xs, x0, y, anchors, anchor_is_start=(k == 0), merge=merge,
                                           lams=lams)
            bad = bad | info.nonfinite
        return params, xs, info._replace(nonfinite=bad)

    def _head_update(self, params, head_state, x0, y):
        """Minibatch BCD with a head: the weakness scores see the forward pass's logits, then M is fixed for the
        minibatch's rounds. Returns (params, head state, SweepInfo)."""
        params, head_state, _, info = self._head_rounds(params, head_state, x0, y)
        return params, head_state, info

    def _head_rounds(self, params, head_state, x0, y, lams=None):
        xs, logits = forward(params, x0, self.penalty, self.layers)
        head_state = self.head.observe(head_state, logits, y, self.config.loss)
        params, xs, info = self._minibatch_rounds(params, x0, y, self.head.matrix(head_state, x0.dtype), xs, lams)
        return params, head_state, xs, info

    # ------------------------------------------------------------ multipliers λ
    def layer_penalties(self, params, xs, x0) -> jax.Array:
        """p_l = (1/N) Σ_i B_l(U_l,i, X_l+1,i) for each hidden layer l (unweighted by λ), shape (L,)."""
        return jnp.stack([jnp.sum(p) for p in self.neuron_penalties(params, xs, x0)])

    def neuron_penalties(self, params, xs, x0) -> tuple:
        """p_l,j = (1/N) Σ_i Σ_positions B_l(U_l, X_l+1)_i,j for each hidden layer l: one array per layer, one value
        per neuron j (a conv layer's channel; unweighted by λ)."""
        inputs = [x0, *xs]
        out = []
        for l in range(self.n_layers - 1):
            b = self.penalty.value(preactivation(self.layers[l], params[l], inputs[l]), xs[l])
            out.append(jnp.sum(b.reshape(-1, b.shape[-1]), axis=0) / x0.shape[0])
        return tuple(out)

    def next_lambdas(self, lams, params, xs, x0) -> jax.Array:
        """The `lambda_update` rule applied once (see `LiftedConfig`)."""
        c = self.config
        if c.lambda_update == "fixed":
            return lams
        if c.lambda_update == "continuation":
            return jnp.minimum(lams * c.lambda_growth, c.lambda_max)
        if c.lambda_granularity == "neuron":
            return tuple(jnp.minimum(lam + c.lambda_step * p, c.lambda_max)
                         for lam, p in zip(lams, self.neuron_penalties(params, xs, x0)))
        return jnp.minimum(lams + c.lambda_step * self.layer_penalties(params, xs, x0), c.lambda_max)

    def _multiplier_update(self, inner, lams, x0, y):
        """One minibatch update at λ = lams, then λ's update. Returns (inner state, λ, SweepInfo)."""
        lam_t = tuple(lams[l] for l in range(self.n_layers - 1))
        if self.head is None:
            params, xs, info = self._minibatch_rounds(inner, x0, y, lams=lam_t)
            inner = params
        else:
            params, head_state, xs, info = self._head_rounds(*inner, x0, y, lam_t)
            inner = (params, head_state)
        return inner, self.next_lambdas(lams, params, xs, x0), info

    # ------------------------------------------------------------ the relaxation bound
    @property
    def _tight(self) -> "LiftedTrainer":
        """This trainer with X blocks solved to BOUND_X_TOL (for the bound)."""
        if getattr(self, "_tight_trainer", None) is None:
            c = self.config
            self._tight_trainer = self.with_config(dataclasses.replace(
                c, x_tol=min(c.x_tol, BOUND_X_TOL), x_max_steps=max(c.x_max_steps, BOUND_X_MAX_STEPS)))
        return self._tight_trainer

    def _relaxation(self, params, x0, y, merge=None, lams=None):
        """(J(W), min_X F(W, X), X sweeps): J is the network objective (mean loss + regulariser), equal to F at the
        feed-forward X since B = 0 on the graph of φ; the minimum over X is approached by Gauss–Seidel X sweeps
        from there, each block solved to BOUND_X_TOL, until F decreases by less than BOUND_RTOL (relative) or
        `bound_max_sweeps` sweeps. Every sweep is monotone, so the value returned is ≤ J; it is the exact minimum
        when X is one block (one hidden layer), and an upper estimate of it otherwise (F is only blockwise
        convex in X)."""
        tight = self._tight
        xs = forward(params, x0, self.penalty, self.layers)[0]
        start = self._objective_terms(params, xs, x0, y, merge, lams)["total"]

        def cond(carry):
            _, f_prev, f, k = carry
            return (k < self.config.bound_max_sweeps) & ((k == 0) | (f_prev - f > BOUND_RTOL * jnp.abs(f)))

        def body(carry):
            xs, _, f, k = carry
            xs, _ = tight._x_step(params, xs, x0, y, merge, lams)
            return xs, f, tight._objective_terms(params, xs, x0, y, merge, lams)["total"], k + 1

        _, _, bound, sweeps = jax.lax.while_loop(cond, body, (xs, start, start, jnp.zeros((), jnp.int32)))
        return start, bound, sweeps


    def _minibatch_objective(self, params, x0, y, merge=None, lams=None):
        """Terms of F after one X step from the forward pass at fixed W, and the network loss.

        For the Fenchel penalties (zero on the graph of φ) the forward pass
        gives F = network loss + regulariser and the X step can only lower F,
        so F is a lower bound of it on this batch; for LNN's squared penalty it
        is not a bound (F can exceed the network loss).
        """
        xs, logits = forward(params, x0, self.penalty, self.layers)
        xs, _ = self._x_step(params, xs, x0, y, merge, lams)
        terms = self._objective_terms(params, xs, x0, y, merge, lams)
        terms["network_loss"] = jnp.mean(loss_per_sample(self.config.loss, y, logits if merge is None
                                                         else logits @ merge))
        return terms

    # ------------------------------------------------------------ full batch
    def fit_full_batch(self, params, x0, y, sweeps: int, callback: Optional[Callable] = None):
        """Full-batch BCD for `sweeps` sweeps; returns (params, xs, objective history).

        Monotone for κ = 1 (see `_sweep`). A non-finite objective, or a block solve that met a non-finite value
        (and kept its start; with `w_retry` a W block is first solved again), stops it with FloatingPointError.
        Plain heads only.
        """
        if self.head is not None:
            raise ValueError("full-batch BCD supports the plain head only (branches=1); use minibatch steps")
        if self.config.lambda_update != "fixed":
            raise ValueError("full-batch BCD runs at fixed λ (lambda_update='fixed'); the λ updates are per minibatch")
        xs = self.forward(params, x0)
        history = [float(self.objective_terms(params, xs, x0, y)["total"])]
        for k in range(sweeps):
            params, xs, info = self.sweep(params, xs, x0, y)
            history.append(float(self.objective_terms(params, xs, x0, y)["total"]))
            if not jnp.isfinite(history[-1]):
                raise FloatingPointError(f"non-finite lifted objective at sweep {k + 1}")
            if bool(info.nonfinite):
                raise FloatingPointError(f"a block solve met a non-finite value at sweep {k + 1} (it kept its start; "
                                         "raw-scale inputs? normalise them, or see LiftedConfig.w_retry)")
            if callback is not None:
                callback(k, params, xs, info)
        return params, xs, history
