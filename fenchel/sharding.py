"""Data-parallel training over a device mesh (jax.sharding; no pmap).

Lifted training is data parallel by construction: X blocks separate over
samples, and a W block touches the samples only through sums over them
(the majoriser Z̃ᵀZ̃ and the gradient Z̃ᵀG of `fenchel.blocks.solve_w_primal_mm`).
So the minibatch and every lifted variable X_l are sharded over the `data`
mesh axis, the weights are replicated, and the step is one `jax.jit` program
with input and output shardings; XLA's partitioner turns each sum over
samples into a local partial sum and one all-reduce of the small
(n_in + 1)² or (n_in + 1) × n_out result.

The N × N kernel W forms (`kernel`, `kernel_mm`) do not shard along N: their
Gram matrix X Xᵀ couples every pair of samples, so XLA would gather X on
every device. `DataParallel.lifted_config` therefore maps `w_mode="auto"`
to `primal_mm` (whose (n_in + 1)² factor is computed once per solve from the
all-reduced majoriser); an explicit kernel form is still honoured, and still
correct, at the price of that all-gather.

Multi-host: call `jax.distributed.initialize()` first (the launcher does so
with `--config.distributed=True`); the mesh then spans every process's
devices, each process computes the same batch indices and places only its
own rows (`DataParallel.place_batch`), and process 0 alone writes files.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fenchel.trainer import StepInfo, Trainer

DATA_AXIS = "data"


def data_mesh(n_devices: Optional[int] = None) -> Mesh:
    """A 1-D mesh with axis `data` over the first `n_devices` of all processes' devices (all by default)."""
    devices = jax.devices()
    n = len(devices) if not n_devices else int(n_devices)
    if not 1 <= n <= len(devices):
        raise ValueError(f"a data mesh of {n} devices needs 1 ≤ n ≤ {len(devices)}, the devices JAX sees "
                         f"({devices[0].platform}); on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=8 "
                         "(set before JAX starts) gives 8")
    if n % jax.process_count():
        raise ValueError(f"a data mesh of {n} devices must have the same number of devices in each of the "
                         f"{jax.process_count()} processes")
    per_process = n // jax.process_count()
    chosen = [d for p in range(jax.process_count()) for d in
              [d for d in devices if d.process_index == p][:per_process]]
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=chosen)


class DataParallel:
    """Batches sharded over the `data` axis of `mesh`, parameters and optimiser state replicated."""

    def __init__(self, mesh: Mesh):
        if DATA_AXIS not in mesh.axis_names:
            raise ValueError(f"the mesh needs an axis named {DATA_AXIS!r}; it has {mesh.axis_names}")
        self.mesh = mesh
        self.size = int(mesh.shape[DATA_AXIS])
        self.batch = NamedSharding(mesh, P(DATA_AXIS))
        self.replicated = NamedSharding(mesh, P())

    def check_batch_size(self, batch_size: int) -> None:
        """A global batch must split evenly over the data axis (and so over processes)."""
        if batch_size % self.size:
            raise ValueError(f"batch_size={batch_size} is not divisible by the {self.size} devices of the data "
                             f"mesh; use a multiple of {self.size}")

    def local_rows(self, batch_size: int) -> slice:
        """The rows of a global batch of `batch_size` that this process holds (all of them on one host)."""
        self.check_batch_size(batch_size)
        per_process = batch_size // jax.process_count()
        start = jax.process_index() * per_process
        return slice(start, start + per_process)

    def place_batch(self, local_rows, global_rows: int) -> jax.Array:
        """The global batch of `global_rows` rows, sharded over samples, from this process's rows.

        On one host `local_rows` is the whole batch. With several processes every process calls this
        with its own share (`local_rows(global_rows)` says which rows), in the same order.
        """
        self.check_batch_size(global_rows)
        if jax.process_count() == 1:
            if local_rows.shape[0] != global_rows:
                raise ValueError(f"one process holds the whole batch: got {local_rows.shape[0]} of "
                                 f"{global_rows} rows")
            return jax.device_put(local_rows, self.batch)
        return jax.make_array_from_process_local_data(self.batch, np.asarray(local_rows),
                                                      (global_rows, *local_rows.shape[1:]))

    def shard(self, batch) -> jax.Array:
        """A whole batch that every process holds, sharded over samples (each process places its rows)."""
        if isinstance(batch, jax.Array) and batch.sharding == self.batch:
            return batch
        n = batch.shape[0]
        return self.place_batch(batch if jax.process_count() == 1 else batch[self.local_rows(n)], n)

    def replicate(self, tree: Any) -> Any:
        """`tree` with every leaf replicated on the mesh's devices."""
        return jax.device_put(tree, self.replicated)

    def lifted_config(self, config):
        """`config` (a `fenchel.LiftedConfig`) with w_mode "auto" resolved to "primal_mm", the form whose
        sums over samples shard (see the module docstring), and x_chunk_bytes "auto" to off: chunks of the
        sharded sample axis would be sliced across devices, and each device holds its share of rows only."""
        auto = {"w_mode": "primal_mm"} if config.w_mode == "auto" else {}
        if config.x_chunk_bytes == -1:
            auto["x_chunk_bytes"] = 0
        return dataclasses.replace(config, **auto)

    def wrap(self, trainer: Trainer) -> "ShardedTrainer":
        """`trainer` run data parallel; a `LiftedTrainer` with "auto" fields is rebuilt with their sharded
        resolution (`lifted_config`)."""
        from fenchel.bcd import LiftedTrainer

        if isinstance(trainer, LiftedTrainer) and trainer.config != self.lifted_config(trainer.config):
            trainer = trainer.with_config(self.lifted_config(trainer.config))
        return ShardedTrainer(trainer, self)


@jax.jit
def _take_rows(x, y, idx):
    return x[idx], y[idx]


class ShardedTrainer(Trainer):
    """Any `Trainer` run data parallel: the same update, with the batch sharded over samples.

    step = jit(trainer.step, in_shardings=(replicated, batch, batch), out_shardings=replicated): one
    program per batch shape, whose result equals the unsharded step's up to the order of floating-point
    sums. `x`, `y` given to `step` are whole (global) batches, which every process holds; each process
    places its own rows (`DataParallel.shard`).
    """

    def __init__(self, trainer: Trainer, parallel: DataParallel):
        self.trainer, self.parallel = trainer, parallel
        p = parallel
        self._step = jax.jit(lambda state, x, y: trainer.step(state, x, y),
                             in_shardings=(p.replicated, p.batch, p.batch), out_shardings=p.replicated)

    def init(self, params):
        return self.parallel.replicate(self.trainer.init(params))

    def step(self, state: Any, x, y) -> tuple[Any, StepInfo]:
        if not all(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(state)):
            state = self.parallel.replicate(state)  # e.g. a state restored from a checkpoint (numpy)
        return self._step(state, self.parallel.shard(x), self.parallel.shard(y))

    def step_on_rows(self, state: Any, x, y, idx) -> tuple[Any, StepInfo]:
        """`step` on the rows idx of (x, y), every process gathering the same rows (see `experiments.loop`)."""
        return self.step(state, *_take_rows(x, y, idx))

    def params(self, state):
        return self.trainer.params(state)

    def metrics(self, state, x, y) -> dict:
        """`trainer.metrics` on all rows of (x, y): sharded over samples when their count splits evenly over
        the data axis, else on this process's first device (every process computes the same figures)."""
        if x.shape[0] % self.parallel.size == 0:
            return self.trainer.metrics(state, self.parallel.shard(x), self.parallel.shard(y))
        device = jax.local_devices()[0]
        state = jax.device_put(jax.device_get(state), device)
        return self.trainer.metrics(state, jax.device_put(x, device), jax.device_put(y, device))
