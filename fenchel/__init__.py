"""fenchel: Fenchel lifted networks (Gu, Askari, El Ghaoui, AISTATS 2020) in JAX.

Public API:
  penalty(activation, u, v, **params)   elementwise B_φ(u, v) = F(u) + F*(v) − u·v
  get_penalty(activation, lifting)      the Penalty object (forward map, prox, bounds)
  layers.Dense, layers.mlp, init_params per-layer specs and the one initialiser
  lifted_objective / objective_terms / network_loss / forward
  FISTA, Composite, Result              the block solver
  LiftedConfig, LiftedTrainer           block-coordinate descent (full batch, minibatch)
  Trainer, GradientTrainer, StepInfo    the trainer interface; backprop with an optax optimiser
  SolverConfig                          stopping rule of each block solve
  heads.Head, heads.MERGES              K output branches merged by sum, mean or GuideBP's guide

Importing fenchel sets OPENBLAS_NUM_THREADS=1 and an XLA:CPU loop-copy option, each unless the user set it
(`fenchel._cpu`).
"""

from fenchel import _cpu, heads, layers  # noqa: F401  (_cpu first: before any LAPACK call or compile)
from fenchel.bcd import SCHEDULES, LiftedConfig, LiftedTrainer
from fenchel.blocks import SolverConfig
from fenchel.heads import MERGES, Head
from fenchel.layers import Dense, init_params, mlp
from fenchel.lifted import forward, lifted_objective, network_loss, objective_terms, regulariser
from fenchel.penalties import ACTIVATIONS, Penalty, get_penalty, penalty
from fenchel.solvers import FISTA, Composite, Result, SolveInfo
from fenchel.trainer import GradientTrainer, StepInfo, Trainer, make_optimizer

__all__ = [
    "ACTIVATIONS", "MERGES", "SCHEDULES", "Composite", "Dense", "FISTA", "GradientTrainer", "Head", "LiftedConfig",
    "LiftedTrainer", "Penalty", "Result", "SolveInfo", "SolverConfig", "StepInfo", "Trainer", "forward",
    "get_penalty", "heads", "init_params", "layers", "lifted_objective", "make_optimizer", "mlp", "network_loss",
    "objective_terms", "penalty", "regulariser",
]
