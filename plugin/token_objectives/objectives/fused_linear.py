"""fused_linear_objective_loss: CE + NTL + PDL on hidden states and this rank's output-weight
shard, without ever holding the [T, V/tp] logits (the statistics come from
`ops.fused_head.FusedLinearStatistics`, the composition is objective_loss's).

Communication: forward, the objective's two all-reduces; backward, one all-reduce of
grad_hidden [T, h] over TP. Under sequence parallelism, plus the all-gather of the hidden
states forward, and an all-gather and a reduce-scatter (instead of the all-reduce) backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from token_objectives.objectives.loss import (
    ObjectiveConfig,
    ObjectiveOutput,
    compose,
    prepare_targets,
)
from token_objectives.ops.fused_head import fused_linear_statistics
from token_objectives.tables.numbers import NumberTable


def fused_linear_objective_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    config: ObjectiveConfig,
    numbers: NumberTable | None,
    pdl_weights: torch.Tensor | None = None,
    tp_group: dist.ProcessGroup | None = None,
    *,
    loss_mask: torch.Tensor | None = None,
    seq_dim: int = -1,
    rows_per_chunk: int | None = None,
    kernel: str | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    real_vocab_size: int | None = None,
    sequence_parallel: bool = False,
) -> ObjectiveOutput:
    """objective_loss(hidden @ weight.T, ...) without materialising the logits.

    hidden: [..., h] (labels' shape plus h; the same on every TP rank, as Megatron's output
        layer sees it without sequence parallelism). weight: this rank's output-layer shard
        [V/tp, h] (with tied embeddings, the word-embedding shard). Other arguments and the
        result: as `objective_loss`. Gradients flow to hidden and weight.
    rows_per_chunk: tokens per chunk; a chunk holds [rows, V/tp] logits and their gradient
        (default: ops.fused_head.HEAD_CHUNK_ELEMENTS of them, 64 MiB in fp32).
    kernel: "auto" | "torch" | "triton" for the per-chunk statistics and logit gradients
        (ops.plan.resolve_kernel).
    vocab_start, vocab_size, real_vocab_size: the layout of weight's rows in the global vocab,
        as in `objective_loss` (uneven shards, e.g. DeepSpeed AutoTP's, need the first two).
    sequence_parallel: hidden is this TP rank's slice of labels' first dimension, as
        megatron-core's sequence parallelism leaves it ([s/tp, b, h] against labels [s, b]);
        the head gathers the slices itself.
    """
    if tp_group is not None and dist.get_world_size(tp_group) == 1:
        tp_group = None
    sequence_parallel = sequence_parallel and tp_group is not None
    expected = labels.shape
    if sequence_parallel:
        tp = dist.get_world_size(tp_group)
        if labels.dim() == 0 or labels.shape[0] % tp:
            raise ValueError(f"sequence parallelism splits labels' first dimension "
                             f"{tuple(labels.shape)} over {tp} ranks, which does not divide it")
        expected = torch.Size((labels.shape[0] // tp, *labels.shape[1:]))
    if hidden.shape[:-1] != expected:
        split = (f" with the first dimension split over the TP ranks ({tuple(expected)})"
                 if sequence_parallel else "")
        raise ValueError(f"hidden {tuple(hidden.shape)} must be labels' shape "
                         f"{tuple(labels.shape)}{split} plus the hidden size")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight {tuple(weight.shape)} must be this rank's output-layer shard "
            f"[V/tp, {hidden.shape[-1]}]"
        )
    width = weight.shape[0]
    prep = prepare_targets(labels, config, numbers, pdl_weights, tp_group, width, hidden.device,
                           loss_mask, vocab_start=vocab_start, vocab_size=vocab_size,
                           real_vocab_size=real_vocab_size)
    stats = fused_linear_statistics(
        hidden.reshape(-1, hidden.shape[-1]), weight, prep.targets.flatten(),
        prep.target_values.flatten(), prep.shard, prep.columns, prep.distance, prep.real_vocab,
        tp_group, rows_per_chunk, kernel, prep.label_check, sequence_parallel,
        prep.flat_target_groups(),
    )
    return compose(stats, prep, labels, config, numbers, pdl_weights, loss_mask, seq_dim)
