"""DeepSpeed AutoTP's vocab-parallel lm_head, as the objectives see it: the TP group, this
rank's shard of the vocab, and `AutoTPObjectives`, the loss callable that tells full logits
from a shard. Shared by the DeepSpeed loop's ds_config section and the Hugging Face Trainer
adapter (Trainer's DeepSpeed integration runs AutoTP through `deepspeed.tp_model_init`).
Imports the core only; DeepSpeed lazily.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from token_objectives.integrations.causal_lm import mean_loss, shift_labels
from token_objectives.objectives.loss import ObjectiveOutput
from token_objectives.objectives.objective import Objective, ObjectiveDoor


def tensor_parallel_group() -> dist.ProcessGroup | None:
    """DeepSpeed's AutoTP group when one is set up with more than one rank, else None."""
    try:
        from deepspeed.utils import groups

        group = groups.get_tensor_model_parallel_group()
    except (AssertionError, AttributeError, ImportError):
        return None
    if group is None or dist.get_world_size(group) == 1:
        return None
    return group


def vocab_parallel_head_shard(module: torch.nn.Module) -> tuple[int, int] | None:
    """(vocab_start, width) of this rank's shard of AutoTP's vocab-parallel lm_head inside
    `module`, or None when the model has none. AutoTP shards unevenly when TP does not divide
    the vocab (V = 9 at TP = 2: 5 and 4 rows), so the layout is read, never inferred."""
    for child in module.modules():
        if getattr(child, "is_vocab_parallel_lm_head", False):
            start, end = int(child.vocab_start_index), int(child.vocab_end_index)
            return start, end - start
    return None


class AutoTPObjectives(ObjectiveDoor):
    """`objectives(logits, labels, loss_mask=None)` -> ObjectiveOutput, per token: an
    `Objective` under DeepSpeed AutoTP's layout.

    logits: [..., V] (full vocab) or [..., w] (this rank's AutoTP vocab-parallel lm_head shard,
    columns [vocab_start, vocab_start + w)); which one is read from the width against the
    objective's vocab size. labels: [...] global ids. `use_head_shard(start, width)` states the
    shard (the trainer reads it from the model with `vocab_parallel_head_shard`); without it a
    shard is taken to be the even one, and the objective's layout check refuses uneven shards.

    A causal LM's loss, for a loop of one's own: `output = objectives.causal_lm(logits,
    labels)` on the unshifted labels, then `loss = objectives.mean(output)`.
    """

    def __init__(self, objective: Objective) -> None:
        self.objective = objective
        self.head_shard: tuple[int, int] | None = None

    def use_head_shard(self, shard: tuple[int, int] | None) -> None:
        """(vocab_start, width) of this rank's lm_head shard, or None for the even layout."""
        self.head_shard = shard

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor,
                 loss_mask: torch.Tensor | None = None, **options) -> ObjectiveOutput:
        """options: Objective's rows_per_chunk and kernel."""
        group, vocab_start = self._layout(logits.shape[-1])
        return self.objective(logits, labels, tp_group=group, loss_mask=loss_mask,
                              vocab_start=vocab_start, **options)

    def causal_lm(self, logits: torch.Tensor, labels: torch.Tensor,
                  **options) -> ObjectiveOutput:
        """Per-token objectives [b, s] of a causal LM's logits [b, s, V] (or this rank's AutoTP
        shard [b, s, w]) against its unshifted labels [b, s] (the input ids, ignore_index where
        a token is no target): position t is scored against labels[:, t + 1], the last position
        against nothing (shift_labels, as HF's causal-LM loss). No collective beyond the
        objective's own (two all-reduces over AutoTP's group on a shard).
        options: Objective's rows_per_chunk and kernel."""
        if labels.dim() < 2 or logits.shape[:-1] != labels.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree: a "
                f"causal LM's loss takes its [b, s, V] logits and the unshifted [b, s] labels"
            )
        return self(logits, shift_labels(labels, self.objective.config.ignore_index),
                    **options)

    def mean(self, output: ObjectiveOutput,
             denominator: torch.Tensor | float | None = None) -> torch.Tensor:
        """The scalar to backpropagate for `output`: its loss sum over its counted tokens (over
        the sum of their PDL weights with pdl_normalization="weighted_mean"), or over
        `denominator` when given (causal_lm.mean_loss). No collective."""
        return mean_loss(output, self.objective.config, denominator)

    def fused(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
              loss_mask: torch.Tensor | None = None, **options) -> ObjectiveOutput:
        """The same from hidden states [..., h] and the lm_head weight [V or w, h], with no
        logits held (Objective.fused); gradients go to hidden and weight."""
        group, vocab_start = self._layout(weight.shape[0])
        return self.objective.fused(hidden, weight, labels, tp_group=group,
                                    loss_mask=loss_mask, vocab_start=vocab_start, **options)

    def _group(self, width: int):
        """The AutoTP group when `width` vocab columns are a shard of the model's vocab."""
        return self._layout(width)[0]

    def _layout(self, width: int) -> tuple[dist.ProcessGroup | None, int | None]:
        """(group, vocab_start) for logits `width` columns wide."""
        vocab = self.objective.vocab_size
        if vocab is not None and width == vocab:
            return None, None
        group = tensor_parallel_group()
        if group is None and vocab is not None:
            raise ValueError(
                f"logits have {width} vocab columns but the tables have {vocab} and no AutoTP "
                f"group is set up; build the NumberTable with vocab_size={width}"
            )
        if self.head_shard is None:
            return group, None
        start, shard_width = self.head_shard
        if shard_width != width:
            raise ValueError(
                f"logits have {width} vocab columns but this rank's lm_head shard holds "
                f"{shard_width} (ids [{start}, {start + shard_width})); pass the model's own "
                f"logits or its lm_head weight"
            )
        return group, start
