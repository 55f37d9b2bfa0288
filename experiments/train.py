"""Training and evaluation for every registered trainer, driven by an ml_collections config.

`train_and_evaluate(config, workdir)` is the whole job: it validates the
config, loads data, trains with the trainer named by `config.trainer` (see
`experiments.trainers`) through the shared epoch loop (`experiments.loop`),
evaluates the flax network with the trained weights, and keeps the workdir
(`experiments.workdir`):

  config.json         the resolved config
  metrics.jsonl       one JSON object per evaluation (epoch, step, wall time, train loss,
                      test accuracy, and the trainer's own metrics, e.g. the lifted objective)
  checkpoint.msgpack  the state after the last finished epoch, with its checksum and config hash
  summary.json        final figures
  history/            the parameter path, when record_every > 0

Relaunching with the same workdir resumes from the checkpoint; the run's
randomness depends only on (seed, epoch), so a resumed run ends with the
same metrics as an uninterrupted one. A non-finite objective, loss or weight,
a penalty below zero, or a training loss above divergence_factor × its
initial value stops the run with `TrainingDiverged`; the last good checkpoint
stays. A second launch into a busy workdir is refused.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from configs import default as default_config
from experiments import loop
from experiments.configs_util import did_you_mean
from experiments.trainers import TRAINERS, all_fields
from experiments.workdir import ParamHistory, ReadOnlyWorkdir, Workdir, WorkdirError, config_hash
from fenchel.data import DATASETS, dataset_fingerprint, load_dataset
from fenchel.layers import Dense, architecture_name, init_params, parse_layers, trailing_pool
from fenchel.lifted import LOSSES, loss_per_sample
from fenchel.models import evaluate, make_network, to_flax
from fenchel.penalties import ACTIVATIONS, activation_penalty
from fenchel.sharding import DataParallel, device_mesh

# Fields that may change between launches of one run: the progress bar, the devices (a sharded run's results
# equal the one-device run's up to the order of floating-point sums), stack_layers and x_chunk_bytes (likewise),
# bound_max_sweeps (what the logged relaxation bound costs; training is the same) and w_retry (a run that goes on
# is the same with it or without).
NOT_IDENTITY = ("progress", "stack_layers", "bound_max_sweeps", "x_chunk_bytes", "w_retry", "mesh_data", "mesh_model",
                "distributed", "coordinator_address", "num_processes", "process_id")
PENALTY_TOLERANCE = 1e-6  # a logged penalty below −this is a numerical breakdown (B ≥ 0 in exact arithmetic)


class TrainingDiverged(FloatingPointError):
    """Training produced a non-finite or exploding value; the message says what is kept."""


# ---------------------------------------------------------------- validation
def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the first unknown key or bad value, before any compute.

    The launcher checks its base fields here; each trainer's own fields are
    checked by its registry entry (`TrainerSpec.check`).
    """
    known = default_config.get_config()
    unknown = sorted(set(config.keys()) - set(known.keys()))
    if unknown:
        raise ValueError("; ".join(f"unknown config key {k!r}{did_you_mean(k, known.keys())}" for k in unknown)
                         + " (every key, with its default, is in configs/default.py)")
    c = config

    def need(cond, msg):
        if not cond:
            raise ValueError(f"bad config: {msg}")

    need(c.trainer in TRAINERS, f"trainer={c.trainer!r}, expected one of {tuple(TRAINERS)}")
    need(c.dataset in DATASETS, f"dataset={c.dataset!r}, expected one of {DATASETS}")
    need(c.dataset != "npz" or c.data_file, "dataset='npz' needs data_file=<path to the .npz file>")
    need(c.activation in ACTIVATIONS, f"activation={c.activation!r}, expected one of {ACTIVATIONS}")
    need(0 < c.negative_slope < 1, f"negative_slope={c.negative_slope} must be in (0, 1)")
    need(c.loss in LOSSES, f"loss={c.loss!r}, expected one of {LOSSES}")
    try:
        hidden = parse_layers(c.layers)
    except ValueError as err:
        raise ValueError(f"bad config: {err}") from None
    need(len(hidden) >= 1, f"layers={c.layers!r} needs at least one hidden layer, e.g. 'dense:300'")
    need(c.seed >= 0, f"seed={c.seed} must be ≥ 0")
    need(c.batch_size >= 1, f"batch_size={c.batch_size} must be ≥ 1")
    need(c.total_epochs >= 0 and c.total_steps >= 0,
         f"total_epochs={c.total_epochs} and total_steps={c.total_steps} must be ≥ 0")
    need((c.total_epochs > 0) != (c.total_steps > 0),
         f"set exactly one of total_epochs ({c.total_epochs}) and total_steps ({c.total_steps})")
    need(c.eval_every_epochs >= 1, f"eval_every_epochs={c.eval_every_epochs} must be ≥ 1")
    need(c.objective_batch >= 1, f"objective_batch={c.objective_batch} must be ≥ 1")
    for key in ("val_size", "train_size", "test_size"):
        need(c[key] >= 0, f"{key}={c[key]} must be ≥ 0")
    need(c.divergence_factor > 1, f"divergence_factor={c.divergence_factor} must be > 1")
    need(c.record_every >= 0, f"record_every={c.record_every} must be ≥ 0 (0: off)")
    need(c.history_max_mb > 0, f"history_max_mb={c.history_max_mb} must be > 0")
    if c.record_staircase:
        lifted = c.trainer in TRAINERS and "alternations" in TRAINERS[c.trainer].fields
        need(lifted, f"record_staircase=True needs a lifted trainer (one with alternations), not {c.trainer!r}")
        need(c.alternations == 1, f"record_staircase=True needs alternations=1 (got {c.alternations}): with more "
             "rounds the W blocks of a minibatch are not one move each and the staircase cannot be rebuilt")
        need(c.record_every == 1, f"record_staircase=True needs record_every=1 (got {c.record_every})")
    need(c.mesh_data >= 0, f"mesh_data={c.mesh_data} must be ≥ 0 (0: all devices)")
    need(c.mesh_model >= 1, f"mesh_model={c.mesh_model} must be ≥ 1 (1: no model axis)")
    need(c.mesh_data <= 1 or c.batch_size % c.mesh_data == 0,
         f"batch_size={c.batch_size} is not divisible by mesh_data={c.mesh_data}; use a multiple of {c.mesh_data}")
    need(c.num_processes >= 0 and c.process_id >= -1,
         f"num_processes={c.num_processes} must be ≥ 0 and process_id={c.process_id} ≥ -1 (0 / -1: detected)")
    need(c.distributed or not (c.coordinator_address or c.num_processes or c.process_id >= 0),
         "coordinator_address, num_processes and process_id need distributed=True")
    TRAINERS[c.trainer].check(c)


# Fields added after runs existed, with the value every earlier run had: left out of a run's identity at that
# value, so earlier workdirs keep their config hash (they resume, and their summaries are reused).
ADDED_LATER = {"branches": 1, "merge": "sum", "record_staircase": False, "lambda_update": "fixed", "lambda_step": 1.0,
               "lambda_growth": 1.001, "lambda_max": 1e3, "budget_epochs": 0, "lambda_granularity": "layer",
               "outer_momentum": 0.0}


def identity(config) -> dict:
    """What makes a run this run: the base fields and the fields its own trainer owns (config.json less the
    fields of other trainers, so registering a new trainer does not change it, less `NOT_IDENTITY`, and less
    `ADDED_LATER` fields at their original value)."""
    values = json.loads(config.to_json()) if hasattr(config, "to_json") else dict(config)
    others = set(all_fields()) - set(TRAINERS[values["trainer"]].fields if values.get("trainer") in TRAINERS
                                     else ())
    return {k: v for k, v in values.items() if k not in NOT_IDENTITY and k not in others
            and not (k in ADDED_LATER and v == ADDED_LATER[k])}


def config_differences(saved: dict, config) -> list:
    """Keys whose values differ between a stored config.json and `config`, on their identities; a field the
    stored config predates counts as its default."""
    a, b = identity({**json.loads(default_config.get_config().to_json()), **saved}), identity(config)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def data_key(config) -> tuple:
    """(dataset, data_dir, data_file) of a config: which data it reads."""
    return config.dataset, config.data_dir or None, config.data_file or None


def current_fingerprint(config, cache: dict) -> str:
    """sha256 of the data the config reads now (`fenchel.data.dataset_fingerprint`), read once per `cache`."""
    key = data_key(config)
    if key not in cache:
        cache[key] = dataset_fingerprint(*key)
    return cache[key]


def data_source(config) -> str:
    """The data a config reads, as error messages name it."""
    return config.data_file if config.dataset == "npz" else f"{config.dataset} ({config.data_dir or 'default folder'})"


def check_data(recorded: Optional[str], now: str, path, config) -> None:
    """A checkpoint or summary `path` recorded on other data (sha256 `recorded`; None: written before runs
    recorded it) than the config's data now (`now`, `fenchel.data.fingerprint`) is an error naming both."""
    if recorded is not None and recorded != now:
        raise WorkdirError(f"{path} was computed on other data: {data_source(config)} now has sha256 {now[:12]}…, "
                           f"the run's had {recorded[:12]}…; use a fresh workdir (or delete {Path(path).parent}) "
                           "to train on the new data")


# ---------------------------------------------------------------- job
RAW_SCALE_NOTE = 100.0  # a note suggests normalize=True above this largest |feature| (uint8 images load as [0, 1])


class Job:
    """Data, network, trainer and evaluation of one run (no workdir bookkeeping)."""

    def __init__(self, config: ml_collections.ConfigDict):
        validate_config(config)
        self.config = c = config
        hidden = parse_layers(c.layers)
        data = load_dataset(c.dataset, c.data_dir or None, flatten=hidden[0].kind == "dense",
                            normalize=c.normalize, val_size=c.val_size, seed=c.seed,
                            train_size=c.train_size or None, test_size=c.test_size or None,
                            data_file=c.data_file or None)
        self.data = data
        if jax.process_count() > 1:  # every process must hold the same data (it fingerprints its own copy)
            multihost_utils.assert_equal(np.frombuffer(bytes.fromhex(data.fingerprint), np.uint8),
                                         "the processes read different data (their sha256 differ)")
        scale = float(max(data.x_train.max(), -data.x_train.min()))
        if not c.normalize and scale > RAW_SCALE_NOTE and jax.process_index() == 0:
            print(f"note: the training features reach |x| = {scale:.3g}; features in raw units train poorly with "
                  "lifted training, whose penalties, λ and ρ are not scale-free: set --config.normalize=True",
                  file=sys.stderr)
        self.data_fingerprint = data.fingerprint  # recorded in checkpoints and the summary (`_Run.check_data`)
        n = data.x_train.shape[0]
        if c.batch_size > n:
            raise ValueError(f"bad config: batch_size={c.batch_size} exceeds the {n} training examples")
        self.steps_per_epoch = n // c.batch_size
        self.total_epochs = c.total_epochs or -(-c.total_steps // self.steps_per_epoch)
        self.layers = (*hidden, Dense(int(data.num_classes), pool=trailing_pool(c.layers)))
        self.in_shape = data.x_train.shape[1:]
        try:  # the one initialisation; its shape checks come before any training
            self.params0 = init_params(jax.random.PRNGKey(c.seed), self.layers, self.in_shape, data.x_train.dtype)
        except ValueError as err:
            raise ValueError(f"bad config: layers={c.layers!r} do not fit the {c.dataset} inputs of shape "
                             f"{tuple(self.in_shape)}: {err}") from None
        self.architecture = architecture_name(self.layers, self.in_shape)
        self.penalty = activation_penalty(c.activation, c.negative_slope)
        self.model = make_network(self.layers, c.activation, c.negative_slope)
        self.x_train = jnp.asarray(data.x_train)
        self.labels_train = jnp.asarray(data.y_train)
        self.y_train = jax.nn.one_hot(self.labels_train, data.num_classes, dtype=self.x_train.dtype)
        self.spec = TRAINERS[c.trainer]
        self.trainer = self.spec.build(c, self.layers, self.penalty)
        self.parallel = None
        if c.mesh_data != 1 or c.mesh_model != 1:  # data (and model) parallel over a device mesh
            self.parallel = DataParallel(device_mesh(c.mesh_data or None, c.mesh_model))
            self.parallel.check_batch_size(c.batch_size)
            self.trainer = self.parallel.wrap(self.trainer)
        model = self.model
        self._sum_loss = jax.jit(lambda v, x, y: jnp.sum(loss_per_sample(c.loss, y, model.apply(v, x))))

    # -------------------------------------------------------- training
    def fit_epoch(self, trainer, state, epoch: int, fine_tune: bool = False, on_step=None):
        """One epoch of `trainer` on the training set through the shared loop."""
        stream = loop.FINETUNE_STREAM if fine_tune else loop.TRAIN_STREAM
        return loop.run_epoch(trainer, state, self.x_train, self.y_train, seed=self.config.seed, epoch=epoch,
                              batch_size=self.config.batch_size, stream=stream, on_step=on_step)

    # -------------------------------------------------------- evaluation
    def test_accuracy(self, params) -> float:
        return evaluate(self.model, to_flax(params), self.data.x_test, self.data.y_test)

    def train_loss(self, params, chunk: int = 10000) -> float:
        """Mean loss of the flax network over the whole training set."""
        variables = to_flax(params)
        total = 0.0
        n = self.x_train.shape[0]
        for i in range(0, n, chunk):
            total += float(self._sum_loss(variables, self.x_train[i:i + chunk], self.y_train[i:i + chunk]))
        return total / n

    def evaluate(self, state, epoch: int, wall: float) -> dict:
        params = self.trainer.params(state)
        if self.parallel is not None:  # replicated over the mesh (all processes): this process's copy
            params = jax.device_get(params)
        record = {"epoch": epoch, "step": epoch * self.steps_per_epoch, "wall_time": wall,
                  "test_accuracy": self.test_accuracy(params), "train_loss": self.train_loss(params)}
        if self.data.x_val.shape[0]:
            record["val_accuracy"] = evaluate(self.model, to_flax(params), self.data.x_val, self.data.y_val)
        k = min(self.config.objective_batch, self.x_train.shape[0])
        record.update(self.trainer.metrics(state, self.x_train[:k], self.y_train[:k]))
        return record


def _numbers(record: dict):
    for value in record.values():
        if isinstance(value, (list, tuple)):
            yield from value
        elif isinstance(value, (int, float)):
            yield value


def _tree_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(tree))


def _flat_params(params) -> dict:
    return {f"layer_{i}/{name}": np.asarray(value, np.float32) for i, p in enumerate(params)
            for name, value in p.items()}


def history_unit(config, n_layers: int) -> int:
    """History steps per minibatch step: n_layers for a staircase (`record_staircase`), else 1.

    A staircase history numbers θ after minibatch step t as t·B (B = n_layers) and, for k = 1 … B−1, the
    point with layers 0 … k−1 taken from θ_t and the others from θ_{t−1} as (t−1)·B + k.
    """
    return int(n_layers) if config.get("record_staircase", False) else 1


def staircase(before: dict, after: dict, n_layers: int) -> list:
    """The B − 1 inner points of one staircase step: point k (1 ≤ k < B) has layers < k from `after`."""
    def layer(name):
        return int(name.split("/", 1)[0].split("_", 1)[1])

    return [{name: (after[name] if layer(name) < k else before[name]) for name in after} for k in range(1, n_layers)]


def advance(progress, leave_out_wait: bool = False) -> None:
    """One step on the progress bar. leave_out_wait: the time since the bar last refreshed (a launch's first step,
    which compiles it) is left out of the bar's rate and so of its ETA; the elapsed time still counts it."""
    if leave_out_wait:  # tqdm's rate averages (steps, seconds) between refreshes: count neither this step nor its wait
        progress.last_print_t, progress.last_print_n = time.time(), progress.n + 1
    progress.update(1)


def _make_progress(config, total, initial):
    if not config.progress:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="step", desc=f"{config.trainer}", dynamic_ncols=True,
                mininterval=1.0, file=sys.stderr)


def _kept(workdir: Workdir, epoch: int) -> str:
    if epoch <= 0:
        return (f"no checkpoint was saved before it (it failed in its first epoch), so {workdir.path} holds no "
                "trained state; relaunch with other settings in a fresh workdir (or delete this one)")
    return f"the last good checkpoint in {workdir.path} (epoch {epoch}) is kept"


class _Run:
    """One launch of a job in its workdir: resume, the epoch loop, checks, records."""

    def __init__(self, job: Job, workdir: Workdir):
        self.job, self.workdir, self.config = job, workdir, job.config
        self.hash = config_hash(identity(job.config))
        self.last_record = None

    def check_data(self, recorded: Optional[str], path) -> None:
        check_data(recorded, self.job.data_fingerprint, path, self.config)

    # -------------------------------------------------------- checkpoints
    def _template(self):
        return {"epoch": 0, "wall": 0.0, "initial_loss": 0.0, "state": self.job.trainer.init(self.job.params0)}

    def save(self, ckpt: dict) -> None:
        if self.job.parallel is not None:  # host arrays from this process's shards (a model-sharded state too)
            ckpt = {**ckpt, "state": self.job.trainer.host_state(ckpt["state"])}
        meta = {"epoch": int(ckpt["epoch"]), "step": int(ckpt["epoch"]) * self.job.steps_per_epoch,
                "config_hash": self.hash, "trainer": self.config.trainer, "data_sha256": self.job.data_fingerprint}
        self.workdir.save_checkpoint(flax.serialization.to_bytes(ckpt), meta)

    def restore(self) -> Optional[dict]:
        loaded = self.workdir.load_checkpoint(expected_config_hash=self.hash)
        if loaded is None:
            return None
        header, payload = loaded
        self.check_data(header.get("data_sha256"), self.workdir.checkpoint_path)
        try:
            return flax.serialization.from_bytes(self._template(), payload)
        except Exception as err:  # noqa: BLE001 - any decoding failure means a file we cannot use
            raise WorkdirError(f"{self.workdir.checkpoint_path} cannot be decoded ({type(err).__name__}: {err}); "
                               "delete it to restart the run from scratch") from None

    def check_config(self) -> None:
        """config.json must hold this run's config; write it for a new run."""
        saved = self.workdir.read_config()
        if saved is None and not self.workdir.writable:
            return  # process 0 writes it
        if saved is None:
            self.workdir.load_checkpoint(expected_config_hash=self.hash)  # a checkpoint of another config: refuse
            self.workdir.write_config(json.loads(self.config.to_json()))
            return
        diff = config_differences(saved, self.config)
        if diff:
            a, b = identity(saved), identity(self.config)
            shown = {k: (a.get(k), b.get(k)) for k in diff}
            raise WorkdirError(f"{self.workdir.config_path} holds a run with another config (saved, now): {shown}; "
                               "relaunch with the saved config or use a fresh workdir")

    # -------------------------------------------------------- the loop
    def run(self, max_epochs_this_run: Optional[int]) -> dict:
        job, wd, c = self.job, self.workdir, self.config
        self.check_config()
        ckpt = self.restore()
        if ckpt is None:
            ckpt = self._template()
            ckpt["initial_loss"] = job.train_loss(job.params0)
        start_epoch = int(ckpt["epoch"])
        wd.read_metrics()  # a corrupt line is an error here, before anything is rewritten
        if wd.repair_torn_metrics():
            print(f"note: {wd.metrics_path}: a torn last line was moved to metrics.torn.txt", file=sys.stderr)
        moved = wd.supersede_metrics_after(start_epoch)
        if moved:
            print(f"note: {moved} record(s) after the checkpoint's epoch {start_epoch} moved to "
                  "metrics.superseded.jsonl; those epochs run again", file=sys.stderr)
        history = None
        unit = history_unit(c, len(job.layers))
        if c.record_every > 0 and wd.writable:
            history = ParamHistory(wd, int(c.history_max_mb * 2**20))
            history.discard_after(start_epoch * job.steps_per_epoch * unit)
            if start_epoch == 0:
                history.add(0, _flat_params(job.params0))
        if wd.writable:  # what is about to run, in one line (process 0)
            d = job.data
            print(f"{c.trainer} on {data_source(c)}: {len(d.y_train)} training / {len(d.y_test)} test examples of "
                  f"shape {tuple(job.in_shape)}, {d.num_classes} classes; network {job.architecture}; "
                  f"{job.total_epochs} epoch(s) of {job.steps_per_epoch} steps", file=sys.stderr)
        if start_epoch:
            print(f"resuming {wd.path} from epoch {start_epoch}", file=sys.stderr)

        progress = None if not wd.writable else _make_progress(  # one bar, on process 0
            c, job.total_epochs * job.steps_per_epoch, start_epoch * job.steps_per_epoch)
        state, wall = ckpt["state"], float(ckpt["wall"])
        epochs_run = 0
        try:
            for epoch in range(start_epoch + 1, job.total_epochs + 1):
                if max_epochs_this_run is not None and epochs_run >= max_epochs_this_run:
                    return {"interrupted_after_epoch": epoch - 1}
                first_step = (epoch - 1) * job.steps_per_epoch
                # staircase: θ before the step, whose layers the step's W blocks replace one at a time
                before = [_flat_params(job.trainer.params(state))] if history is not None and unit > 1 else None

                def on_step(i, n, s, first_step=first_step, before=before, first_of_launch=epochs_run == 0):
                    if progress is not None:
                        advance(progress, leave_out_wait=first_of_launch and i == 0)  # i = 0 compiled the step
                    step = first_step + i + 1
                    if history is not None and step % c.record_every == 0:
                        after = _flat_params(job.trainer.params(s))
                        if before is not None:
                            for k, point in enumerate(staircase(before[0], after, unit), start=1):
                                history.add((step - 1) * unit + k, point)
                            before[0] = after
                        history.add(step * unit, after)

                state, result = job.fit_epoch(job.trainer, state, epoch, on_step=on_step)
                if result.nonfinite or not _tree_finite(job.trainer.params(state)):
                    raise TrainingDiverged(
                        f"training diverged: a non-finite objective, loss or weight in epoch {epoch} (steps "
                        f"{first_step + 1}–{epoch * job.steps_per_epoch}); the run stops here and "
                        + _kept(wd, epoch - 1))
                wall += result.seconds
                if epoch % c.eval_every_epochs == 0 or epoch == job.total_epochs:
                    record = job.evaluate(state, epoch, wall)
                    self.check_record(record, float(ckpt["initial_loss"]), epoch)
                    wd.append_metrics(record)
                    self.last_record = record
                    if progress is not None:
                        progress.set_postfix(test_acc=f"{record['test_accuracy']:.4f}")
                ckpt = {**ckpt, "epoch": epoch, "wall": wall, "state": state}
                if history is not None:
                    history.flush()
                self.save(ckpt)
                epochs_run += 1
        finally:
            if progress is not None:
                progress.close()
        return self.summary(state, wall)

    def check_record(self, record: dict, initial_loss: float, epoch: int) -> None:
        """Stop on non-finite figures, a negative penalty, or a training loss that exploded."""
        wd = self.workdir
        if not all(np.isfinite(v) for v in _numbers(record)):
            raise TrainingDiverged(f"training diverged: non-finite metrics at epoch {epoch}: {record}; the run "
                                   "stops here and " + _kept(wd, epoch - 1))
        penalties = record.get("penalties", [])
        if penalties and min(penalties) < -PENALTY_TOLERANCE:
            raise TrainingDiverged(
                f"numerical breakdown at epoch {epoch}: a lifted penalty is {min(penalties):.3g} < 0 although "
                "B ≥ 0 (λ or the weights are too large for the arithmetic); the run stops here and "
                + _kept(wd, epoch - 1))
        limit = self.config.divergence_factor * initial_loss
        if record["train_loss"] > limit:
            raise TrainingDiverged(
                f"training diverged: the training loss {record['train_loss']:.4g} at epoch {epoch} exceeds "
                f"divergence_factor={self.config.divergence_factor:g} × its initial value {initial_loss:.4g} "
                "(lower the learning rate, or raise divergence_factor); the run stops here and "
                + _kept(wd, epoch - 1))

    def summary(self, state, wall: float) -> dict:
        job, c = self.job, self.config
        existing = self.workdir.read_summary()
        if existing is not None:
            self.check_data(existing.get("data_sha256"), self.workdir.summary_path)
            return existing
        # a process other than 0 reports what it computed itself (process 0 may still be writing)
        records = self.workdir.read_metrics() if self.workdir.writable else [self.last_record]
        if not records or records[-1]["epoch"] != job.total_epochs:
            raise WorkdirError(f"{self.workdir.metrics_path} has no record of the final epoch {job.total_epochs} "
                               "although the checkpoint is final; delete the workdir and rerun")
        final = records[-1]
        summary = {
            "trainer": c.trainer, "dataset": c.dataset, "architecture": job.architecture,
            "activation": c.activation, "seed": c.seed, "epochs": job.total_epochs,
            "steps": job.total_epochs * job.steps_per_epoch, "wall_time": wall,
            "test_accuracy": final["test_accuracy"], "train_loss": final["train_loss"],
            "config_hash": self.hash, "data_sha256": job.data_fingerprint,
        }
        if "lifted_objective" in final:
            summary["lifted_objective"] = final["lifted_objective"]
        if job.spec.finish is not None:
            summary.update(job.spec.finish(job, state))
        self.workdir.write_summary(summary)
        return summary


def start_distributed(config) -> None:
    """jax.distributed.initialize() with the config's coordinator settings (empty / 0 / -1: detected from
    the cluster environment, e.g. SLURM or Open MPI); then the data mesh must span every process."""
    if not jax.distributed.is_initialized():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
        jax.distributed.initialize(coordinator_address=config.coordinator_address or None,
                                   num_processes=config.num_processes or None,
                                   process_id=config.process_id if config.process_id >= 0 else None)
    if jax.process_count() > 1 and (config.mesh_data == 1 or config.mesh_data % jax.process_count()):
        raise ValueError(f"bad config: mesh_data={config.mesh_data} must span the {jax.process_count()} processes "
                         "(0: all devices, or a multiple of the process count)")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, max_epochs_this_run: Optional[int] = None) -> dict:
    """Run (or resume) the job described by `config` in `workdir`; returns the summary.

    max_epochs_this_run: stop after this many epochs in this call, as an
    interruption would (for time-sliced jobs and tests); relaunch to go on.
    """
    validate_config(config)
    if config.distributed:
        start_distributed(config)
    job = Job(config)  # validates the config, loads and checks the data before anything is written
    wd = Workdir(workdir) if jax.process_index() == 0 else ReadOnlyWorkdir(workdir)
    removed = wd.prepare()
    if removed:
        print(f"note: removed {len(removed)} temporary file(s) of interrupted writes in {wd.path}", file=sys.stderr)
    with wd.lock():
        return _Run(job, wd).run(max_epochs_this_run)


def read_metrics(workdir) -> list[dict]:
    """The records of `workdir`/metrics.jsonl (see `experiments.workdir.Workdir.read_metrics`)."""
    return Workdir(workdir).read_metrics()
