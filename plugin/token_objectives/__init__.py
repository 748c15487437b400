"""Vocab-parallel token-level training objectives: CE + Number Token Loss + Power-Law Decay loss.

Subpackages by role (each one's docstring says what it may import):
    ops/           the math and kernels on one rank's shard (torch only)
    tables/        tokenizers, number-token tables, token frequencies
    objectives/    ObjectiveConfig and the losses composed on ops
    integrations/  megatron/, deepspeed/, hf/: thin adapters to the frameworks
    training/      what both loops share, and the Megatron and DeepSpeed loops
    scheduled_sampling/, correction/, ensemble/   the papers' methods, on the core
    evaluation/    `token-objectives evaluate`, which the Megatron loop calls too
    generation/    greedy answers of a local HF model, for evaluation/ and correction/
    quickstart/, bench/   the quickstart's data and `token-objectives bench`
"""

from __future__ import annotations

from token_objectives.objectives import (
    Objective,
    ObjectiveConfig,
    ObjectiveOutput,
    fused_linear_objective_loss,
    objective_loss,
)
from token_objectives.tables.numbers import NumberTable
from token_objectives.version import __version__

__all__ = [
    "NumberTable",
    "Objective",
    "ObjectiveConfig",
    "ObjectiveOutput",
    "__version__",
    "fused_linear_objective_loss",
    "objective_loss",
]
