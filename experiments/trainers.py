"""The trainer registry: every training method the launcher, sweeps, tables and plots know.

A registered trainer is a `TrainerSpec`: its name (`--config.trainer=NAME`),
its title in tables, the config fields it owns (with their one default), a
`check` that validates those fields before any compute, a `build` that makes
the `fenchel.Trainer` for a network, and optionally extra summary columns and
a `finish` step run after training (the lifted trainers' warm start).

Adding a trainer: a module with a `fenchel.Trainer` subclass, then

    register(TrainerSpec(name="mine", title="Mine", fields={"mine_lr": 0.1},
                         check=..., build=lambda config, layers, penalty: MyTrainer(...)))

Config files pick up the new fields through `configs/default.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import ml_collections

from fenchel import GradientTrainer, LiftedConfig, LiftedTrainer, make_optimizer
from fenchel.heads import MERGES, Head
from fenchel.layers import parse_layers
from fenchel.proxprop import OPTIMIZERS as _PP_OPTIMIZERS
from fenchel.proxprop import SOLVERS as _PP_SOLVERS
from fenchel.proxprop import ProxPropTrainer


@dataclasses.dataclass(frozen=True)
class TrainerSpec:
    """name, title, owned config fields (key → default), check(config), build(config, layers, penalty),
    extra (title, summary key) table columns, finish(job, state) → summary entries."""

    name: str
    title: str
    fields: Mapping[str, Any]
    check: Callable[[ml_collections.ConfigDict], None]
    build: Callable[..., Any]
    extra_columns: tuple = ()
    finish: Optional[Callable] = None

    @property
    def columns(self) -> tuple:
        """(column title, summary key) pairs of this trainer in tables."""
        return ((self.title, "test_accuracy"), *self.extra_columns)


TRAINERS: dict[str, TrainerSpec] = {}


def register(spec: TrainerSpec) -> TrainerSpec:
    """Add `spec` to the registry; a field shared with another trainer must have the same default."""
    for other in TRAINERS.values():
        if other.name == spec.name:
            continue
        for key in set(other.fields) & set(spec.fields):
            if other.fields[key] != spec.fields[key]:
                raise ValueError(f"trainer {spec.name!r}: field {key!r} has default {spec.fields[key]!r}, but "
                                 f"trainer {other.name!r} gives it {other.fields[key]!r}")
    TRAINERS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    TRAINERS.pop(name, None)


def all_fields() -> dict:
    """Every registered trainer's config fields with their defaults."""
    out = {}
    for spec in TRAINERS.values():
        out.update(spec.fields)
    return out


def owner_of(key: str) -> list[str]:
    """Names of the trainers that own config field `key` (empty for base fields)."""
    return [name for name, spec in TRAINERS.items() if key in spec.fields]


# ---------------------------------------------------------------- multi-branch heads (GuideBP), every built-in trainer
HEAD_FIELDS = {
    "branches": 1,  # K parallel output branches on the shared trunk (1: the plain head)
    "merge": "sum",  # how training merges the branches' logits: sum | mean | guide (GuideBP); evaluation: mean
}


def _check_head(c):
    k = c.branches
    if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
        raise ValueError(f"bad config: branches={k!r} must be an integer ≥ 1")
    if c.merge not in MERGES:
        raise ValueError(f"bad config: merge={c.merge!r}, expected one of {MERGES}")


def head_of(c) -> Head | None:
    """The trainer's multi-branch head; None for one branch (every merge of one branch is the plain head)."""
    return Head(c.branches, c.merge, seed=c.seed) if c.branches > 1 else None


def _with_head(check):
    def both(c):
        _check_head(c)
        check(c)
    return both


# ---------------------------------------------------------------- lifted trainers (fenchel, lnn)
_ENGINE = {f.name: f.default for f in dataclasses.fields(LiftedConfig)}
# engine field → (config key of one value for all layers, config key of one value per layer)
_PER_LAYER = {"lambdas": ("lambda_", "lambda_per_layer"), "rho": ("rho", "rho_per_layer"),
              "rho_prox": ("rho_prox", "rho_prox_per_layer")}
_SAME_NAME = ("lbd_coef", "alternations", "schedule", "x_mode", "w_mode", "x_tol", "x_max_steps", "w_tol",
              "w_max_steps", "lambda_update", "lambda_step", "lambda_growth", "lambda_max", "lambda_granularity",
              "outer_momentum", "stack_layers", "bound_max_sweeps", "x_chunk_bytes", "w_retry")

LIFTED_FIELDS = {
    **{key: _ENGINE[field] for field, (key, _) in _PER_LAYER.items()},
    **{key: () for _, key in _PER_LAYER.values()},
    **{name: _ENGINE[name] for name in _SAME_NAME},
    "objective_batch": 1000,  # training examples on which the lifted objective is logged
    "warm_start_epochs": 1,  # lifted weights → flax model → this many epochs of an optax optimiser (0: off)
    "budget_epochs": 0,  # > 0: a fixed total budget; the warm start runs budget_epochs − total_epochs epochs
    "warm_start_optimizer": "adam",
    "warm_start_lr": 1e-4,
}


def lifted_config(c: ml_collections.ConfigDict) -> LiftedConfig:
    """The engine's LiftedConfig for a launcher config; errors name the config key."""
    used = {}
    kwargs = {}
    for field, (key, per_layer_key) in _PER_LAYER.items():
        per_layer = tuple(c[per_layer_key])
        used[field] = per_layer_key if per_layer else key
        kwargs[field] = per_layer if per_layer else c[key]
    kwargs.update({name: c[name] for name in _SAME_NAME})
    try:
        return LiftedConfig(activation=c.activation, negative_slope=c.negative_slope,
                            lifting="lnn" if c.trainer == "lnn" else "fenchel", loss=c.loss, **kwargs)
    except ValueError as err:
        msg = str(err)
        field = msg.split("=", 1)[0]
        if field in used:
            msg = used[field] + msg[len(field):]
        raise ValueError(f"bad config: {msg}") from None


def _check_lifted(c):
    lifted_config(c)
    n_hidden = len(parse_layers(c.layers))
    for key, n in (("lambda_per_layer", n_hidden), ("rho_per_layer", n_hidden + 1),
                   ("rho_prox_per_layer", n_hidden + 1)):
        if len(c[key]) not in (0, n):
            raise ValueError(f"bad config: {key} needs {n} values (one per {'penalty' if n == n_hidden else 'layer'}"
                             f"), got {len(c[key])}")
    if c.trainer == "lnn" and c.activation != "relu":
        raise ValueError("bad config: trainer='lnn' needs activation='relu'")
    if c.objective_batch < 1:
        raise ValueError(f"bad config: objective_batch={c.objective_batch} must be ≥ 1")
    if c.warm_start_epochs < 0:
        raise ValueError(f"bad config: warm_start_epochs={c.warm_start_epochs} must be ≥ 0")
    if c.budget_epochs and not (c.total_epochs and c.budget_epochs >= c.total_epochs):
        raise ValueError(f"bad config: budget_epochs={c.budget_epochs} needs total_epochs (the lifted epochs) set and "
                         f"≤ budget_epochs; got total_epochs={c.total_epochs}")
    if c.warm_start_optimizer not in GRADIENT_DEFAULT_LR:
        raise ValueError(f"bad config: warm_start_optimizer={c.warm_start_optimizer!r}, expected one of "
                         f"{tuple(GRADIENT_DEFAULT_LR)}")
    _optimizer(c.warm_start_optimizer, c.warm_start_lr, c.momentum, "warm_start_lr")


def _build_lifted(c, layers, penalty):
    del penalty  # the lifted trainer builds its own (Fenchel or LNN) from the config
    return LiftedTrainer(lifted_config(c), layers, head_of(c))


def warm_start_epochs(c) -> int:
    """Epochs of the warm start: budget_epochs − total_epochs under a fixed budget, else warm_start_epochs."""
    return c.budget_epochs - c.total_epochs if c.budget_epochs else c.warm_start_epochs


def warm_start(job, state) -> dict:
    """Lifted weights → the flax network → warm_start_epochs of an optax optimiser (its own batch stream)."""
    c = job.config
    epochs = warm_start_epochs(c)
    if epochs <= 0:
        return {}
    trainer = GradientTrainer(job.layers, job.penalty, _optimizer(c.warm_start_optimizer, c.warm_start_lr,
                                                                  c.momentum, "warm_start_lr"), c.loss)
    accs, wall = [], 0.0
    ws_state = trainer.init(job.trainer.params(state))
    for epoch in range(1, epochs + 1):
        ws_state, result = job.fit_epoch(trainer, ws_state, epoch, fine_tune=True)
        wall += result.seconds
        accs.append(job.test_accuracy(trainer.params(ws_state)))
    return {"warm_start_test_accuracy": accs[-1], "warm_start_curve": accs, "warm_start_wall_time": wall}


# ---------------------------------------------------------------- gradient trainers (sgd, adam)
GRADIENT_DEFAULT_LR = {"adam": 1e-3, "sgd": 0.05}
GRADIENT_FIELDS = {
    "learning_rate": 0.0,  # 0: the trainer's default (adam 1e-3, sgd 0.05)
    "momentum": 0.9,  # sgd's heavy-ball momentum
}


def _optimizer(name, learning_rate, momentum, lr_key="learning_rate"):
    try:
        return make_optimizer(name, learning_rate, momentum)
    except ValueError as err:
        raise ValueError(f"bad config: {str(err).replace('learning_rate', lr_key)}") from None


def _gradient_optimizer(c):
    if c.learning_rate < 0:
        raise ValueError(f"bad config: learning_rate={c.learning_rate} must be > 0 (or 0 for the default)")
    return _optimizer(c.trainer, c.learning_rate or GRADIENT_DEFAULT_LR[c.trainer], c.momentum)


def _build_gradient(c, layers, penalty):
    return GradientTrainer(layers, penalty, _gradient_optimizer(c), c.loss, head_of(c))


# ---------------------------------------------------------------- the built-in registry
_GRADIENT_OWN = {**GRADIENT_FIELDS, **HEAD_FIELDS}
register(TrainerSpec("adam", "Adam", _GRADIENT_OWN, _with_head(_gradient_optimizer), _build_gradient))
register(TrainerSpec("sgd", "SGD", _GRADIENT_OWN, _with_head(_gradient_optimizer), _build_gradient))
_LIFTED_OWN = {**LIFTED_FIELDS, "momentum": GRADIENT_FIELDS["momentum"], **HEAD_FIELDS}  # momentum: an sgd warm start's
register(TrainerSpec("lnn", "LNN", _LIFTED_OWN, _with_head(_check_lifted), _build_lifted, finish=warm_start))
register(TrainerSpec("fenchel", "Fenchel", _LIFTED_OWN, _with_head(_check_lifted), _build_lifted,
                     extra_columns=(("Fenchel + warm start", "warm_start_test_accuracy"),), finish=warm_start))


# ---------------------------------------------------------------- proxprop (Frerix et al., ICLR 2018)
PROXPROP_FIELDS = {
    "proxprop_tau": 1.0,  # τ: explicit step on the pre-activations (cancels under the outer optimiser)
    "proxprop_tau_theta": 0.05,  # τ_θ: proximal step of each hidden layer's Θ = [W; b]
    "proxprop_solver": "exact",  # exact (Cholesky, n_in+1 or N×N, the smaller) | cg
    "proxprop_cg_steps": 10,  # CG iterations per step (solver=cg), warm-started at the current weights
    "proxprop_optimizer": "sgd",  # sgd (Nesterov momentum 0.95) | adam, fed g = −(Θ_new − Θ_old)/τ
    "proxprop_lr": 0.5,  # the outer optimiser's learning rate
}


def _check_proxprop(c):
    for key in ("proxprop_tau", "proxprop_tau_theta", "proxprop_lr"):
        if not c[key] > 0:
            raise ValueError(f"bad config: {key}={c[key]} must be > 0")
    if c.proxprop_solver not in _PP_SOLVERS:
        raise ValueError(f"bad config: proxprop_solver={c.proxprop_solver!r}, expected one of {_PP_SOLVERS}")
    steps = c.proxprop_cg_steps
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise ValueError(f"bad config: proxprop_cg_steps={steps!r} must be an integer ≥ 1")
    if c.proxprop_optimizer not in _PP_OPTIMIZERS:
        raise ValueError(f"bad config: proxprop_optimizer={c.proxprop_optimizer!r}, expected one of "
                         f"{_PP_OPTIMIZERS}")


def _build_proxprop(c, layers, penalty):
    return ProxPropTrainer(layers, penalty, tau=c.proxprop_tau, tau_theta=c.proxprop_tau_theta,
                           solver=c.proxprop_solver, cg_steps=c.proxprop_cg_steps, optimizer=c.proxprop_optimizer,
                           learning_rate=c.proxprop_lr, loss=c.loss, head=head_of(c))


register(TrainerSpec("proxprop", "ProxProp", {**PROXPROP_FIELDS, **HEAD_FIELDS}, _with_head(_check_proxprop),
                     _build_proxprop))
