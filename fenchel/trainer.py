"""The trainer interface shared by every training method, and the gradient (optax) trainer.

A trainer turns minibatches into parameter updates:

  state = trainer.init(params)                 params: one {"kernel", "bias"} dict per layer
  state, info = trainer.step(state, x, y)      one jitted update on a batch (y one-hot)
  params = trainer.params(state)               the network's weights, for evaluation or export
  metrics = trainer.metrics(state, x, y)       optional extra figures at logging time

`info` is a `StepInfo`: the batch loss the step saw (NaN where a trainer has
none) and a flag for a non-finite value met during the step. Batching, the
epoch loop and the random stream live in `experiments.loop`, shared by every
trainer; the engine only owns the per-step mathematics.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from fenchel.lifted import forward, loss_per_sample
from fenchel.penalties import Penalty


class StepInfo(NamedTuple):
    """What one step reports: the batch loss it saw and whether anything non-finite was met."""

    loss: jax.Array
    nonfinite: jax.Array


class Trainer(abc.ABC):
    """init / step / params (/ metrics): the interface every registered trainer implements."""

    @abc.abstractmethod
    def init(self, params: Sequence[dict]) -> Any:
        """The training state that starts from `params`."""

    @abc.abstractmethod
    def step(self, state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, StepInfo]:
        """One update on the batch (x, y one-hot); jitted, one compilation per batch shape."""

    @abc.abstractmethod
    def params(self, state: Any) -> list[dict]:
        """The network weights held by `state`."""

    def metrics(self, state: Any, x: jax.Array, y: jax.Array) -> dict:
        """Extra figures to log, computed on (x, y); none by default."""
        del state, x, y
        return {}


def make_optimizer(name: str, learning_rate: float, momentum: float = 0.9) -> optax.GradientTransformation:
    """optax optimiser by name: "sgd" (heavy-ball momentum, none if momentum = 0) or "adam"."""
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if name == "sgd":
        return optax.sgd(learning_rate, momentum=momentum or None)
    if name == "adam":
        return optax.adam(learning_rate)
    raise ValueError(f"unknown optimizer {name!r}; known: sgd, adam")


class OptaxTrainer(Trainer):
    """θ ← θ + optimiser(g) on each batch, with (J, g) = direction(θ, x, y): the batch objective and the
    direction fed to the optax optimiser as its gradient. State: (params, optax state); one jitted step."""

    def __init__(self, direction: Callable, optimizer: optax.GradientTransformation):
        self.optimizer = optimizer

        def step(state, x, y):
            params, opt_state = state
            value, g = direction(params, x, y)
            updates, opt_state = optimizer.update(g, opt_state, params)
            params = optax.apply_updates(params, updates)
            finite = jnp.isfinite(value) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf))
                                                              for leaf in jax.tree_util.tree_leaves(g)]))
            return (params, opt_state), StepInfo(value, ~finite)

        self._step = jax.jit(step)

    def init(self, params):
        params = [dict(p) for p in params]
        return params, self.optimizer.init(params)

    def step(self, state, x, y):
        return self._step(state, x, y)

    def params(self, state):
        return state[0]


class GradientTrainer(OptaxTrainer):
    """Backpropagation: θ ← optimiser(∇_θ mean loss(Y, f_θ(X))) on each batch.

    The network is the lifted architecture's feed-forward map (`fenchel.lifted.forward`),
    i.e. the same function the flax model computes.
    """

    def __init__(self, layers: Sequence, penalty: Penalty, optimizer: optax.GradientTransformation,
                 loss: str = "softmax"):
        self.layers = tuple(layers)

        def batch_loss(params, x, y):
            return jnp.mean(loss_per_sample(loss, y, forward(params, x, penalty, self.layers)[1]))

        super().__init__(jax.value_and_grad(batch_loss), optimizer)
