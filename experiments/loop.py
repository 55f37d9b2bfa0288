"""The one epoch loop and batch iterator, shared by every trainer, the launcher and the benchmarks.

The random stream is owned here: the batches of epoch e of a run with seed s
come from the key fold_in(fold_in(PRNGKey(s), stream), e), so a resumed run
sees exactly the batches of an uninterrupted one, and independent uses
(training: stream 0, warm-start fine-tuning: stream 1) never share batches.
"""

from __future__ import annotations

import time
import weakref
from typing import Callable, NamedTuple, Optional

import jax
import numpy as np

TRAIN_STREAM = 0
FINETUNE_STREAM = 1


def epoch_key(seed: int, epoch: int, stream: int = TRAIN_STREAM) -> jax.Array:
    """The PRNG key of (seed, stream, epoch)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), stream), epoch)


def epoch_batches(seed: int, epoch: int, n: int, batch_size: int, stream: int = TRAIN_STREAM) -> list:
    """Index arrays of one epoch's minibatches: a seeded permutation of range(n) cut into
    n // batch_size batches (the last partial batch is dropped), as host (numpy) arrays."""
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
    # Cut on the host: slicing a device array compiles one program per distinct offset (0.5 s for MNIST's 600).
    perm = np.asarray(jax.random.permutation(epoch_key(seed, epoch, stream), n))
    return [perm[i * batch_size:(i + 1) * batch_size] for i in range(n // batch_size)]


_FUSED_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def step_on_rows(trainer) -> Callable:
    """(state, x, y, idx) ↦ trainer.step(state, x[idx], y[idx]) as one jitted program, the batch gather fused
    into the step (one dispatch per step instead of three; eager fancy indexing costs about as much as a
    small step). A trainer with its own `step_on_rows` method (e.g. `fenchel.sharding.ShardedTrainer`)
    supplies it."""
    own = getattr(trainer, "step_on_rows", None)
    if own is not None:
        return own
    fused = _FUSED_STEPS.get(trainer)
    if fused is None:
        fused = _FUSED_STEPS[trainer] = jax.jit(lambda state, x, y, idx: trainer.step(state, x[idx], y[idx]))
    return fused


def warm_up(trainer, state, x, y, batch_size: int) -> None:
    """Compile the program that `run_epoch` runs (`step_on_rows` for these shapes) by taking one step on the
    first batch of epoch 0 and discarding its result: a timed epoch after it excludes compilation.
    `trainer.step` alone compiles a different program and leaves the epoch's own to its first step."""
    idx = epoch_batches(0, 0, x.shape[0], batch_size)[0]
    jax.block_until_ready(step_on_rows(trainer)(state, x, y, idx))


class EpochResult(NamedTuple):
    """seconds: wall time of the epoch's steps (synchronised); steps: how many; nonfinite: any step met a
    non-finite value; loss: the last step's batch loss (NaN if the trainer reports none)."""

    seconds: float
    steps: int
    nonfinite: bool
    loss: float


def run_epoch(trainer, state, x, y, *, seed: int, epoch: int, batch_size: int, stream: int = TRAIN_STREAM,
              on_step: Optional[Callable] = None, clock: Optional[Callable[[], float]] = None):
    """One epoch of `trainer.step` over seeded-shuffled batches of (x, y one-hot).

    on_step(i, n_steps, state) runs after step i (0-based), e.g. for progress
    or recording the parameter path; clock defaults to time.perf_counter.
    Returns (state, EpochResult).
    """
    clock = clock or time.perf_counter
    batches = epoch_batches(seed, epoch, x.shape[0], batch_size, stream)
    step = step_on_rows(trainer)
    start = clock()
    nonfinite = []  # each step's flag stays on its devices until the epoch ends: no synchronisation per step
    info = None
    for i, idx in enumerate(batches):
        state, info = step(state, x, y, idx)
        nonfinite.append(info.nonfinite)
        if on_step is not None:
            on_step(i, len(batches), state)
    jax.block_until_ready(state)
    seconds = clock() - start
    bad = any(bool(flag) for flag in nonfinite)
    return state, EpochResult(seconds, len(batches), bad, float(info.loss))
