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

import importlib

from token_objectives.version import __version__

# The public names, imported on first use: `import token_objectives.<module>` (the CLI, a
# checkpoint writer's spawned helper process) loads neither torch nor the objectives unless it
# needs them.
_PUBLIC = {
    "NumberTable": "token_objectives.tables.numbers",
    "Objective": "token_objectives.objectives.objective",
    "ObjectiveConfig": "token_objectives.objectives.config",
    "ObjectiveOutput": "token_objectives.objectives.loss",
    "fused_linear_objective_loss": "token_objectives.objectives.objective",
    "objective_loss": "token_objectives.objectives.objective",
}

__all__ = [*sorted(_PUBLIC), "__version__"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'token_objectives' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
