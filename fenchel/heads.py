"""Multi-branch output heads: K parallel logit branches on a shared trunk, merged by sum, mean or GuideBP's guide.

Layout. The output layer is one dense layer with K·C features (C classes): branch k's logits are the
columns k·C, …, k·C + C − 1 of U = A(X_L; W) + b ∈ R^{N×KC}, written U_k ∈ R^{N×C}. With K = 1 it is
the plain head (the same parameters and numbers).

Every merge is linear in U, logits = U M with M ∈ R^{KC×C}:

  sum    M = [I; …; I]          logits = Σ_k U_k
  mean   M = [I; …; I] / K      logits = (1/K) Σ_k U_k
  guide  M = E_s                logits_c = U_{s_c, c},  s_c = argmax_k w_{k,c}  (E_s: 1 at (s_c·C + c, c))

so for a fixed M the merged network's output layer is the plain dense layer (W M, b M), and the loss
loss(Y, U M) is convex in the stacked weights (W, b): the lifted W-out and X-last blocks keep their form
(`fenchel.blocks.solve_w_out`, `solve_x_last` with `merge=M`), with the fit's curvature bound scaled by
‖M‖₂² (K for sum, 1/K for mean, 1 for guide).

GuideBP (Das et al., 2021): only the abstract is public ("a guiding logit from per-branch, per-class
weakness scores, so that gradients flow through the weakest pathway for each class"). This module
implements an interpretation of it: the weakness w_{k,c} of branch k on class c is its running per-class
loss, an exponential moving average over batches of

    ℓ_{k,c} = Σ_i Y_ic loss(Y_i, U_{i,k}) / Σ_i Y_ic     (branch k alone, on the batch's samples of class c),

    w_{k,c} ← β w_{k,c} + (1 − β) ℓ_{k,c}   for classes present in the batch (w_{k,c} ← ℓ_{k,c} the first time
                                             class c is seen; classes absent from the batch keep their w),

and for each class the guiding logit is that class's logit from the branch currently weakest on it,
s_c = argmax_k w_{k,c} (ties: the lowest k). Every training step first updates w from the current
weights' logits (no gradient flows through w or s), then takes its step on loss(Y, U E_s): only the
selected (branch, class) columns receive a loss gradient; the other columns receive only the regulariser
(and, in lifted minibatch training, the proximal term, whose block minimiser for an unselected column is
W = ρ'/(ρ + ρ')·anchor, b = anchor bias).

A per-sample variant (`per_sample_guided_logits`) scores the branches on each sample: the weakest branch
on the true class (lowest logit) and the most confused branch on each wrong class (highest logit). Its
softmax loss is at least every single branch's loss on that sample; it is provided for analysis.

Evaluation always uses the mean of the branches' logits, i.e. the plain dense layer (1/K)Σ_k (W_k, b_k)
(`Head.collapse`), so the flax model, warm start and every tool see a plain network.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from fenchel.layers import Dense
from fenchel.lifted import loss_per_sample

MERGES = ("sum", "mean", "guide")
DEFAULT_DECAY = 0.9  # β of the weakness EMA: about ten batches of memory
_INIT_STREAM = 0x6A  # fold_in constant of the extra branches' initialisation key


class Weakness(NamedTuple):
    """GuideBP state: score (K, C) running per-class loss of each branch; seen (C,) whether class c was met."""

    score: jax.Array
    seen: jax.Array


def split_branches(u: jax.Array, branches: int) -> jax.Array:
    """U ∈ R^{N×KC} → (N, K, C): branch k's logits U[:, kC:(k+1)C]."""
    return u.reshape(u.shape[0], branches, u.shape[-1] // branches)


def merge_matrix(merge: str, branches: int, num_classes: int, selection: Optional[jax.Array] = None,
                 dtype=jnp.float32) -> jax.Array:
    """M ∈ R^{KC×C} with merged logits U M: [I; …; I] (sum), [I; …; I]/K (mean), E_s (guide, s = selection)."""
    eye = jnp.eye(num_classes, dtype=dtype)
    if merge == "sum":
        return jnp.tile(eye, (branches, 1))
    if merge == "mean":
        return jnp.tile(eye, (branches, 1)) / branches
    if merge == "guide":
        if selection is None:
            raise ValueError("merge='guide' needs the selected branch of every class")
        onehot = jax.nn.one_hot(selection, branches, dtype=dtype)  # (C, K): [c, k] = 1 if s_c = k
        return (onehot.T[:, :, None] * eye[None]).reshape(branches * num_classes, num_classes)
    raise ValueError(f"unknown merge {merge!r}; known: {', '.join(MERGES)}")


def merge_norm_sq(merge: str, branches: int) -> float:
    """‖M‖₂² = λ_max(MᵀM): K (sum), 1/K (mean), 1 (guide: MᵀM = I)."""
    return {"sum": float(branches), "mean": 1.0 / branches, "guide": 1.0}[merge]


def merge_layer(layer: dict, merge: jax.Array) -> dict:
    """The plain dense layer (W M, b M) whose output is the merged logits U M."""
    return {"kernel": layer["kernel"] @ merge, "bias": layer["bias"] @ merge}


def branch_class_losses(u: jax.Array, y: jax.Array, branches: int, loss: str = "softmax"):
    """(ℓ (K, C), present (C,)): ℓ_{k,c} = Σ_i Y_ic loss(Y_i, U_{i,k}) / Σ_i Y_ic; present_c = Σ_i Y_ic > 0."""
    ub = split_branches(u, branches)  # (N, K, C)
    per = loss_per_sample(loss, y[:, None, :], ub)  # (N, K)
    mass = jnp.sum(y, axis=0)  # (C,)
    present = mass > 0
    ell = (per.T @ y) / jnp.where(present, mass, 1.0)  # (K, C)
    return ell, present


def init_weakness(branches: int, num_classes: int, dtype=jnp.float32) -> Weakness:
    """No class seen yet: scores 0."""
    return Weakness(jnp.zeros((branches, num_classes), dtype), jnp.zeros((num_classes,), bool))


def update_weakness(state: Weakness, u: jax.Array, y: jax.Array, decay: float = DEFAULT_DECAY,
                    loss: str = "softmax") -> Weakness:
    """w ← β w + (1 − β) ℓ on present classes (ℓ on a class's first appearance), unchanged elsewhere; no gradient."""
    ell, present = branch_class_losses(jax.lax.stop_gradient(u), y, state.score.shape[0], loss)
    ell = ell.astype(state.score.dtype)
    ema = jnp.where(state.seen, decay * state.score + (1.0 - decay) * ell, ell)
    return Weakness(jnp.where(present, ema, state.score), state.seen | present)


def selection(state: Weakness) -> jax.Array:
    """s_c = argmax_k w_{k,c}: the branch weakest on each class (ties: the lowest k)."""
    return jnp.argmax(state.score, axis=0)


def per_sample_guided_logits(u: jax.Array, y: jax.Array, branches: int) -> jax.Array:
    """g_ic = min_k U_ikc on the true class (Y_ic = 1), max_k U_ikc on every other class (Y one-hot)."""
    ub = split_branches(u, branches)
    return jnp.where(y > 0, jnp.min(ub, axis=1), jnp.max(ub, axis=1))


@dataclasses.dataclass(frozen=True)
class Head:
    """K output branches merged by `merge`; `seed` initialises branches 1..K−1 (branch 0 is the given head)."""

    branches: int
    merge: str = "sum"
    decay: float = DEFAULT_DECAY
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.branches, int) or isinstance(self.branches, bool) or self.branches < 1:
            raise ValueError(f"branches={self.branches!r} must be an integer ≥ 1")
        if self.merge not in MERGES:
            raise ValueError(f"merge={self.merge!r}, expected one of {MERGES}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay={self.decay!r} must be in [0, 1)")

    @property
    def guided(self) -> bool:
        return self.merge == "guide"

    @property
    def norm_sq(self) -> float:
        return merge_norm_sq(self.merge, self.branches)

    # ------------------------------------------------------------ layers and parameters
    def training_layers(self, layers) -> tuple:
        """The layer specs with the output layer widened to K·C features (same pooling)."""
        layers = tuple(layers)
        out = layers[-1]
        if getattr(out, "kind", None) != "dense":
            raise ValueError(f"branches need a dense output layer, got {getattr(out, 'kind', out)!r}")
        return (*layers[:-1], Dense(out.features * self.branches, pool=out.pool))

    def expand(self, params) -> list[dict]:
        """Plain params → training params: branch 0 is the given output layer, branches 1..K−1 LeCun-normal
        (as `fenchel.layers.Dense.init`) from fold_in(PRNGKey(seed), ·), zero biases."""
        params = [dict(p) for p in params]
        out = params[-1]
        kernel, bias = out["kernel"], out["bias"]
        if self.branches > 1:
            key = jax.random.fold_in(jax.random.PRNGKey(self.seed), _INIT_STREAM)
            extra = jax.nn.initializers.lecun_normal()(key, (kernel.shape[0], (self.branches - 1) * kernel.shape[1]),
                                                       kernel.dtype)
            kernel = jnp.concatenate([kernel, extra], axis=1)
            bias = jnp.concatenate([bias, jnp.zeros(((self.branches - 1) * bias.shape[0],), bias.dtype)])
        params[-1] = {"kernel": kernel, "bias": bias}
        return params

    def collapse(self, params) -> list[dict]:
        """Training params → the evaluation network: output layer (1/K)Σ_k (W_k, b_k), whose logits are the mean
        of the branches' logits."""
        params = [dict(p) for p in params]
        out = params[-1]
        k = self.branches
        kernel = out["kernel"].reshape(out["kernel"].shape[0], k, -1).mean(axis=1)
        bias = out["bias"].reshape(k, -1).mean(axis=0)
        params[-1] = {"kernel": kernel, "bias": bias}
        return params

    def num_classes(self, params) -> int:
        return params[-1]["bias"].shape[0] // self.branches

    # ------------------------------------------------------------ merging
    def init_state(self, params) -> Weakness:
        return init_weakness(self.branches, self.num_classes(params), params[-1]["bias"].dtype)

    def matrix(self, state: Weakness, dtype=None) -> jax.Array:
        """M of the current state (guide: the selection of `state`)."""
        k, c = state.score.shape
        sel = selection(state) if self.guided else None
        return jax.lax.stop_gradient(merge_matrix(self.merge, k, c, sel, dtype or state.score.dtype))

    def observe(self, state: Weakness, u: jax.Array, y: jax.Array, loss: str = "softmax") -> Weakness:
        """The weakness update of one batch (only guide keeps scores; sum and mean pass the state through)."""
        return update_weakness(state, u, y, self.decay, loss) if self.guided else state

    def batch_loss(self, state: Weakness, u: jax.Array, y: jax.Array, loss: str = "softmax"):
        """(J, state'): state' = observe(state, U, Y), J = (1/N) Σ_i loss(Y_i, (U M(state'))_i)."""
        state = self.observe(state, u, y, loss)
        return jnp.mean(loss_per_sample(loss, y, u @ self.matrix(state, u.dtype))), state
