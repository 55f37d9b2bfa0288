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
all-reduced majoriser) when the data axis has more than one device; an
explicit kernel form is still honoured, and still correct, at the price of
that all-gather.

Model parallel (optional): a second mesh axis `model` shards each hidden
layer's output neurons (the last axis of its kernel and its bias, and of the
optimiser state that mirrors them) when the layer's width divides by the
axis size. W blocks separate over output neurons, so a hidden W block's
solve splits into independent column groups; the X blocks and the output
layer, which couple neurons, get their partial sums and gathers from XLA's
partitioner. The result equals the one-device update up to the order of
floating-point sums, and each device holds 1/model of the wide layers'
weights (`device_mesh(data, model)`, the launcher's `--config.mesh_model`).

Multi-host: call `jax.distributed.initialize()` first (the launcher does so
with `--config.distributed=True`); the mesh then spans every process's
devices, each process computes the same batch indices and places only its
own rows (`DataParallel.place_batch`), and process 0 alone writes files. The
model axis stays within each process.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fenchel.trainer import StepInfo, Trainer

DATA_AXIS = "data"
MODEL_AXIS = "model"


def data_mesh(n_devices: Optional[int] = None) -> Mesh:
    """A 1-D mesh with axis `data` over the first `n_devices` of all processes' devices (all by default)."""
    return device_mesh(n_devices, 1)


def device_mesh(data: Optional[int] = None, model: int = 1) -> Mesh:
    """A mesh of `data` × `model` devices, the same number from each process: axis `data` alone when
    model = 1, else axes (`data`, `model`) with each process's devices on whole rows of `model` devices.
    data None or 0: every device JAX sees, divided by `model`."""
    devices = jax.devices()
    model = int(model)
    if model < 1:
        raise ValueError(f"a model axis of {model} devices: it needs at least 1")
    data = len(devices) // model if not data else int(data)
    n = data * model
    if not (data >= 1 and n <= len(devices)):
        raise ValueError(f"a mesh of {data} × {model} (data × model) devices needs 1 ≤ data · model ≤ "
                         f"{len(devices)}, the devices JAX sees ({devices[0].platform}); on a CPU, "
                         "XLA_FLAGS=--xla_force_host_platform_device_count=8 (set before JAX starts) gives 8")
    processes = jax.process_count()
    if n % processes or (n // processes) % model:
        raise ValueError(f"a mesh of {data} × {model} (data × model) devices must have the same number of "
                         f"devices in each of the {processes} processes, a multiple of the model axis")
    per_process = n // processes
    chosen = [d for p in range(processes) for d in [d for d in devices if d.process_index == p][:per_process]]
    if model == 1:
        return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=chosen)
    return jax.make_mesh((data, model), (DATA_AXIS, MODEL_AXIS), axis_types=(AxisType.Auto,) * 2,
                         devices=chosen)


def _layer_index(path) -> Optional[int]:
    """l when a tree path ends in [l]["kernel"] or [l]["bias"] (a parameter list's layer l, or an optimiser
    state's copy of it), else None."""
    if len(path) < 2 or not isinstance(path[-1], jax.tree_util.DictKey) or path[-1].key not in ("kernel", "bias"):
        return None
    return path[-2].idx if isinstance(path[-2], jax.tree_util.SequenceKey) else None


class DataParallel:
    """Batches sharded over the `data` axis of `mesh`; parameters and optimiser state replicated, or, on a
    mesh with a `model` axis, hidden layers' output neurons sharded over it (`state_sharding`)."""

    def __init__(self, mesh: Mesh):
        if DATA_AXIS not in mesh.axis_names:
            raise ValueError(f"the mesh needs an axis named {DATA_AXIS!r}; it has {mesh.axis_names}")
        unknown = set(mesh.axis_names) - {DATA_AXIS, MODEL_AXIS}
        if unknown:
            raise ValueError(f"unknown mesh axes {sorted(unknown)}; known: {DATA_AXIS!r}, {MODEL_AXIS!r}")
        self.mesh = mesh
        self.size = int(mesh.shape[DATA_AXIS])
        self.model_size = int(mesh.shape.get(MODEL_AXIS, 1))
        self.batch = NamedSharding(mesh, P(DATA_AXIS))
        self.replicated = NamedSharding(mesh, P())

    def state_sharding(self, state: Any, n_layers: int) -> Any:
        """One sharding per leaf of `state`: the last axis over `model` for a hidden layer's kernel or bias (a
        leaf at [l]["kernel"] or [l]["bias"], l < n_layers − 1, in the parameters or an optimiser's copy of
        them) whose width divides by the model axis; every other leaf replicated."""
        m = self.model_size

        def one(path, leaf):
            l = _layer_index(path)
            if m > 1 and l is not None and l < n_layers - 1 and jnp.ndim(leaf) >= 1 and jnp.shape(leaf)[-1] % m == 0:
                return NamedSharding(self.mesh, P(*(None,) * (jnp.ndim(leaf) - 1), MODEL_AXIS))
            return self.replicated

        return jax.tree_util.tree_map_with_path(one, state)

    def check_model_axis(self, layers) -> None:
        """With a model axis, the trainer's layer specs must be known (its `layers`) and at least one hidden layer's
        width must divide by the axis (or nothing would shard)."""
        if self.model_size == 1:
            return
        if layers is None:
            raise ValueError(f"a model axis of {self.model_size} devices needs the trainer's layer specs (a `layers` "
                             "attribute) to know which leaves are hidden layers' weights")
        widths = [spec.features for spec in tuple(layers)[:-1]]
        if not any(w % self.model_size == 0 for w in widths):
            raise ValueError(f"a model axis of {self.model_size} devices shards no layer: no hidden width in "
                             f"{widths} divides by {self.model_size}")

    def place_state(self, state: Any, n_layers: int) -> Any:
        """`state` on the mesh with `state_sharding` (from host arrays, e.g. a restored checkpoint)."""
        return jax.device_put(state, self.state_sharding(state, n_layers))

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
        """`config` (a `fenchel.LiftedConfig`) with w_mode "auto" resolved to "primal_mm" when the samples are
        sharded (data axis > 1), the form whose sums over samples shard (see the module docstring), and
        x_chunk_bytes "auto" to off: chunks of the sharded sample axis would be sliced across devices, and
        each device holds its share of rows only."""
        auto = {"w_mode": "primal_mm"} if config.w_mode == "auto" and self.size > 1 else {}
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


def _host_array(leaf) -> np.ndarray:
    """A (possibly sharded, possibly multi-process) array as one numpy array from its addressable shards."""
    if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
        return np.asarray(jax.device_get(leaf))
    out = np.empty(leaf.shape, leaf.dtype)
    covered = np.zeros(leaf.shape, bool)
    for shard in leaf.addressable_shards:
        out[shard.index] = np.asarray(shard.data)
        covered[shard.index] = True
    if not covered.all():
        raise ValueError(f"this process holds only part of an array of shape {leaf.shape} ({leaf.sharding}); "
                         "a model axis must not span processes")
    return out


@jax.jit
def _take_rows(x, y, idx):
    return x[idx], y[idx]


class ShardedTrainer(Trainer):
    """Any `Trainer` run data parallel (and model parallel on a mesh with a `model` axis): the same update,
    with the batch sharded over samples.

    step = jit(trainer.step, in_shardings=(state, batch, batch), out_shardings=(state, replicated)), the
    state's shardings from `DataParallel.state_sharding` (all replicated without a model axis): one program
    per batch shape, whose result equals the unsharded step's up to the order of floating-point sums. `x`,
    `y` given to `step` are whole (global) batches, which every process holds; each process places its own
    rows (`DataParallel.shard`). A model axis needs the trainer's `layers` attribute (its layer specs).
    """

    def __init__(self, trainer: Trainer, parallel: DataParallel):
        layers = getattr(trainer, "layers", None)
        parallel.check_model_axis(layers)
        self.trainer, self.parallel = trainer, parallel
        self.n_layers = 0 if layers is None else len(layers)  # 0: nothing to split (no model axis)
        self._programs: dict = {}

    def _compiled(self, state: Any) -> tuple:
        """(jitted step, its state sharding) for states shaped like `state` (one per tree structure)."""
        key = jax.tree_util.tree_structure(state)
        if key not in self._programs:
            p, trainer = self.parallel, self.trainer
            sharding = p.state_sharding(state, self.n_layers)
            program = jax.jit(lambda s, x, y: trainer.step(s, x, y), in_shardings=(sharding, p.batch, p.batch),
                              out_shardings=(sharding, p.replicated))
            self._programs[key] = program, sharding
        return self._programs[key]

    def program(self, state: Any):
        """The jitted step for states shaped like `state`."""
        return self._compiled(state)[0]

    def _step(self, state, x, y):
        return self.program(state)(state, x, y)

    def init(self, params):
        return self.parallel.place_state(self.trainer.init(params), self.n_layers)

    def host_state(self, state: Any) -> Any:
        """`state` as host (numpy) arrays, assembled from this process's shards without a device program (each
        process holds whole rows of the model axis, so all of every leaf): for checkpoints and evaluation, with
        no device ever holding the unsharded state."""
        return jax.tree_util.tree_map(_host_array, state)

    def step(self, state: Any, x, y) -> tuple[Any, StepInfo]:
        _, sharding = self._compiled(state)
        leaves, targets = jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(sharding)
        if not all(isinstance(leaf, jax.Array) and leaf.sharding == t for leaf, t in zip(leaves, targets)):
            state = jax.device_put(state, sharding)  # e.g. restored from a checkpoint (numpy), or replicated
        return self._step(state, self.parallel.shard(x), self.parallel.shard(y))

    def step_on_rows(self, state: Any, x, y, idx) -> tuple[Any, StepInfo]:
        """`step` on the rows idx of (x, y), every process gathering the same rows (see `experiments.loop`)."""
        return self.step(state, *_take_rows(x, y, idx))

    def params(self, state):
        """The network's weights: replicated on every device, or with a model axis as host arrays (`host_state`)."""
        params = self.trainer.params(state)
        return params if self.parallel.model_size == 1 else self.host_state(params)

    def metrics(self, state, x, y) -> dict:
        """`trainer.metrics` on all rows of (x, y): sharded over samples when their count splits evenly over
        the data axis, else on this process's first device (every process computes the same figures)."""
        if x.shape[0] % self.parallel.size == 0:
            return self.trainer.metrics(state, self.parallel.shard(x), self.parallel.shard(y))
        device = jax.local_devices()[0]
        state = jax.device_put(self.host_state(state), device)
        return self.trainer.metrics(state, jax.device_put(x, device), jax.device_put(y, device))
