"""The fused vocab-parallel objective: per-token statistics over a logits shard.

Tensor-parallel rank r holds logits z[t, j] for the global vocab ids j in [r*V/tp, (r+1)*V/tp)
(Megatron's layout: logits [s, b, V/tp], flattened here to [T, V/tp]). Per token t with target y
and, when y is a number token, target value u, `VocabParallelStatistics` returns

    lse      log sum_j exp(z_j)                     over the real (unpadded) vocab
    target   z_y                                    the target logit
    mean     sum_j z_j / V_real                     only with label smoothing, else 0
    yhat     sum_{j in N} pN_j v_j                  expected value under the number softmax pN
    was      sum_{j in N} pN_j D(v_j, u)            Wasserstein-1 to the one-hot target
    mass     sum_{j in N} softmax_j                 probability mass on number tokens

Communication: forward makes exactly two all-reduces on the TP group, a MAX of [T, 2] and a SUM
of [T, k] with k <= 7 columns; backward makes none. Gradients flow through every statistic, so
the objectives are composed on top in plain torch (see objectives.py).

The math lives in small stage functions (`local_maxima`, `local_sums`, `combine_sums`,
`local_gradient`) that the autograd Function is a thin sequence of.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from token_objectives.ops.layout import VocabLayout, check_gathered, layout_rows

NUM_STATISTICS = 6


@dataclass(frozen=True)
class Distance:
    """Ground distance D(v, u) of the Wasserstein term between number values v and the target u.

    Plain |v - u| by default. With ntloss's `squash_factor` s, non-zero distances are mapped
    affinely from [d_min, d_max] (the smallest non-zero and the largest distance between any two
    number values) onto [1, s], so the farthest number costs s times the nearest wrong one.
    """

    squash_min: float | None = None
    squash_scale: float = 1.0

    @classmethod
    def for_values(cls, number_values: torch.Tensor, squash_factor: float | None) -> Distance:
        """number_values: [N] the values of the number tokens (a NumberTable's finite ones)."""
        if squash_factor is None:
            return cls()
        values = number_values.double().unique()
        if values.numel() < 2:
            raise ValueError("squash_factor needs at least two distinct number values")
        diffs = (values[:, None] - values[None, :]).abs()
        d_min = diffs[diffs > 0].min().item()
        d_max = diffs.max().item()
        if d_max == d_min:
            # Every pair is equally far apart: ntloss divides by zero here; all distances are 1.
            return cls(squash_min=d_min, squash_scale=0.0)
        return cls(squash_min=d_min, squash_scale=(squash_factor - 1.0) / (d_max - d_min))

    def __call__(self, values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """values [..., n], targets [..., 1] -> distances [..., n]."""
        diff = (values - targets).abs()
        if self.squash_min is None:
            return diff
        squashed = 1.0 + (diff - self.squash_min) * self.squash_scale
        return torch.where(diff == 0, torch.zeros_like(diff), squashed)

    def max_distance(self, number_values: torch.Tensor) -> float:
        """The largest distance between two of the number values [N]."""
        values = number_values.double()
        spread = (values.max() - values.min()).reshape(1)
        return float(self(spread, torch.zeros(1, dtype=spread.dtype)).item())


@dataclass(frozen=True)
class VocabShard:
    """What one TP rank needs to know about its slice of the vocabulary.

    layout: which global ids the shard holds, the global padded and real vocab sizes.
    real_width: local columns that are real tokens; [real_width, width) is vocab padding.
    number_cols: long [n] local column ids of number tokens; number_values: float32 [n].
    """

    layout: VocabLayout
    number_cols: torch.Tensor
    number_values: torch.Tensor

    @property
    def vocab_start(self) -> int:
        return self.layout.vocab_start

    @property
    def width(self) -> int:
        return self.layout.width

    @property
    def real_width(self) -> int:
        return self.layout.real_width


def vocab_shard(
    values: torch.Tensor | None, layout: VocabLayout, device: torch.device
) -> VocabShard:
    """The number tokens inside this rank's `layout`. values: [V] a value per global id, NaN
    for non-numbers (NumberTable.values); None: no number tokens."""
    if values is None:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return VocabShard(layout, empty, empty.float())
    local_values = values[layout.vocab_start : layout.vocab_start + layout.width]
    cols = torch.nonzero(~torch.isnan(local_values)).flatten()
    return VocabShard(
        layout=layout,
        number_cols=cols.to(device),
        number_values=local_values[cols].to(device=device, dtype=torch.float32),
    )


@dataclass(frozen=True)
class Columns:
    """Which optional statistics to compute; the SUM all-reduce carries only these."""

    numbers: bool = False  # yhat and mass (and the denominators they need)
    wasserstein: bool = False
    mean_logit: bool = False

    def summed(self) -> list[int]:
        """Indices of the [T, 7] partial-sum columns that these statistics need."""
        needed = [0, 1]
        if self.mean_logit:
            needed.append(2)
        if self.numbers:
            needed += [3, 4, 5, 6] if self.wasserstein else [3, 4, 6]
        return sorted(needed)


@dataclass(frozen=True)
class LabelCheck:
    """The outcome of this rank's label check, raised after the MAX all-reduce under TP so that
    every rank raises it together. bad: 0-dim, 1 where a label is out of range (no host sync on
    the GPU); message: the error (CPU only; None when the labels are fine)."""

    bad: torch.Tensor | None = None
    message: str | None = None


@dataclass(frozen=True)
class Plan:
    """Everything about one call but the tensors: this rank's shard, the statistics to compute,
    the Wasserstein distance, the real (unpadded) vocab size and the rows per chunk."""

    shard: VocabShard
    columns: Columns
    distance: Distance
    real_vocab: int
    rows: int
    kernel: str = "torch"  # "torch" stages or the "triton" kernels (see resolve_kernel)
    labels: LabelCheck = LabelCheck()


KERNELS = ("auto", "torch", "triton")
KERNEL_ENV = "TOKEN_OBJECTIVES_KERNEL"


def resolve_kernel(requested: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """"torch" or "triton" for logits on `device` in `dtype`.

    requested None reads $TOKEN_OBJECTIVES_KERNEL (default "auto"). "auto" takes the Triton
    kernels on CUDA when triton is importable and the logits are not fp64, else the torch
    stages. "triton" insists, and also runs on CPU under Triton's interpreter
    (TRITON_INTERPRET=1, for tests).
    """
    requested = requested or os.environ.get(KERNEL_ENV) or "auto"
    if requested not in KERNELS:
        raise ValueError(
            f"unknown kernel {requested!r}: pass kernel= (or set ${KERNEL_ENV}) to one of "
            f"{', '.join(KERNELS)}"
        )
    if requested == "torch":
        return "torch"
    has_triton = importlib.util.find_spec("triton") is not None
    runs_here = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    if requested == "auto":
        usable = has_triton and device.type == "cuda" and dtype != torch.float64
        return "triton" if usable else "torch"
    if dtype == torch.float64:
        raise ValueError("the Triton kernels accumulate in fp32: use kernel='torch' for fp64")
    if not has_triton:
        raise ValueError("kernel='triton' needs the triton package: pip install triton")
    if not runs_here:
        raise ValueError(
            f"kernel='triton' with logits on {device.type}: Triton runs on CUDA, or on CPU "
            f"under its interpreter (set TRITON_INTERPRET=1); else use kernel='torch'"
        )
    return "triton"


# ----------------------------------------------------------------------------------------------
# Stages. Each works on one rank's shard: logits [t, V/tp] in any float dtype (a chunk of rows),
# everything else in the accumulation dtype (fp32; fp64 for fp64 logits).
# ----------------------------------------------------------------------------------------------

# Rows per chunk are chosen so that a chunk's fp32 working copy stays near this many elements
# (4 MiB in fp32): large enough that per-chunk overhead is small, small enough to stay in cache.
CHUNK_ELEMENTS = 1 << 20
SUM_COLUMNS = 7


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 logits; fp64 stays fp64 (for gradcheck and references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_rows(width: int, rows: int | None = None, elements: int = CHUNK_ELEMENTS) -> int:
    """Rows per chunk: `rows` if given, else as many as fit `elements` (at least 1)."""
    return max(1, rows if rows is not None else elements // max(width, 1))


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    # A row whose logits are all -inf has max -inf; shifting by it would give NaN.
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def shard_partials(
    logits: torch.Tensor,
    targets: torch.Tensor,
    target_values: torch.Tensor,
    plan: Plan,
    scratch: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over a chunk of this shard: (maxima [t, 2], sums [t, 7]), relative to the
    shard's OWN maxima (see `rescale_partials`).

    maxima: m_r over the real columns, n_r over the number columns (-inf if none).
    sums: S = sum exp(z - m_r), z_y (0 off-shard), sum z, Q = sum_N exp(z - n_r),
    E = sum_N exp(z - n_r) v, W = sum_N exp(z - n_r) D(v, u), M = sum_N exp(z - m_r).
    targets: long [t] global ids (in range); target_values [t] (0 where not a number).
    scratch: a reusable [>= t, real_width] buffer in the accumulation dtype.
    """
    shard, columns = plan.shard, plan.columns
    rows = logits.shape[0]
    acc = scratch.dtype
    maxima = torch.full((rows, 2), float("-inf"), dtype=acc, device=logits.device)
    sums = torch.zeros((rows, SUM_COLUMNS), dtype=acc, device=logits.device)
    if shard.real_width > 0:
        real = logits[:, : shard.real_width]
        work = scratch[:rows]
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

    local_targets = targets - shard.vocab_start
    on_shard = (local_targets >= 0) & (local_targets < shard.real_width)
    gathered = logits.gather(1, local_targets.clamp(0, shard.width - 1).unsqueeze(-1)).squeeze(-1)
    sums[:, 1] = torch.where(on_shard, gathered.to(acc), torch.zeros_like(sums[:, 1]))

    if columns.numbers and shard.number_cols.numel() > 0:
        number_logits = logits.index_select(1, shard.number_cols).to(acc)
        values = shard.number_values.to(acc)
        maxima[:, 1] = number_logits.amax(dim=-1)
        weights = (number_logits - _finite_or_zero(maxima[:, 1]).unsqueeze(-1)).exp()
        sums[:, 3] = weights.sum(dim=-1)
        sums[:, 4] = weights @ values
        if columns.wasserstein:
            dist_to_target = plan.distance(values, target_values.to(acc).unsqueeze(-1))
            sums[:, 5] = (weights * dist_to_target).sum(dim=-1)
        shift = _finite_or_zero(maxima[:, 0]).unsqueeze(-1)
        sums[:, 6] = (number_logits - shift).exp().sum(dim=-1)
    return maxima, sums


def rescale_partials(sums: torch.Tensor, local: torch.Tensor, best: torch.Tensor) -> None:
    """Re-base this shard's sums [T, 7] from its own maxima `local` [T, 2] to the global maxima
    `best` [T, 2] (after the MAX all-reduce), in place: exp(z - m) = exp(z - m_r) exp(m_r - m).
    """
    for max_col, sum_cols in ((0, [0, 6]), (1, [3, 4, 5])):
        own, top = local[:, max_col], best[:, max_col]
        factor = torch.where(
            torch.isfinite(own), (own - _finite_or_zero(top)).exp(), torch.zeros_like(own)
        )
        sums[:, sum_cols] *= factor.unsqueeze(-1)


def combine_sums(sums: torch.Tensor, maxima: torch.Tensor, real_vocab: int) -> torch.Tensor:
    """Global [T, 7] sums + [T, 2] maxima -> [T, 6] statistics (see the module docstring)."""
    lse = sums[:, 0].log() + _finite_or_zero(maxima[:, 0])
    has_numbers = sums[:, 3] > 0
    denom = torch.where(has_numbers, sums[:, 3], torch.ones_like(sums[:, 3]))
    yhat = torch.where(has_numbers, sums[:, 4] / denom, torch.zeros_like(denom))
    was = torch.where(has_numbers, sums[:, 5] / denom, torch.zeros_like(denom))
    has_mass = sums[:, 0] > 0
    mass = torch.where(has_mass, sums[:, 6] / torch.where(has_mass, sums[:, 0], 1.0), 0.0)
    return torch.stack([lse, sums[:, 1], sums[:, 2] / real_vocab, yhat, was, mass], dim=-1)


def number_log_normaliser(sums: torch.Tensor, maxima: torch.Tensor) -> torch.Tensor:
    """[T] log sum_N exp(z); +inf where no number column has mass, so that pN = 0 there."""
    q = sums[:, 3]
    return torch.where(
        q > 0, q.log() + _finite_or_zero(maxima[:, 1]), torch.full_like(q, torch.inf)
    )


def local_gradient(
    logits: torch.Tensor,
    stats: torch.Tensor,
    log_q: torch.Tensor,
    grads: torch.Tensor,
    targets: torch.Tensor,
    target_values: torch.Tensor,
    plan: Plan,
    out: torch.Tensor,
) -> None:
    """Writes d(sum_t sum_k grads[t, k] * stats[t, k]) / d logits into `out` [t, real_width]
    (the accumulation dtype; the caller zeroes the padding columns).

    softmax_j = exp(z_j - lse); pN_j = exp(z_j - log_q) on number columns:
      d lse = softmax;  d z_y = onehot(y);  d mean = 1/V;  d mass = softmax ([j in N] - mass)
      d yhat = pN (v - yhat);  d was = pN (D(v, u) - was).
    """
    shard, columns = plan.shard, plan.columns
    lse, _, _, yhat, was, mass = stats.unbind(-1)
    # A row of -inf logits has lse = -inf: exp(-inf - (+inf)) = 0 instead of exp(NaN).
    lse = torch.where(torch.isfinite(lse), lse, torch.inf)
    g_lse, g_target, g_mean, g_yhat, g_was, g_mass = grads.unbind(-1)
    torch.sub(logits[:, : shard.real_width], lse.unsqueeze(-1), out=out)
    out.exp_().mul_((g_lse - g_mass * mass).unsqueeze(-1))
    if columns.mean_logit:
        out.add_((g_mean / plan.real_vocab).unsqueeze(-1))

    if shard.real_width == 0:
        return  # a shard of vocab padding only: no target and no number lives here
    local_targets = targets - shard.vocab_start
    on_shard = (local_targets >= 0) & (local_targets < shard.real_width)
    out.scatter_add_(
        1,
        local_targets.clamp(0, shard.real_width - 1).unsqueeze(-1),
        torch.where(on_shard, g_target, torch.zeros_like(g_target)).unsqueeze(-1),
    )

    if columns.numbers and shard.number_cols.numel() > 0:
        number_logits = logits.index_select(1, shard.number_cols).to(out.dtype)
        p_number = (number_logits - log_q.unsqueeze(-1)).exp()
        values = shard.number_values.to(out.dtype)
        number_grad = p_number * (g_yhat.unsqueeze(-1) * (values - yhat.unsqueeze(-1)))
        if columns.wasserstein:
            dist_to_target = plan.distance(values, target_values.to(out.dtype).unsqueeze(-1))
            number_grad += p_number * g_was.unsqueeze(-1) * (dist_to_target - was.unsqueeze(-1))
        softmax_numbers = (number_logits - lse.unsqueeze(-1)).exp()
        number_grad += softmax_numbers * g_mass.unsqueeze(-1)
        out.index_add_(1, shard.number_cols, number_grad)


def finish_statistics(
    maxima: torch.Tensor, sums: torch.Tensor, plan: Plan, tp_group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's partials [T, 2] / [T, 7] -> (statistics [T, 6], log_q [T]).

    The only communication of the objective: a MAX all-reduce of the maxima, which also carries
    every rank's vocab layout and label check (`vocab_layout.layout_rows`, 5 numbers per rank),
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
    return combine_sums(sums, maxima, plan.real_vocab), number_log_normaliser(sums, maxima)


def chunked_partials(
    logits_of, like: torch.Tensor, targets: torch.Tensor, target_values: torch.Tensor, plan: Plan
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's partials (maxima [T, 2], sums [T, 7]), chunk by chunk of rows.

    logits_of(chunk) gives the chunk's logits [rows, V/tp] (a slice of stored logits, or a
    matmul for the fused LM head); `like` [T, ...] sets the token count, device and dtype.
    """
    tokens = like.shape[0]
    acc = accumulation_dtype(like.dtype)
    maxima = like.new_empty((tokens, 2), dtype=acc)
    sums = like.new_empty((tokens, SUM_COLUMNS), dtype=acc)
    if plan.kernel == "triton":
        from token_objectives.ops import triton_kernels

        values = triton_kernels.dense_number_values(plan, like.device)
        for chunk in row_chunks(tokens, plan.rows):
            maxima[chunk], sums[chunk] = triton_kernels.shard_partials(
                logits_of(chunk), targets[chunk], target_values[chunk], plan, values
            )
        return maxima, sums
    scratch = like.new_empty((min(plan.rows, tokens), plan.shard.real_width), dtype=acc)
    for chunk in row_chunks(tokens, plan.rows):
        maxima[chunk], sums[chunk] = shard_partials(
            logits_of(chunk), targets[chunk], target_values[chunk], plan, scratch
        )
    return maxima, sums


def chunk_gradient(
    logits: torch.Tensor,
    stats: torch.Tensor,
    log_q: torch.Tensor,
    grads: torch.Tensor,
    targets: torch.Tensor,
    target_values: torch.Tensor,
    plan: Plan,
    dtype: torch.dtype,
    workspace: torch.Tensor,
) -> torch.Tensor:
    """The logit gradient of one chunk of rows, [t, real_width] in `dtype`, by plan.kernel.

    workspace: from `gradient_workspace` (torch: a [>= t, real_width] buffer in the
    accumulation dtype; triton: the dense number values).
    """
    if plan.kernel == "triton":
        from token_objectives.ops import triton_kernels

        grad = triton_kernels.logit_gradient(logits, stats, log_q, grads, targets,
                                             target_values, plan, workspace, dtype)
        return grad[:, : plan.shard.real_width]
    out = workspace[: logits.shape[0]]
    local_gradient(logits, stats, log_q, grads, targets, target_values, plan, out)
    return out.to(dtype)


def gradient_workspace(plan: Plan, tokens: int, like: torch.Tensor) -> torch.Tensor:
    """What `chunk_gradient` reuses across the chunks of one backward."""
    if plan.kernel == "triton":
        from token_objectives.ops import triton_kernels

        return triton_kernels.dense_number_values(plan, like.device)
    acc = accumulation_dtype(like.dtype)
    return like.new_empty((min(plan.rows, tokens), plan.shard.real_width), dtype=acc)


def row_chunks(total: int, rows: int):
    for start in range(0, total, rows):
        yield slice(start, min(start + rows, total))


class VocabParallelStatistics(torch.autograd.Function):
    """logits [T, V/tp] -> statistics [T, 6] (lse, target, mean, yhat, was, mass).

    Works through the rows in chunks, one pass over the logits forward, one read and one write
    backward. Saves the logits in their own dtype plus O(T) statistics, never a [T, V] fp32
    copy; the backward recomputes the softmax from them with no communication.
    """

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        targets: torch.Tensor,
        target_values: torch.Tensor,
        plan: Plan,
        tp_group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        if plan.kernel == "triton":  # no fp32 working set to bound: one launch for all rows
            plan = replace(plan, rows=max(logits.shape[0], 1))
        maxima, sums = chunked_partials(
            lambda chunk: logits[chunk], logits, targets, target_values, plan
        )
        stats, log_q = finish_statistics(maxima, sums, plan, tp_group)
        ctx.save_for_backward(logits, targets, target_values, stats, log_q)
        ctx.plan = plan
        return stats

    @staticmethod
    def backward(ctx, grad_stats: torch.Tensor):
        logits, targets, target_values, stats, log_q = ctx.saved_tensors
        plan = ctx.plan
        real_width = plan.shard.real_width
        grads = grad_stats.to(stats.dtype)
        if plan.kernel == "triton":  # one read of the logits, one write of the gradient
            from token_objectives.ops import triton_kernels

            values = triton_kernels.dense_number_values(plan, logits.device)
            grad = triton_kernels.logit_gradient(logits, stats, log_q, grads, targets,
                                                 target_values, plan, values, logits.dtype)
            return grad, None, None, None, None
        grad = torch.empty_like(logits)
        grad[:, real_width:] = 0
        direct = grad.dtype == stats.dtype
        if not direct:  # bf16/fp16: compute a chunk in fp32, then round it once into grad
            scratch = logits.new_empty(
                (min(plan.rows, logits.shape[0]), real_width), dtype=stats.dtype
            )
        for chunk in row_chunks(logits.shape[0], plan.rows):
            out = grad[chunk, :real_width] if direct else scratch[: chunk.stop - chunk.start]
            local_gradient(
                logits[chunk],
                stats[chunk],
                log_q[chunk],
                grads[chunk],
                targets[chunk],
                target_values[chunk],
                plan,
                out,
            )
            if not direct:
                grad[chunk, :real_width].copy_(out)
        return grad, None, None, None, None


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
    labels: LabelCheck = LabelCheck(),
) -> torch.Tensor:
    """logits [T, V/tp] (local shard), targets long [T] (global ids, in range), target_values
    [T] (0 where the target is not a number) -> statistics [T, 6], differentiable.

    tp_group None (or of size 1) means the logits hold the whole vocab and nothing is sent.
    rows_per_chunk bounds the fp32 working set to [rows, V/tp] (default: CHUNK_ELEMENTS).
    kernel: "auto" | "torch" | "triton" (see resolve_kernel). labels: this rank's label check,
    raised on every rank after the MAX all-reduce.
    """
    if tp_group is not None and dist.get_world_size(tp_group) == 1:
        tp_group = None
    rows = chunk_rows(logits.shape[-1], rows_per_chunk)
    plan = Plan(shard, columns, distance, real_vocab, rows,
                resolve_kernel(kernel, logits.device, logits.dtype), labels)
    return VocabParallelStatistics.apply(logits, targets, target_values, plan, tp_group)
