"""The LM head and the objectives fused: hidden states and this rank's output-weight shard in,
per-token objectives out, without ever holding the [T, V/tp] logits.

Per chunk of tokens the logits chunk is computed (hidden[c] @ weight.T), its statistics taken,
and it is dropped; backward recomputes each chunk's logits, turns them into the chunk's logit
gradient and folds that into the gradients of hidden and weight. This is the vocab-parallel
version of a fused linear cross-entropy, with NTL and PDL included; the statistics and their
gradients are the same stage functions as `objective_loss` uses.

Communication: forward, the objective's two all-reduces (all chunks' statistics together);
backward, one all-reduce of grad_hidden [T, h] over TP, the one the LM head's column-parallel
linear makes anyway (each rank's vocab shard contributes part of it).
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
from token_objectives.ops.statistics import (
    Plan,
    chunk_gradient,
    chunk_rows,
    chunked_partials,
    finish_statistics,
    gradient_workspace,
    resolve_kernel,
    row_chunks,
)
from token_objectives.tables.numbers import NumberTable

# Logits per chunk of the fused head (64 MiB in fp32). Each chunk re-reads the weight shard
# [V/tp, h] in forward and again for both gradients in backward, so chunks of a few rows would
# make the matmuls memory-bound; this many keeps them compute-bound (256 rows at V/tp = 64k)
# while the chunk stays a small fraction of the [T, V/tp] logits it replaces.
HEAD_CHUNK_ELEMENTS = 1 << 24


class FusedLinearStatistics(torch.autograd.Function):
    """hidden [T, h], weight [V/tp, h] -> statistics [T, 6], as VocabParallelStatistics on
    hidden @ weight.T, holding at most one [rows, V/tp] chunk of logits at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, target_values, plan: Plan, tp_group):
        maxima, sums = chunked_partials(
            lambda chunk: hidden[chunk] @ weight.t(), hidden, targets, target_values, plan
        )
        stats, log_q = finish_statistics(maxima, sums, plan, tp_group)
        ctx.save_for_backward(hidden, weight, targets, target_values, stats, log_q)
        ctx.plan, ctx.tp_group = plan, tp_group
        return stats

    @staticmethod
    def backward(ctx, grad_stats):
        hidden, weight, targets, target_values, stats, log_q = ctx.saved_tensors
        plan = ctx.plan
        real = plan.shard.real_width
        grads = grad_stats.to(stats.dtype)
        workspace = gradient_workspace(plan, hidden.shape[0], hidden)
        grad_hidden = torch.zeros(hidden.shape, dtype=stats.dtype, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=stats.dtype, device=weight.device)
        real_weight = weight[:real]
        for chunk in row_chunks(hidden.shape[0], plan.rows):
            logits = hidden[chunk] @ weight.t()
            # The matmuls run in the model's dtype.
            grad_logits = chunk_gradient(logits, stats[chunk], log_q[chunk], grads[chunk],
                                         targets[chunk], target_values[chunk], plan,
                                         hidden.dtype, workspace)
            grad_hidden[chunk] = (grad_logits @ real_weight).to(stats.dtype)
            if grad_logits.dtype == grad_weight.dtype:  # no [V/tp, h] temporary per chunk
                grad_weight[:real].addmm_(grad_logits.t(), hidden[chunk])
            else:
                grad_weight[:real] += (grad_logits.t() @ hidden[chunk]).to(stats.dtype)
        if ctx.tp_group is not None:
            dist.all_reduce(grad_hidden, group=ctx.tp_group)
        return (grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None, None, None,
                None)


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
) -> ObjectiveOutput:
    """objective_loss(hidden @ weight.T, ...) without materialising the logits.

    hidden: [..., h] (labels' shape plus h; the same on every TP rank, as Megatron's output
        layer sees it without sequence parallelism). weight: this rank's output-layer shard
        [V/tp, h] (with tied embeddings, the word-embedding shard). Other arguments and the
        result: as `objective_loss`. Gradients flow to hidden and weight.
    rows_per_chunk: tokens per chunk; a chunk holds [rows, V/tp] logits and their gradient
        (default: HEAD_CHUNK_ELEMENTS of them, 64 MiB in fp32).
    kernel: "auto" | "torch" | "triton" for the per-chunk statistics and logit gradients
        (functional.resolve_kernel).
    vocab_start, vocab_size, real_vocab_size: the layout of weight's rows in the global vocab,
        as in `objective_loss` (uneven shards, e.g. DeepSpeed AutoTP's, need the first two).
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} must be labels' shape {tuple(labels.shape)} plus the "
            f"hidden size"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight {tuple(weight.shape)} must be this rank's output-layer shard "
            f"[V/tp, {hidden.shape[-1]}]"
        )
    if tp_group is not None and dist.get_world_size(tp_group) == 1:
        tp_group = None
    width = weight.shape[0]
    prep = prepare_targets(labels, config, numbers, pdl_weights, tp_group, width, hidden.device,
                           loss_mask, vocab_start=vocab_start, vocab_size=vocab_size,
                           real_vocab_size=real_vocab_size)
    plan = Plan(prep.shard, prep.columns, prep.distance, prep.real_vocab,
                chunk_rows(width, rows_per_chunk, HEAD_CHUNK_ELEMENTS),
                resolve_kernel(kernel, hidden.device, hidden.dtype), prep.label_check)
    stats = FusedLinearStatistics.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, prep.targets.flatten(),
        prep.target_values.flatten(), plan, tp_group,
    )
    return compose(stats, prep, labels, config, numbers, pdl_weights, loss_mask, seq_dim)
