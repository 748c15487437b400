"""Vocab-parallel token-level training objectives: CE + Number Token Loss + Power-Law Decay loss."""

from token_objectives.fused_linear import fused_linear_objective_loss
from token_objectives.objectives import ObjectiveConfig, ObjectiveOutput, objective_loss
from token_objectives.vocab import NumberTable

__all__ = [
    "NumberTable",
    "ObjectiveConfig",
    "ObjectiveOutput",
    "fused_linear_objective_loss",
    "objective_loss",
]
__version__ = "0.1.0"
