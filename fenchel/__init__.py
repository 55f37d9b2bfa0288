"""fenchel: Fenchel lifted networks (Gu, Askari, El Ghaoui, AISTATS 2020) in JAX.

Public API:
  penalty(activation, u, v, **params)   elementwise B_φ(u, v) = F(u) + F*(v) − u·v
  get_penalty(activation, lifting)      the Penalty object (forward map, prox, bounds)
  lifted_objective / objective_terms / network_loss / forward / init_mlp
  FISTA, Composite, Result              the block solver
  LiftedConfig, LiftedTrainer           block-coordinate descent (full batch, minibatch)
  SolverConfig                          stopping rule of each block solve
"""

from fenchel.bcd import SCHEDULES, LiftedConfig, LiftedTrainer
from fenchel.blocks import SolverConfig
from fenchel.lifted import (
    accuracy,
    forward,
    init_mlp,
    lifted_objective,
    network_loss,
    objective_terms,
    regulariser,
)
from fenchel.penalties import ACTIVATIONS, Penalty, get_penalty, penalty
from fenchel.solvers import FISTA, Composite, Result, SolveInfo

__all__ = [
    "ACTIVATIONS", "SCHEDULES", "Composite", "FISTA", "LiftedConfig", "LiftedTrainer", "Penalty", "Result",
    "SolveInfo", "SolverConfig", "accuracy", "forward", "get_penalty", "init_mlp", "lifted_objective",
    "network_loss", "objective_terms", "penalty", "regulariser",
]
