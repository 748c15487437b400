"""Vocab-parallel token-level training objectives: CE + Number Token Loss + Power-Law Decay loss.

Subpackages by role (each one's docstring says what it may import):
    ops/           the math and kernels on one rank's shard (torch only)
    tables/        tokenizers, number-token tables, token frequencies
    objectives/    ObjectiveConfig and the losses composed on ops
    integrations/  megatron/, deepspeed/, hf/: thin adapters to the frameworks
    training/      what both loops share, and the Megatron and DeepSpeed loops
    scheduled_sampling/, correction/, ensemble/   the papers' methods, on the core
    quickstart/, bench/   the quickstart's data and `token-objectives bench`
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

from token_objectives.objectives import (
    ObjectiveConfig,
    ObjectiveOutput,
    fused_linear_objective_loss,
    objective_loss,
)
from token_objectives.tables.numbers import NumberTable
from token_objectives.version import __version__

__all__ = [
    "NumberTable",
    "ObjectiveConfig",
    "ObjectiveOutput",
    "__version__",
    "fused_linear_objective_loss",
    "objective_loss",
]

# Public import paths that now live in a subpackage. Resolved on first import, so that
# `import token_objectives` never pulls in megatron-core, DeepSpeed or transformers.
_MOVED = {
    "token_objectives.megatron": "token_objectives.integrations.megatron.hook",
    "token_objectives.deepspeed": "token_objectives.integrations.deepspeed.section",
    "token_objectives.hf": "token_objectives.integrations.hf",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes `token_objectives.megatron` (and the rest of _MOVED) the module it moved to."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return importlib.import_module(_MOVED[spec.name])

    def exec_module(self, module) -> None:
        """The target module ran when create_module imported it."""


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())
