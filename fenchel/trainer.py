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
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from fenchel.heads import Head, selection
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
    direction fed to the optax optimiser as its gradient. State: (params, optax state); one jitted step.

    With a multi-branch `head` (`fenchel.heads.Head`) the direction is direction(θ, x, y, h) → (J, g, h'),
    h the head's state (GuideBP's weakness scores), the state is (params, optax state, h), params hold the
    K·C-column output layer, and `params(state)` is the evaluation network (mean of the branches' logits).
    """

    def __init__(self, direction: Callable, optimizer: optax.GradientTransformation, head: Optional[Head] = None):
        self.optimizer = optimizer
        self.head = head

        def step(state, x, y):
            if head is None:
                params, opt_state = state
                value, g = direction(params, x, y)
            else:
                params, opt_state, head_state = state
                value, g, head_state = direction(params, x, y, head_state)
            updates, opt_state = optimizer.update(g, opt_state, params)
            params = optax.apply_updates(params, updates)
            finite = jnp.isfinite(value) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf))
                                                              for leaf in jax.tree_util.tree_leaves(g)]))
            new = (params, opt_state) if head is None else (params, opt_state, head_state)
            return new, StepInfo(value, ~finite)

        self._step = jax.jit(step)

    def init(self, params):
        params = [dict(p) for p in params]
        if self.head is None:
            return params, self.optimizer.init(params)
        params = self.head.expand(params)
        return params, self.optimizer.init(params), self.head.init_state(params)

    def step(self, state, x, y):
        return self._step(state, x, y)

    def params(self, state):
        return state[0] if self.head is None else self.head.collapse(state[0])

    def metrics(self, state, x, y) -> dict:
        """With merge='guide': the branch guiding each class (s_c)."""
        del x, y
        if self.head is None or not self.head.guided:
            return {}
        return {"guide_selection": [int(s) for s in selection(state[2])]}


def head_loss(head: Optional[Head], loss: str, logits: jax.Array, y: jax.Array, head_state=None):
    """(J, head state'): J = (1/N) Σ_i loss(Y_i, logits_i) without a head; the head's merged loss
    (`Head.batch_loss`, which updates GuideBP's weakness scores first) with one."""
    if head is None:
        return jnp.mean(loss_per_sample(loss, y, logits)), head_state
    return head.batch_loss(head_state, logits, y, loss)


class GradientTrainer(OptaxTrainer):
    """Backpropagation: θ ← optimiser(∇_θ mean loss(Y, f_θ(X))) on each batch.

    The network is the lifted architecture's feed-forward map (`fenchel.lifted.forward`),
    i.e. the same function the flax model computes. With a multi-branch `head`, the output layer
    has K·C columns and the loss is taken on the merged logits (`fenchel.heads`).
    """

    def __init__(self, layers: Sequence, penalty: Penalty, optimizer: optax.GradientTransformation,
                 loss: str = "softmax", head: Optional[Head] = None):
        self.layers = tuple(layers)
        train_layers = self.layers if head is None else head.training_layers(self.layers)

        def batch_loss(params, x, y, head_state):
            return head_loss(head, loss, forward(params, x, penalty, train_layers)[1], y, head_state)

        grad = jax.value_and_grad(batch_loss, has_aux=True)
        if head is None:
            def direction(params, x, y):
                (value, _), g = grad(params, x, y, None)
                return value, g
        else:
            def direction(params, x, y, head_state):
                (value, head_state), g = grad(params, x, y, head_state)
                return value, g, head_state

        super().__init__(direction, optimizer, head)
