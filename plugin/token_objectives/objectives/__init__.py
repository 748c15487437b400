"""ObjectiveConfig and CE + NTL + PDL composed on the ops statistics: `objective_loss` on logits,
`fused_linear_objective_loss` on hidden states. Imports ops and tables."""

from token_objectives.objectives.config import ObjectiveConfig
from token_objectives.objectives.fused_linear import fused_linear_objective_loss
from token_objectives.objectives.loss import ObjectiveOutput, objective_loss

__all__ = ["ObjectiveConfig", "ObjectiveOutput", "fused_linear_objective_loss", "objective_loss"]
