"""The fused vocab-parallel objective: per-token statistics over a logits shard.

Tensor-parallel rank r holds logits z[t, j] for the global vocab ids j in [vocab_start,
vocab_start + V/tp) (Megatron's layout: logits [s, b, V/tp], flattened here to [T, V/tp]). Per
token t with target y and, when y is a number token, target value u, `VocabParallelStatistics`
returns [T, 6]:

    lse      log sum_j exp(z_j)                     over the real (unpadded) vocab
    target   z_y                                    the target logit
    mean     sum_j z_j / V_real                     only with label smoothing, else 0
    yhat     sum_{j in N} pN_j v_j                  expected value under the number softmax pN
    was      sum_{j in N} pN_j D(v_j, u)            Wasserstein-1 to the one-hot target
    mass     sum_{j in N} softmax_j                 probability mass on number tokens
    soft     sum_{j in N} q_j z_j                   only with the Gaussian number target:
             q_j = g_j / sum_N g, g_j = exp(-(v_j - u)**2 / (2 sigma**2)), so that
             lse - soft = -sum_j q_j log softmax_j (the 7th column; absent when sigma = 0)

Communication: forward makes exactly two all-reduces on the TP group, a MAX of [T, 2] (plus the
layout rows) and a SUM of [T, k] with k <= 9 columns (the Gaussian target's G and Z ride on it;
Z = sum_N g is a sum of every rank's share, so no rank needs the global number table);
backward makes none. Gradients flow
through every statistic, so the objectives are composed on top in plain torch
(objectives/loss.py).

The math lives in small stage functions that both autograd Functions (this one on the logits,
`fused_head.FusedLinearStatistics` on hidden @ weight.T) are thin sequences of:
`local_partials` -> `finish_statistics` (`rescale_partials`, `combine_sums`) forward, and
`local_gradient` backward; `chunked_partials` and `chunked_gradient` walk the row chunks and pick
the torch stage or the Triton kernel (`triton_kernels`, imported only when plan.kernel is
"triton", triton being optional) for each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.distributed as dist

from token_objectives.ops.layout import check_gathered, layout_rows
from token_objectives.ops.plan import (
    GAUSSIAN_STATISTIC,
    GAUSSIAN_SUMS,
    Columns,
    Distance,
    LabelCheck,
    Plan,
    RowChunk,
    VocabShard,
    accumulation_dtype,
    chunk_rows,
    gaussian_weights,
    resolve_kernel,
    row_chunks,
)

# ----------------------------------------------------------------------------------------------
# Stages. Each works on one rank's shard: logits [t, V/tp] in any float dtype (a chunk of rows),
# everything else in the accumulation dtype (fp32; fp64 for fp64 logits).
# ----------------------------------------------------------------------------------------------


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    # A row whose logits are all -inf has max -inf; shifting by it would give NaN.
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def local_partials(
    logits: torch.Tensor, rows: RowChunk, plan: Plan, scratch: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch stage of the forward, one pass over a chunk of this shard: logits [t, V/tp] ->
    (maxima [t, 2], sums [t, 7 or 9]), relative to the shard's OWN maxima (see
    `rescale_partials`).

    maxima: m_r over the real columns, n_r over the number columns (-inf if none).
    sums: S = sum exp(z - m_r), z_y (0 off-shard), sum z, Q = sum_N exp(z - n_r),
    E = sum_N exp(z - n_r) v, W = sum_N exp(z - n_r) D(v, u), M = sum_N exp(z - m_r);
    with the Gaussian target G = sum_N g z and Z = sum_N g (raw logits: nothing to re-base).
    rows: the chunk's targets and target_values.
    scratch: a reusable [>= t, real_width] buffer in the accumulation dtype.
    """
    shard, columns = plan.shard, plan.columns
    tokens = logits.shape[0]
    acc = scratch.dtype
    maxima = torch.full((tokens, 2), float("-inf"), dtype=acc, device=logits.device)
    sums = torch.zeros((tokens, columns.sum_width), dtype=acc, device=logits.device)
    if shard.real_width > 0:
        real = logits[:, : shard.real_width]
        work = scratch[:tokens]
        if real.dtype == acc:
            maxima[:, 0] = real.amax(dim=-1)
            if columns.mean_logit:
                sums[:, 2] = real.sum(dim=-1)
            torch.sub(real, _finite_or_zero(maxima[:, 0]).unsqueeze(-1), out=work)
        else:
            work.copy_(real)  # bf16/fp16 -> fp32 once; the passes below stay in cache
            maxima[:, 0] = work.amax(dim=-1)
            if columns.mean_logit:
                sums[:, 2] = work.sum(dim=-1)
            work.sub_(_finite_or_zero(maxima[:, 0]).unsqueeze(-1))
        sums[:, 0] = work.exp_().sum(dim=-1)

    local_targets = rows.targets - shard.vocab_start
    on_shard = (local_targets >= 0) & (local_targets < shard.real_width)
    gathered = logits.gather(1, local_targets.clamp(0, shard.width - 1).unsqueeze(-1)).squeeze(-1)
    sums[:, 1] = torch.where(on_shard, gathered.to(acc), torch.zeros_like(sums[:, 1]))

    has_numbers = shard.number_cols.numel() > 0
    if (columns.numbers or columns.gaussian) and has_numbers:
        number_logits = _group_logits(logits.index_select(1, shard.number_cols).to(acc), shard,
                                      rows)
        values = shard.number_values.to(acc)
    if columns.gaussian and has_numbers:
        g = _group_weights(_gaussian(values, rows.target_values.to(acc), columns), shard, rows)
        # where(): a -inf logit under a weight that underflowed to 0 adds 0, not NaN.
        sums[:, GAUSSIAN_SUMS[0]] = torch.where(g > 0, g * number_logits, 0.0).sum(dim=-1)
        sums[:, GAUSSIAN_SUMS[1]] = g.sum(dim=-1)
    if columns.numbers and has_numbers:
        maxima[:, 1] = number_logits.amax(dim=-1)
        weights = (number_logits - _finite_or_zero(maxima[:, 1]).unsqueeze(-1)).exp()
        sums[:, 3] = weights.sum(dim=-1)
        sums[:, 4] = weights @ values
        if columns.wasserstein:
            dist_to_target = plan.distance(values, rows.target_values.to(acc).unsqueeze(-1))
            sums[:, 5] = (weights * dist_to_target).sum(dim=-1)
        shift = _finite_or_zero(maxima[:, 0]).unsqueeze(-1)
        sums[:, 6] = (number_logits - shift).exp().sum(dim=-1)
    return maxima, sums


def _members(shard: VocabShard, rows: RowChunk) -> torch.Tensor | None:
    """bool [t, n]: the number tokens of each row's target group (None: all of them)."""
    if not shard.grouped:
        return None
    groups = rows.target_groups.unsqueeze(-1)
    return (shard.number_groups.unsqueeze(0) == groups) | (groups < 0)


def _group_logits(number_logits: torch.Tensor, shard: VocabShard, rows: RowChunk
                  ) -> torch.Tensor:
    """[t, n] number logits, -inf outside each row's target group: no softmax mass there."""
    members = _members(shard, rows)
    return number_logits if members is None else number_logits.masked_fill(~members, -torch.inf)


def _group_weights(weights: torch.Tensor, shard: VocabShard, rows: RowChunk) -> torch.Tensor:
    """[t, n] weights, 0 outside each row's target group."""
    members = _members(shard, rows)
    return weights if members is None else torch.where(members, weights, 0.0)


def _gaussian(values: torch.Tensor, target_values: torch.Tensor, columns: Columns
              ) -> torch.Tensor:
    """[t, n] un-normalised Gaussian target over this shard's number values [n]."""
    return gaussian_weights(values, target_values.unsqueeze(-1), 1.0 / columns.gaussian_sigma)


def rescale_partials(sums: torch.Tensor, local: torch.Tensor, best: torch.Tensor) -> None:
    """Re-base this shard's sums [T, 7 or 9] from its own maxima `local` [T, 2] to the global maxima
    `best` [T, 2] (after the MAX all-reduce), in place: exp(z - m) = exp(z - m_r) exp(m_r - m).
    """
    for max_col, sum_cols in ((0, [0, 6]), (1, [3, 4, 5])):
        own, top = local[:, max_col], best[:, max_col]
        factor = torch.where(
            torch.isfinite(own), (own - _finite_or_zero(top)).exp(), torch.zeros_like(own)
        )
        sums[:, sum_cols] *= factor.unsqueeze(-1)


def combine_sums(sums: torch.Tensor, maxima: torch.Tensor, real_vocab: int) -> torch.Tensor:
    """Global [T, 7 or 9] sums + [T, 2] maxima -> [T, 6 or 7] statistics (see the module
    docstring); soft is 0 where Z = 0 (a target that is no number, whose soft is unused)."""
    lse = sums[:, 0].log() + _finite_or_zero(maxima[:, 0])
    has_numbers = sums[:, 3] > 0
    denom = torch.where(has_numbers, sums[:, 3], torch.ones_like(sums[:, 3]))
    yhat = torch.where(has_numbers, sums[:, 4] / denom, torch.zeros_like(denom))
    was = torch.where(has_numbers, sums[:, 5] / denom, torch.zeros_like(denom))
    has_mass = sums[:, 0] > 0
    mass = torch.where(has_mass, sums[:, 6] / torch.where(has_mass, sums[:, 0], 1.0), 0.0)
    stats = [lse, sums[:, 1], sums[:, 2] / real_vocab, yhat, was, mass]
    if sums.shape[1] > GAUSSIAN_SUMS[1]:
        stats.append(sums[:, GAUSSIAN_SUMS[0]] * gaussian_scale(sums))
    return torch.stack(stats, dim=-1)


def gaussian_scale(sums: torch.Tensor) -> torch.Tensor:
    """[T] 1 / Z from the global sums [T, 9], 0 where Z = 0: q_j = g_j * gaussian_scale."""
    total = sums[:, GAUSSIAN_SUMS[1]]
    has = total > 0
    return torch.where(has, 1.0 / torch.where(has, total, 1.0), 0.0)


def number_log_normaliser(sums: torch.Tensor, maxima: torch.Tensor) -> torch.Tensor:
    """[T] log sum_N exp(z); +inf where no number column has mass, so that pN = 0 there."""
    q = sums[:, 3]
    return torch.where(
        q > 0, q.log() + _finite_or_zero(maxima[:, 1]), torch.full_like(q, torch.inf)
    )


def local_gradient(logits: torch.Tensor, rows: RowChunk, plan: Plan, out: torch.Tensor) -> None:
    """The torch stage of the backward: writes d(sum_t sum_k grads[t, k] * stats[t, k]) / d logits
    for the chunk's logits [t, V/tp] into `out` [t, real_width] (the accumulation dtype; the
    caller zeroes the padding columns; out may be logits[:, :real_width] itself). rows: the
    chunk with its stats, log_q and grads.

    softmax_j = exp(z_j - lse); pN_j = exp(z_j - log_q) on number columns:
      d lse = softmax;  d z_y = onehot(y);  d mean = 1/V;  d mass = softmax ([j in N] - mass)
      d yhat = pN (v - yhat);  d was = pN (D(v, u) - was);  d soft = q = g / Z on N.
    """
    shard, columns = plan.shard, plan.columns
    lse, _, _, yhat, was, mass = rows.stats[:, :6].unbind(-1)
    # A row of -inf logits has lse = -inf: exp(-inf - (+inf)) = 0 instead of exp(NaN).
    lse = torch.where(torch.isfinite(lse), lse, torch.inf)
    g_lse, g_target, g_mean, g_yhat, g_was, g_mass = rows.grads[:, :6].unbind(-1)
    has_numbers = shard.number_cols.numel() > 0
    numbers = columns.numbers and has_numbers
    gaussian = columns.gaussian and has_numbers
    if numbers or gaussian:  # before out is written: out may be the logits' own buffer
        number_logits = _group_logits(logits.index_select(1, shard.number_cols).to(out.dtype),
                                      shard, rows)
    torch.sub(logits[:, : shard.real_width], lse.unsqueeze(-1), out=out)
    out.exp_().mul_((g_lse - g_mass * mass).unsqueeze(-1))
    if columns.mean_logit:
        out.add_((g_mean / plan.real_vocab).unsqueeze(-1))

    if shard.real_width == 0:
        return  # a shard of vocab padding only: no target and no number lives here
    local_targets = rows.targets - shard.vocab_start
    on_shard = (local_targets >= 0) & (local_targets < shard.real_width)
    out.scatter_add_(
        1,
        local_targets.clamp(0, shard.real_width - 1).unsqueeze(-1),
        torch.where(on_shard, g_target, torch.zeros_like(g_target)).unsqueeze(-1),
    )

    if numbers:
        p_number = (number_logits - rows.log_q.unsqueeze(-1)).exp()
        values = shard.number_values.to(out.dtype)
        number_grad = p_number * (g_yhat.unsqueeze(-1) * (values - yhat.unsqueeze(-1)))
        if columns.wasserstein:
            dist_to_target = plan.distance(
                values, rows.target_values.to(out.dtype).unsqueeze(-1)
            )
            number_grad += p_number * g_was.unsqueeze(-1) * (dist_to_target - was.unsqueeze(-1))
        softmax_numbers = (number_logits - lse.unsqueeze(-1)).exp()
        number_grad += softmax_numbers * g_mass.unsqueeze(-1)
    if gaussian:
        g = _group_weights(_gaussian(shard.number_values.to(out.dtype),
                                     rows.target_values.to(out.dtype), columns), shard, rows)
        g_soft = rows.grads[:, GAUSSIAN_STATISTIC] * rows.gauss_scale
        gaussian_grad = g * g_soft.unsqueeze(-1)
        number_grad = gaussian_grad if not numbers else number_grad + gaussian_grad
    if numbers or gaussian:
        out.index_add_(1, shard.number_cols, number_grad)


def finish_statistics(
    maxima: torch.Tensor, sums: torch.Tensor, plan: Plan, tp_group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """This rank's partials [T, 2] / [T, 7 or 9] -> (statistics [T, 6 or 7], log_q [T],
    gauss_scale [T] = 1 / Z, or None without the Gaussian target).

    The only communication of the objective: a MAX all-reduce of the maxima, which also carries
    every rank's vocab layout and label check (`layout.layout_rows`, 5 numbers per rank),
    then one SUM all-reduce of the summed columns the plan needs, whatever the number of chunks.
    A bad layout or label raises on every rank between the two.
    """
    if tp_group is not None:
        rank, size = dist.get_rank(tp_group), dist.get_world_size(tp_group)
        bad = plan.labels.bad if plan.labels.bad is not None else maxima.new_zeros(())
        packed = torch.cat([maxima.flatten(),
                            layout_rows(plan.shard.layout, rank, size, bad, maxima)])
        dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=tp_group)
        check_gathered(packed[maxima.numel():], rank, plan.shard.layout.source,
                       plan.labels.message)
        best = packed[: maxima.numel()].view_as(maxima)
        rescale_partials(sums, maxima, best)
        maxima = best
        needed = plan.columns.summed()
        packed = sums[:, needed].contiguous()
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=tp_group)
        sums[:, needed] = packed
    scale = gaussian_scale(sums) if plan.columns.gaussian else None
    return (combine_sums(sums, maxima, plan.real_vocab), number_log_normaliser(sums, maxima),
            scale)


def chunked_partials(
    logits_of: Callable[[slice], torch.Tensor], like: torch.Tensor, rows: RowChunk, plan: Plan
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's partials (maxima [T, 2], sums [T, 7 or 9]), chunk by chunk of plan.rows rows.

    logits_of(chunk) gives the chunk's logits [t, V/tp] (a slice of stored logits, or a matmul
    for the fused LM head); `like` [T, ...] sets the device and the dtype; rows: the whole
    batch's targets. No communication.
    """
    tokens = len(rows)
    acc = accumulation_dtype(like.dtype)
    maxima = like.new_empty((tokens, 2), dtype=acc)
    sums = like.new_empty((tokens, plan.columns.sum_width), dtype=acc)
    if plan.kernel == "triton":
        from token_objectives.ops import triton_kernels

        for chunk in row_chunks(tokens, plan.rows):
            maxima[chunk], sums[chunk] = triton_kernels.triton_partials(
                logits_of(chunk), rows[chunk], plan
            )
        return maxima, sums
    scratch = like.new_empty((min(plan.rows, tokens), plan.shard.real_width), dtype=acc)
    for chunk in row_chunks(tokens, plan.rows):
        maxima[chunk], sums[chunk] = local_partials(logits_of(chunk), rows[chunk], plan, scratch)
    return maxima, sums


def chunk_gradient(
    logits: torch.Tensor,
    rows: RowChunk,
    plan: Plan,
    dtype: torch.dtype,
    workspace: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The logit gradient of one chunk of t rows, [t, real_width] in `dtype`, by plan.kernel.

    out: [t, V/tp] in `dtype` to write it into, padding columns zeroed (the result is a view of
    it); None: the torch stage returns its workspace rounded to `dtype`, the kernel a new tensor.
    workspace: from `gradient_workspace` (torch: a [>= t, real_width] buffer in the accumulation
    dtype, None when out is in that dtype; triton: None).
    """
    real = plan.shard.real_width
    if plan.kernel == "triton":
        from token_objectives.ops import triton_kernels

        if out is None:
            out = logits.new_empty((logits.shape[0], plan.shard.width), dtype=dtype)
        triton_kernels.triton_gradient(logits, rows, plan, out)
        return out[:, :real]
    if out is None:
        scratch = workspace[: logits.shape[0]]
        local_gradient(logits, rows, plan, scratch)
        return scratch.to(dtype)
    out[:, real:] = 0
    if workspace is None:
        local_gradient(logits, rows, plan, out[:, :real])
    else:  # bf16/fp16: compute the chunk in fp32, then round it once into out
        scratch = workspace[: logits.shape[0]]
        local_gradient(logits, rows, plan, scratch)
        out[:, :real].copy_(scratch)
    return out[:, :real]


def gradient_workspace(
    plan: Plan, tokens: int, like: torch.Tensor, into: torch.Tensor | None = None
) -> torch.Tensor | None:
    """What `chunk_gradient` reuses across the chunks of one backward; `like` [T, ...] sets the
    device and the dtype. None when the torch stage can write straight into `into`."""
    if plan.kernel == "triton":  # the kernel needs no workspace
        return None
    acc = accumulation_dtype(like.dtype)
    if into is not None and into.dtype == acc:
        return None
    return like.new_empty((min(plan.rows, tokens), plan.shard.real_width), dtype=acc)


def chunked_gradient(
    logits_of: Callable[[slice], torch.Tensor],
    like: torch.Tensor,
    rows: RowChunk,
    plan: Plan,
    dtype: torch.dtype,
    *,
    into: torch.Tensor | None = None,
    fold: Callable[[slice, torch.Tensor], None] | None = None,
) -> None:
    """The backward of both autograd Functions: the logit gradient of every row, chunk by chunk
    of plan.rows rows, handed to the caller's sink. No communication.

    logits_of(chunk) gives the chunk's logits [t, V/tp] (the stored slice, or hidden[chunk] @
    weight.T recomputed); `like` [T, ...] sets the device and the accumulation dtype; rows: the
    whole batch with its stats, log_q and grads. Each chunk's gradient [t, real_width] in
    `dtype`, by plan.kernel, goes to
      into: [T, V/tp] in `dtype`, the whole gradient, written in place (padding columns 0), and
      fold(chunk, grad): e.g. into grad_hidden and grad_weight (grad is valid until the next
        chunk, and a view of into[chunk] when into is given).
    """
    tokens = len(rows)
    workspace = gradient_workspace(plan, tokens, like, into)
    for chunk in row_chunks(tokens, plan.rows):
        out = None if into is None else into[chunk]
        grad = chunk_gradient(logits_of(chunk), rows[chunk], plan, dtype, workspace, out)
        if fold is not None:
            fold(chunk, grad)


class VocabParallelStatistics(torch.autograd.Function):
    """logits [T, V/tp] -> statistics [T, 6] (lse, target, mean, yhat, was, mass), [T, 7] with
    the Gaussian target's soft.

    Works through the rows in chunks, one pass over the logits forward, one read and one write
    backward. Saves the logits in their own dtype plus O(T) statistics, never a [T, V] fp32
    copy; the backward recomputes the softmax from them with no communication, into one
    gradient in the logits' dtype. With grad_in_place (and logits that are an intermediate of
    the graph, not a leaf), that gradient is written over the saved logits, as Megatron's CE
    does, so backward allocates no [T, V/tp] tensor; the logits' version counter is bumped, so
    any other use of them that autograd saved fails loudly instead of reading the gradient.
    """

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        targets: torch.Tensor,
        target_values: torch.Tensor,
        plan: Plan,
        tp_group: dist.ProcessGroup | None,
        grad_in_place: bool = False,
        target_groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if plan.kernel == "triton":  # no fp32 working set to bound: one launch for all rows
            plan = replace(plan, rows=max(logits.shape[0], 1))
        rows = RowChunk(targets, target_values, target_groups=target_groups)
        maxima, sums = chunked_partials(lambda chunk: logits[chunk], logits, rows, plan)
        stats, log_q, gauss_scale = finish_statistics(maxima, sums, plan, tp_group)
        ctx.save_for_backward(logits, stats, log_q, gauss_scale)
        ctx.rows = rows
        ctx.plan = plan
        # A leaf is the caller's own tensor (a test's, a user's), and so is the buffer of a
        # view of one (objective_loss reshapes): never written over.
        root = logits
        while root._base is not None:
            root = root._base
        ctx.in_place = grad_in_place and not root.is_leaf
        return stats

    @staticmethod
    def backward(ctx, grad_stats: torch.Tensor):
        logits, stats, log_q, gauss_scale = ctx.saved_tensors
        rows = ctx.rows.backward_rows(stats, log_q, grad_stats.to(stats.dtype), gauss_scale)
        grad = logits if ctx.in_place else torch.empty_like(logits)
        chunked_gradient(lambda chunk: logits[chunk], logits, rows, ctx.plan, logits.dtype,
                         into=grad)
        if ctx.in_place:
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None, None, None


def vocab_parallel_statistics(
    logits: torch.Tensor,
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
    grad_in_place: bool = True,
    target_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits [T, V/tp] (local shard), targets long [T] (global ids, in range), target_values
    [T] (0 where the target is not a number) -> statistics [T, 6] ([T, 7] with
    columns.gaussian_sigma > 0), differentiable. target_groups: int32 [T], needed with a
    grouped shard (RowChunk.target_groups).

    tp_group None (or of size 1) means the logits hold the whole vocab and nothing is sent.
    rows_per_chunk bounds the fp32 working set to [rows, V/tp] (default: CHUNK_ELEMENTS).
    kernel: "auto" | "torch" | "triton" (see plan.resolve_kernel). labels: this rank's label
    check, raised on every rank after the MAX all-reduce (None: no check).
    grad_in_place: backward writes the logit gradient over the logits when they are not a leaf
    (no [T, V/tp] allocation); False for callers that still read the logits after backward.
    """
    if tp_group is not None and dist.get_world_size(tp_group) == 1:
        tp_group = None
    rows = chunk_rows(logits.shape[-1], rows_per_chunk)
    plan = Plan(shard, columns, distance, real_vocab, rows,
                resolve_kernel(kernel, logits.device, logits.dtype), labels or LabelCheck())
    return VocabParallelStatistics.apply(logits, targets, target_values, plan, tp_group,
                                         grad_in_place, target_groups)
