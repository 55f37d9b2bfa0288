"""Training and evaluation for every trainer, driven by an ml_collections config.

`train_and_evaluate(config, workdir)` is the whole job: it validates the
config, loads data, trains (fenchel / lnn: lifted BCD, then an optional
warm-started optax fine-tune; sgd / adam: optax on the same flax model,
initialisation, data order and evaluation), and writes to `workdir`:

  config.json     the resolved config
  metrics.jsonl   one JSON object per evaluation (epoch, step, wall time,
                  train loss, test accuracy, and for lifted trainers the
                  lifted objective, each layer's penalty and the network
                  loss on the same batch)
  checkpoint.msgpack  the state after the last finished epoch (atomic)
  summary.json    final figures

Relaunching with the same workdir resumes from the checkpoint; the run's
randomness depends only on (seed, epoch), so a resumed run ends with the
same metrics as an uninterrupted one. A non-finite objective or loss stops
the run with FloatingPointError; the last good checkpoint stays.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import default as default_config
from fenchel import LiftedConfig, LiftedTrainer, SolverConfig
from fenchel.blocks import W_MODES, X_MODES
from fenchel.data import check_finite, load_dataset
from fenchel.lifted import LOSSES, loss_per_sample
from fenchel.models import OptaxTrainer, evaluate, init_params, make_mlp, make_optimizer, to_flax
from fenchel.penalties import ACTIVATIONS

LIFTED_TRAINERS = ("fenchel", "lnn")
GRADIENT_TRAINERS = ("sgd", "adam")
TRAINERS = LIFTED_TRAINERS + GRADIENT_TRAINERS
DEFAULT_LEARNING_RATES = {"adam": 1e-3, "sgd": 0.05}
CHECKPOINT = "checkpoint.msgpack"


# ---------------------------------------------------------------- validation
def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the first unknown key or bad value, before any compute."""
    known = default_config.get_config()
    unknown = sorted(set(config.keys()) - set(known.keys()))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted(known.keys())}")
    c = config

    def need(cond, msg):
        if not cond:
            raise ValueError(f"bad config: {msg}")

    need(c.trainer in TRAINERS, f"trainer={c.trainer!r}, expected one of {TRAINERS}")
    need(c.activation in ACTIVATIONS, f"activation={c.activation!r}, expected one of {ACTIVATIONS}")
    need(c.loss in LOSSES, f"loss={c.loss!r}, expected one of {LOSSES}")
    need(c.trainer != "lnn" or c.activation == "relu", "trainer='lnn' needs activation='relu'")
    need(c.dataset in ("mnist", "fashion_mnist", "cifar10"), f"dataset={c.dataset!r}")
    need(len(c.hidden) >= 1 and all(int(h) >= 1 for h in c.hidden), f"hidden={c.hidden} needs ≥ 1 positive width")
    need(c.batch_size >= 1, f"batch_size={c.batch_size} must be ≥ 1")
    need((c.total_epochs > 0) != (c.total_steps > 0),
         f"set exactly one of total_epochs ({c.total_epochs}) and total_steps ({c.total_steps})")
    need(c.total_epochs >= 0 and c.total_steps >= 0, "durations must be non-negative")
    need(c.lambda_ >= 0, f"lambda_={c.lambda_} must be ≥ 0")
    need(all(v >= 0 for v in c.lambda_per_layer), f"lambda_per_layer={c.lambda_per_layer} must be ≥ 0")
    need(len(c.lambda_per_layer) in (0, len(c.hidden)),
         f"lambda_per_layer needs {len(c.hidden)} values (one per hidden layer), got {len(c.lambda_per_layer)}")
    need(c.rho >= 0, f"rho={c.rho} must be ≥ 0")
    need(c.rho_prox >= 0, f"rho_prox={c.rho_prox} must be ≥ 0")
    n_layers = len(c.hidden) + 1
    for name in ("rho_per_layer", "rho_prox_per_layer"):
        values = tuple(c[name])
        need(all(v >= 0 for v in values), f"{name}={values} must be ≥ 0")
        need(len(values) in (0, n_layers), f"{name} needs {n_layers} values (one per layer), got {len(values)}")
    need(c.lbd_coef > 0, f"lbd_coef={c.lbd_coef} must be > 0")
    need(c.alternations >= 1, f"alternations={c.alternations} must be ≥ 1")
    need(c.schedule in ("sequential", "parallel"), f"schedule={c.schedule!r}")
    need(c.x_mode in X_MODES, f"x_mode={c.x_mode!r}, expected one of {X_MODES}")
    need(c.w_mode in W_MODES, f"w_mode={c.w_mode!r}, expected one of {W_MODES}")
    need(c.x_tol > 0 and c.w_tol > 0, "x_tol and w_tol must be > 0")
    need(c.x_max_steps >= 1 and c.w_max_steps >= 1, "x_max_steps and w_max_steps must be ≥ 1")
    need(c.learning_rate >= 0, f"learning_rate={c.learning_rate} must be > 0 (or 0 for the trainer's default)")
    need(0 <= c.momentum < 1, f"momentum={c.momentum} must be in [0, 1)")
    need(c.warm_start_epochs >= 0, f"warm_start_epochs={c.warm_start_epochs} must be ≥ 0")
    need(c.warm_start_optimizer in GRADIENT_TRAINERS, f"warm_start_optimizer={c.warm_start_optimizer!r}")
    need(c.warm_start_lr > 0, f"warm_start_lr={c.warm_start_lr} must be > 0")
    need(c.eval_every_epochs >= 1, f"eval_every_epochs={c.eval_every_epochs} must be ≥ 1")
    need(c.objective_batch >= 1, f"objective_batch={c.objective_batch} must be ≥ 1")
    need(c.val_size >= 0 and c.train_size >= 0 and c.test_size >= 0, "sizes must be ≥ 0")
    need(0 < c.negative_slope < 1, f"negative_slope={c.negative_slope} must be in (0, 1)")


def lifted_config(c: ml_collections.ConfigDict) -> LiftedConfig:
    """The engine's LiftedConfig for a launcher config."""
    return LiftedConfig(
        activation=c.activation, negative_slope=c.negative_slope,
        lifting="lnn" if c.trainer == "lnn" else "fenchel", loss=c.loss,
        lambdas=tuple(c.lambda_per_layer) if len(c.lambda_per_layer) else c.lambda_,
        rho=tuple(c.rho_per_layer) if len(c.rho_per_layer) else c.rho,
        rho_prox=tuple(c.rho_prox_per_layer) if len(c.rho_prox_per_layer) else c.rho_prox,
        lbd_coef=c.lbd_coef, alternations=c.alternations,
        schedule=c.schedule, x_mode=c.x_mode, w_mode=c.w_mode,
        x_solver=SolverConfig(tol=c.x_tol, max_steps=c.x_max_steps),
        w_solver=SolverConfig(tol=c.w_tol, max_steps=c.w_max_steps),
    )


# ---------------------------------------------------------------- files
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, default=_json_default) + "\n").encode())


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, (np.ndarray, jax.Array)):
        return np.asarray(o).tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def read_metrics(workdir) -> list[dict]:
    """The records of metrics.jsonl (a torn last line from a crash is ignored)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


# ---------------------------------------------------------------- job
class _Job:
    """State of one run: data, model, trainer and workdir bookkeeping."""

    def __init__(self, config, workdir):
        self.config = config
        self.workdir = Path(workdir)
        c = config
        data = load_dataset(c.dataset, c.data_dir or None, flatten=True, normalize=c.normalize,
                            val_size=c.val_size, seed=c.seed, train_size=c.train_size or None,
                            test_size=c.test_size or None)
        check_finite(data.x_train, data.x_test, names=["training images", "test images"])
        self.data = data
        n = data.x_train.shape[0]
        if c.batch_size > n:
            raise ValueError(f"bad config: batch_size={c.batch_size} exceeds the {n} training examples")
        self.steps_per_epoch = n // c.batch_size
        self.total_epochs = c.total_epochs or -(-c.total_steps // self.steps_per_epoch)
        self.sizes = (data.x_train.shape[1], *[int(h) for h in c.hidden], data.num_classes)
        self.model = make_mlp(self.sizes, c.activation, c.negative_slope)
        self.x_train = jnp.asarray(data.x_train)
        self.labels_train = jnp.asarray(data.y_train)
        self.y_train = jax.nn.one_hot(self.labels_train, data.num_classes, dtype=self.x_train.dtype)
        self.params0 = init_params(self.model, jax.random.PRNGKey(c.seed), self.sizes[0])
        self._sum_loss = jax.jit(lambda v, x, y: jnp.sum(loss_per_sample(c.loss, y, self.model.apply(v, x))))
        self.lifted = c.trainer in LIFTED_TRAINERS
        if self.lifted:
            self.trainer = LiftedTrainer(lifted_config(c), len(self.sizes) - 1)
        else:
            lr = c.learning_rate or DEFAULT_LEARNING_RATES[c.trainer]
            self.trainer = OptaxTrainer(self.model, make_optimizer(c.trainer, lr, c.momentum), c.loss,
                                        data.num_classes)

    def epoch_key(self, epoch: int) -> jax.Array:
        return jax.random.fold_in(jax.random.PRNGKey(self.config.seed + 1), epoch)

    # -------------------------------------------------------- state
    def initial_state(self):
        if self.lifted:
            return {"epoch": 0, "wall": 0.0, "params": self.params0}
        variables, opt_state = self.trainer.init(self.params0)
        return {"epoch": 0, "wall": 0.0, "variables": variables, "opt_state": opt_state}

    def save(self, state):
        atomic_write_bytes(self.workdir / CHECKPOINT, flax.serialization.to_bytes(state))

    def restore(self):
        path = self.workdir / CHECKPOINT
        if not path.exists():
            return None
        return flax.serialization.from_bytes(self.initial_state(), path.read_bytes())

    def variables(self, state):
        return to_flax(state["params"]) if self.lifted else state["variables"]

    # -------------------------------------------------------- evaluation
    def evaluate(self, state, epoch: int, wall: float) -> dict:
        c = self.config
        variables = self.variables(state)
        record = {"epoch": epoch, "step": epoch * self.steps_per_epoch, "wall_time": wall,
                  "test_accuracy": evaluate(self.model, variables, self.data.x_test, self.data.y_test),
                  "train_loss": self._train_loss(variables)}
        if self.data.x_val.shape[0]:
            record["val_accuracy"] = evaluate(self.model, variables, self.data.x_val, self.data.y_val)
        if self.lifted:
            k = min(c.objective_batch, self.x_train.shape[0])
            terms = self.trainer.minibatch_objective(state["params"], self.x_train[:k], self.y_train[:k])
            record["lifted_objective"] = float(terms["total"])
            record["penalties"] = [float(p) for p in terms["penalties"]]
            record["network_loss_same_batch"] = float(terms["network_loss"])
            record["regulariser"] = float(terms["regulariser"])
        values = [v for key, v in record.items() if key not in ("penalties",)] + record.get("penalties", [])
        if not all(np.isfinite(v) for v in values):
            raise FloatingPointError(
                f"non-finite metrics at epoch {epoch} (step {record['step']}): {record}; "
                f"the run stops here, the last good checkpoint in {self.workdir} is kept")
        return record

    def _train_loss(self, variables, chunk: int = 10000) -> float:
        """Mean loss of the network over the whole training set."""
        apply = self._sum_loss
        total = 0.0
        n = self.x_train.shape[0]
        for i in range(0, n, chunk):
            total += float(apply(variables, self.x_train[i:i + chunk], self.y_train[i:i + chunk]))
        return total / n

    # -------------------------------------------------------- training
    def run_epoch(self, state, epoch: int, progress):
        key = self.epoch_key(epoch)
        bs = self.config.batch_size

        def callback(i, n, *_):
            if progress is not None:
                progress.update(1)

        if self.lifted:
            params, info, seconds = self.trainer.run_epoch(state["params"], self.x_train, self.y_train, bs, key,
                                                           callback)
            return {**state, "params": params}, seconds, bool(info.nonfinite)
        variables, opt_state, loss, seconds = self.trainer.run_epoch(
            state["variables"], state["opt_state"], self.x_train, self.labels_train, bs, key, callback)
        return {**state, "variables": variables, "opt_state": opt_state}, seconds, not np.isfinite(float(loss))

    def check_finite(self, state, epoch: int, flagged: bool) -> None:
        """Hard stop on divergence, before anything of this epoch is saved."""
        if flagged or not _tree_finite(self.variables(state)):
            raise FloatingPointError(
                f"training diverged: non-finite objective, loss or weights in epoch {epoch} (by step "
                f"{epoch * self.steps_per_epoch}); the run stops here and the last good checkpoint in "
                f"{self.workdir} (epoch {epoch - 1}) is kept")

    def warm_start(self, params) -> dict:
        """Lifted weights → flax model → warm_start_epochs of an optax optimiser."""
        c = self.config
        opt = OptaxTrainer(self.model, make_optimizer(c.warm_start_optimizer, c.warm_start_lr, c.momentum), c.loss,
                           self.data.num_classes)
        variables, opt_state = opt.init(params)
        accs, wall = [], 0.0
        for e in range(1, c.warm_start_epochs + 1):
            key = jax.random.fold_in(jax.random.PRNGKey(c.seed + 2), e)
            variables, opt_state, _, seconds = opt.run_epoch(variables, opt_state, self.x_train, self.labels_train,
                                                             c.batch_size, key)
            wall += seconds
            accs.append(evaluate(self.model, variables, self.data.x_test, self.data.y_test))
        return {"warm_start_test_accuracy": accs[-1], "warm_start_curve": accs, "warm_start_wall_time": wall}


def _tree_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(tree))


def _make_progress(config, total, initial):
    if not config.progress:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="step", desc=f"{config.trainer}", dynamic_ncols=True,
                mininterval=1.0, file=sys.stderr)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, max_epochs_this_run: Optional[int] = None) -> dict:
    """Run (or resume) the job described by `config` in `workdir`; returns the summary.

    max_epochs_this_run: stop after this many epochs in this call, as an
    interruption would (for time-sliced jobs and tests); relaunch to go on.
    """
    validate_config(config)
    workdir = Path(workdir)
    job = _Job(config, workdir)  # loads and checks the data before anything is written
    workdir.mkdir(parents=True, exist_ok=True)
    config_json = json.loads(config.to_json())
    config_path = workdir / "config.json"
    if config_path.exists():
        saved = json.loads(config_path.read_text())
        if saved != config_json:
            diff = {k: (saved.get(k), config_json.get(k)) for k in set(saved) | set(config_json)
                    if saved.get(k) != config_json.get(k)}
            raise ValueError(f"{workdir} holds a run with another config (saved, now): {diff}; "
                             "use a fresh workdir")
    else:
        atomic_write_json(config_path, config_json)

    state = job.restore()
    if state is None:
        state = job.initial_state()
    start_epoch = int(state["epoch"])
    # keep only the records the checkpoint covers (a crash may have written more)
    records = [r for r in read_metrics(workdir) if r["epoch"] <= start_epoch]
    atomic_write_bytes(workdir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    if start_epoch:
        print(f"resuming {workdir} from epoch {start_epoch}", file=sys.stderr)

    progress = _make_progress(config, job.total_epochs * job.steps_per_epoch, start_epoch * job.steps_per_epoch)
    epochs_run = 0
    wall = float(state["wall"])
    try:
        for epoch in range(start_epoch + 1, job.total_epochs + 1):
            if max_epochs_this_run is not None and epochs_run >= max_epochs_this_run:
                return {"interrupted_after_epoch": epoch - 1}
            state, seconds, flagged = job.run_epoch(state, epoch, progress)
            job.check_finite(state, epoch, flagged)
            wall += seconds
            state = {**state, "epoch": epoch, "wall": wall}
            if epoch % config.eval_every_epochs == 0 or epoch == job.total_epochs:
                record = job.evaluate(state, epoch, wall)
                with open(workdir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record, default=_json_default) + "\n")
                if progress is not None:
                    progress.set_postfix(test_acc=f"{record['test_accuracy']:.4f}")
            job.save(state)
            epochs_run += 1
    finally:
        if progress is not None:
            progress.close()

    records = read_metrics(workdir)
    final = records[-1] if records else job.evaluate(state, job.total_epochs, wall)
    summary = {
        "trainer": config.trainer, "dataset": config.dataset, "architecture": "-".join(map(str, job.sizes)),
        "activation": config.activation, "seed": config.seed, "epochs": job.total_epochs,
        "steps": job.total_epochs * job.steps_per_epoch, "wall_time": wall,
        "test_accuracy": final["test_accuracy"], "train_loss": final["train_loss"],
    }
    if job.lifted:
        summary["lifted_objective"] = final.get("lifted_objective")
        if config.warm_start_epochs > 0:
            summary.update(job.warm_start(state["params"]))
    atomic_write_json(workdir / "summary.json", summary)
    return summary
