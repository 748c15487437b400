"""The PDL weight table an ObjectiveConfig asks for, from corpus token counts."""

from __future__ import annotations

import numpy as np
import torch

from token_objectives.objectives.config import ObjectiveConfig
from token_objectives.tables.frequencies import FrequencyTable, pdl_weights


def pdl_weights_for(
    config: ObjectiveConfig, counts: np.ndarray | torch.Tensor | FrequencyTable
) -> torch.Tensor:
    """The PDL table `config` asks for: pdl_weights with its pdl_alpha, pdl_eps, pdl_unseen and
    pdl_normalize_table. Every loop builds its weights here. Returns float32 [V]."""
    if config.pdl_alpha <= 0:
        raise ValueError("pdl_alpha is 0, so there is no PDL table to build; set pdl_alpha > 0")
    unseen = None if config.pdl_unseen == "rarest" else float(config.pdl_unseen)
    return pdl_weights(counts, config.pdl_alpha, eps=config.pdl_eps, unseen_weight=unseen,
                       normalize=config.pdl_normalize_table)
