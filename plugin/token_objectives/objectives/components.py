"""The logged components of the objective: totals summed over tokens, micro-batches and ranks
-> per-component means. Every loop that logs the components reads them here."""

from __future__ import annotations

import torch

from token_objectives.objectives.config import ObjectiveConfig

COMPONENT_NAMES = ("lm loss", "ce", "ntl", "number tokens", "pdl weight")


def component_means(totals: torch.Tensor, config: ObjectiveConfig | None = None
                    ) -> dict[str, float]:
    """ObjectiveOutput.totals() [6], summed over everything the log covers -> the means.

    "lm loss" is what is trained: the loss sum over the counted tokens, or over the sum of their
    PDL weights with config.pdl_normalization="weighted_mean"; "ce" per counted token; "ntl" per
    number position; "number tokens" and "pdl weight" per counted token. Every entry is a ratio
    of two sums, so a copy of the batch on more ranks (tensor parallelism) leaves it unchanged.
    """
    loss, tokens, ce, ntl, numbers, weight = totals.detach().to(torch.float64).tolist()
    weighted = config is not None and config.pdl_normalization == "weighted_mean"
    return {
        "lm loss": loss / (weight if weighted and weight > 0 else max(tokens, 1)),
        "ce": ce / max(tokens, 1),
        "ntl": ntl / max(numbers, 1),
        "number tokens": numbers / max(tokens, 1),
        "pdl weight": weight / max(tokens, 1),
    }
