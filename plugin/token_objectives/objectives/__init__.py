"""ObjectiveConfig and `Objective`, CE + NTL + PDL composed on the ops statistics: called on
logits, or `.fused` on hidden states; `objective_loss` / `fused_linear_objective_loss` are their
functional forms. Imports ops and tables."""

from token_objectives.objectives.config import ObjectiveConfig
from token_objectives.objectives.loss import ObjectiveOutput
from token_objectives.objectives.objective import (
    Objective,
    fused_linear_objective_loss,
    objective_loss,
)

__all__ = ["Objective", "ObjectiveConfig", "ObjectiveOutput", "fused_linear_objective_loss",
           "objective_loss"]
