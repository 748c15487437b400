"""The LM head and the statistics fused: hidden states and this rank's output-weight shard in,
the statistics [T, 6] ([T, 7] with the Gaussian number target) of hidden @ weight.T out,
without ever holding the [T, V/tp] logits.

Per chunk of tokens the logits chunk is computed (hidden[c] @ weight.T), its partials taken, and
it is dropped; backward recomputes each chunk's logits, turns them into the chunk's logit
gradient and folds that into the gradients of hidden and weight. This is the vocab-parallel
version of a fused linear cross-entropy, with NTL and PDL included; forward and backward are the
same stages and the same chunk walk (`statistics.chunked_partials`, `finish_statistics`,
`chunked_gradient`) as `VocabParallelStatistics` on stored logits.

Communication: forward, the objective's two all-reduces (all chunks' statistics together);
backward, one all-reduce of grad_hidden [T, h] over TP, the one the LM head's column-parallel
linear makes anyway (each rank's vocab shard contributes part of it).

Under sequence parallelism the hidden states come as this rank's slice of the sequence
[T/tp, h]: the head all-gathers them along the sequence in forward (and again in backward
instead of saving the gathered copy) and reduce-scatters grad_hidden in place of the
all-reduce, as megatron-core's column-parallel linear does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from token_objectives.ops.plan import (
    Columns,
    Distance,
    LabelCheck,
    Plan,
    RowChunk,
    VocabShard,
    chunk_rows,
    resolve_kernel,
)
from token_objectives.ops.statistics import chunked_gradient, chunked_partials, finish_statistics

# Logits per chunk of the fused head (64 MiB in fp32). Each chunk re-reads the weight shard
# [V/tp, h] in forward and again for both gradients in backward, so chunks of a few rows would
# make the matmuls memory-bound; this many keeps them compute-bound (256 rows at V/tp = 64k)
# while the chunk stays a small fraction of the [T, V/tp] logits it replaces.
HEAD_CHUNK_ELEMENTS = 1 << 24


def gather_sequence(hidden: torch.Tensor, tp_group: dist.ProcessGroup) -> torch.Tensor:
    """[T/tp, h] on each rank -> [T, h], the ranks' slices in rank order (all-gather)."""
    full = hidden.new_empty((hidden.shape[0] * dist.get_world_size(tp_group), hidden.shape[1]))
    dist.all_gather_into_tensor(full, hidden.contiguous(), group=tp_group)
    return full


def scatter_sequence_sum(grad: torch.Tensor, tp_group: dist.ProcessGroup) -> torch.Tensor:
    """[T, h] partial on each rank -> this rank's slice [T/tp, h] of the sum (reduce-scatter)."""
    local = grad.new_empty((grad.shape[0] // dist.get_world_size(tp_group), grad.shape[1]))
    dist.reduce_scatter_tensor(local, grad.contiguous(), group=tp_group)
    return local


class FusedLinearStatistics(torch.autograd.Function):
    """hidden [T, h] (or [T/tp, h] under sequence parallelism), weight [V/tp, h] ->
    statistics [T, 6], as VocabParallelStatistics on hidden @ weight.T, holding at most one
    [rows, V/tp] chunk of logits at a time."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        target_values: torch.Tensor,
        plan: Plan,
        tp_group: dist.ProcessGroup | None,
        sequence_parallel: bool = False,
        target_groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        full = gather_sequence(hidden, tp_group) if sequence_parallel else hidden
        rows = RowChunk(targets, target_values, target_groups=target_groups)
        maxima, sums = chunked_partials(lambda chunk: full[chunk] @ weight.t(), full, rows, plan)
        stats, log_q, gauss_scale = finish_statistics(maxima, sums, plan, tp_group)
        # The local slice is saved, not the gathered [T, h]: backward gathers it again.
        ctx.save_for_backward(hidden, weight, stats, log_q, gauss_scale)
        ctx.rows = rows
        ctx.plan, ctx.tp_group, ctx.sequence_parallel = plan, tp_group, sequence_parallel
        return stats

    @staticmethod
    def backward(ctx, grad_stats: torch.Tensor):
        hidden, weight, stats, log_q, gauss_scale = ctx.saved_tensors
        plan = ctx.plan
        if ctx.sequence_parallel:
            hidden = gather_sequence(hidden, ctx.tp_group)
        real = plan.shard.real_width
        rows = ctx.rows.backward_rows(stats, log_q, grad_stats.to(stats.dtype), gauss_scale)
        grad_hidden = torch.zeros(hidden.shape, dtype=stats.dtype, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=stats.dtype, device=weight.device)
        real_weight = weight[:real]

        def fold(chunk: slice, grad_logits: torch.Tensor) -> None:
            grad_hidden[chunk] = (grad_logits @ real_weight).to(stats.dtype)
            if grad_logits.dtype == grad_weight.dtype:  # no [V/tp, h] temporary per chunk
                grad_weight[:real].addmm_(grad_logits.t(), hidden[chunk])
            else:
                grad_weight[:real] += (grad_logits.t() @ hidden[chunk]).to(stats.dtype)

        # The matmuls run in the model's dtype, so the chunk's logit gradient comes in it.
        chunked_gradient(lambda chunk: hidden[chunk] @ weight.t(), hidden, rows, plan,
                         hidden.dtype, fold=fold)
        if ctx.sequence_parallel:
            grad_hidden = scatter_sequence_sum(grad_hidden, ctx.tp_group)
        elif ctx.tp_group is not None:
            dist.all_reduce(grad_hidden, group=ctx.tp_group)
        return (grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None, None, None,
                None, None, None)


def fused_linear_statistics(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    target_values: torch.Tensor,
    shard: VocabShard,
    columns: Columns,
    distance: Distance,
    real_vocab: int,
    tp_group: dist.ProcessGroup | None = None,
    rows_per_chunk: int | None = None,
    kernel: str | None = None,
    labels: LabelCheck | None = None,
    sequence_parallel: bool = False,
    target_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """hidden [T, h], weight [V/tp, h] (this rank's output-layer shard), targets long [T]
    (global ids, in range), target_values [T] (0 where the target is not a number) ->
    statistics [T, 6] of hidden @ weight.T, differentiable in hidden and weight.
    target_groups: int32 [T], needed with a grouped shard (plan.RowChunk.target_groups).

    As `statistics.vocab_parallel_statistics`, but rows_per_chunk tokens' logits [rows, V/tp]
    are all it holds at a time (default: HEAD_CHUNK_ELEMENTS of them, 64 MiB in fp32).
    Two all-reduces on tp_group forward, one (grad_hidden) backward.
    sequence_parallel: hidden is this rank's [T/tp, h] slice of the rows (targets stay [T]);
    forward adds an all-gather of hidden, backward gathers it again and reduce-scatters
    grad_hidden instead of the all-reduce.
    """
    if tp_group is not None and dist.get_world_size(tp_group) == 1:
        tp_group = None
    if tp_group is None:
        sequence_parallel = False  # one rank holds the whole sequence
    plan = Plan(shard, columns, distance, real_vocab,
                chunk_rows(weight.shape[0], rows_per_chunk, HEAD_CHUNK_ELEMENTS),
                resolve_kernel(kernel, hidden.device, hidden.dtype), labels or LabelCheck())
    return FusedLinearStatistics.apply(hidden, weight, targets, target_values, plan, tp_group,
                                       sequence_parallel, target_groups)
