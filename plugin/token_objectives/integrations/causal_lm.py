"""A causal LM's loss as the doors that take its logits and unshifted labels see it: the label
shift and the mean over the counted tokens. One place for both, so the Hugging Face Trainer's
`ObjectiveLoss` and a user's own DeepSpeed loop (`AutoTPObjectives.causal_lm` / `.mean`) train
the same number.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from token_objectives.objectives.config import ObjectiveConfig
from token_objectives.objectives.loss import ObjectiveOutput


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """[b, s] -> [b, s]: the target of position t is labels[:, t + 1]; the last position gets
    ignore_index. As HF's ForCausalLMLoss: the labels move, so the [b, s, V] logits are used
    whole (slicing them would copy them for the loss)."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def mean_loss(output: ObjectiveOutput, config: ObjectiveConfig,
              denominator: torch.Tensor | float | None = None) -> torch.Tensor:
    """The scalar to backpropagate: sum(output.loss) / N. No collective.

    N: `denominator` when given (a count over more than these tokens, such as Trainer's
    num_items_in_batch); else output's counted tokens (at least 1), or with
    config.pdl_normalization="weighted_mean" the sum of their PDL weights when positive: the
    "lm loss" that objectives.components logs.
    """
    total = output.loss.sum()
    if denominator is not None:
        return total / torch.as_tensor(denominator, device=total.device).to(total.dtype)
    tokens = output.counted.sum().clamp(min=1).to(total.dtype)
    if config.pdl_normalization == "weighted_mean":
        weights = output.weight.sum().to(total.dtype)
        tokens = torch.where(weights > 0, weights, tokens)
    return total / tokens
