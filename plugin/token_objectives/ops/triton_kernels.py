"""Triton kernels for the objective's two per-shard stages: the forward partial sums
(`triton_partials`, the kernel of `statistics.local_partials`) and the logit gradient
(`triton_gradient`, the kernel of `statistics.local_gradient`).

One program per token row. The full-vocab loop does cross-entropy's work only: forward, a
per-lane online max and sum of exp (each lane of the block keeps its own running max, so the
row is reduced across threads once, after the loop, not once per block); backward, softmax
times a per-row scale, stored in the logits' dtype. The number tokens, a handful of columns, are
gathered per row from the shard's number_cols / number_values in a short second loop (as the
torch stage does), which adds their NTL terms: forward Q, E, W, M and the Gaussian target's G, Z;
backward it rewrites those columns' gradient (after a barrier, so that its store lands after the
first loop's).

The first loop runs over whole blocks without a mask; the last block is masked on the padded
width (the row's allocated width) and cut to the real width with a `where`, so that the loads
stay 128-bit when the real width is not a multiple of 16 (Triton specialises a padded width
and row stride that are). Accumulation is fp32 whatever the logits' dtype.

The math, the column layout of the [T, 7 or 9] sums and the [T, 6 or 7] statistics are those of
statistics.py, whose torch stages are the reference these kernels are tested against (on CPU
with TRITON_INTERPRET=1). No communication here; imports torch, triton and `plan` only.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from token_objectives.ops.plan import GAUSSIAN_STATISTIC, GAUSSIAN_SUMS, Plan, RowChunk

# Columns per block: a power of two, large enough to keep each row's loop short on 128k vocabs.
MAX_BLOCK = 4096
# Number tokens gathered per iteration of the number loop (digits: one iteration; tokenizers
# with every 1-3 digit number, ~1100 of them, a few).
NUMBER_BLOCK = 256
# The most negative finite fp32: the per-lane running max starts here, not at -inf, so that a
# -inf logit gives exp(-inf) = 0 rather than exp(-inf - -inf) = NaN.
LOWEST = tl.constexpr(-3.4028234663852886e38)
LOG2E = tl.constexpr(1.4426950408889634)

if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter has no libdevice

    @triton.jit
    def _exp2(x):
        return tl.exp2(x)

else:

    @triton.jit
    def _exp2(x):
        # libdevice's exp2 is ex2.approx.ftz, one instruction; tl.exp's ex2 without ftz spends
        # three more per column guarding results below 2^-126, which no sum here can see.
        return libdevice.exp2(x)


# The Gaussian target's columns of the sums and of the statistics (plan.GAUSSIAN_*).
GAUSS_G = tl.constexpr(GAUSSIAN_SUMS[0])
GAUSS_Z = tl.constexpr(GAUSSIAN_SUMS[1])
GAUSS_STAT = tl.constexpr(GAUSSIAN_STATISTIC)

# Launch options of the gradient kernel only: left to itself, ptxas for sm_100 gives it 32
# registers (full occupancy) and spills one across the loops (check-kernels shows it); a cap of
# 40 keeps occupancy near full without the spill.
GRADIENT_OPTIONS = {"maxnreg": 40}


def _block(width: int) -> int:
    return max(1, min(MAX_BLOCK, triton.next_power_of_2(max(width, 1))))


def _squash(plan: Plan) -> tuple[bool, float, float]:
    distance = plan.distance
    if distance.squash_min is None:
        return False, 0.0, 1.0
    return True, float(distance.squash_min), float(distance.squash_scale)


@triton.jit
def _distance(values, target, SQUASH: tl.constexpr, squash_min, squash_scale):
    diff = tl.abs(values - target)
    if SQUASH:
        diff = tl.where(diff == 0.0, 0.0, 1.0 + (diff - squash_min) * squash_scale)
    return diff


@triton.jit
def _online_exp(z, top, total):
    """One lane-wise step of the online sum of exp: with d = z - top, one exp per column,
    exp(-|d|), is either the new term (d <= 0) or the rescale of the old sum (d > 0)."""
    diff = z - top
    weight = _exp2(-tl.abs(diff) * LOG2E)
    total = tl.where(diff > 0.0, total * weight + 1.0, total + weight)
    return tl.maximum(top, z), total


@triton.jit
def _softmax_grad(z, lse2, softmax_scale, flat, MEAN_LOGIT: tl.constexpr):
    """The gradient every column gets: softmax (g_lse - g_mass mass) + g_mean / V_real, with
    softmax = 2^(z log2 e - lse2) (one FMA and one exp2 a column); lse2 = lse log2 e."""
    grad = _exp2(z * LOG2E - lse2) * softmax_scale
    if MEAN_LOGIT:
        grad += flat
    return grad


@triton.jit
def _gaussian(values, target_value, inv_sigma, present):
    """The un-normalised Gaussian target g = exp(-((v - u) / sigma)^2 / 2), 0 off the block."""
    offset = (values - target_value) * inv_sigma
    return tl.where(present, tl.exp(-0.5 * offset * offset), 0.0)


@triton.jit
def _number_block(number_cols_ptr, start, n_numbers, NUMBER_BLOCK: tl.constexpr):
    """Block `start` of the shard's number tokens: (index, present, their local columns)."""
    index = start + tl.arange(0, NUMBER_BLOCK)
    present = index < n_numbers
    return index, present, tl.load(number_cols_ptr + index, mask=present, other=0)


@triton.jit
def _partials_kernel(
    logits_ptr, row_stride, targets_ptr, target_values_ptr, number_cols_ptr, number_values_ptr,
    number_groups_ptr, target_groups_ptr,
    maxima_ptr, sums_ptr, vocab_start, width, real_width, n_numbers, squash_min, squash_scale,
    inv_sigma,
    NUMBERS: tl.constexpr, WASSERSTEIN: tl.constexpr, MEAN_LOGIT: tl.constexpr,
    SQUASH: tl.constexpr, GAUSSIAN: tl.constexpr, SUMS: tl.constexpr, BLOCK: tl.constexpr,
    NUMBER_BLOCK: tl.constexpr, GROUPED: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    row_logits = logits_ptr + row * row_stride
    neg_inf = float("-inf")
    lane_top = tl.full((BLOCK,), LOWEST, tl.float32)
    lane_total = tl.zeros((BLOCK,), tl.float32)
    lane_sum = tl.zeros((BLOCK,), tl.float32)
    whole = real_width // BLOCK * BLOCK
    for start in range(0, whole, BLOCK):
        z = tl.load(row_logits + start + tl.arange(0, BLOCK)).to(tl.float32)
        lane_top, lane_total = _online_exp(z, lane_top, lane_total)
        if MEAN_LOGIT:
            lane_sum += z
    for start in range(whole, real_width, BLOCK):  # the last, partial block
        cols = start + tl.arange(0, BLOCK)
        real = cols < real_width
        z = tl.load(row_logits + cols, mask=cols < width, other=neg_inf).to(tl.float32)
        z = tl.where(real, z, neg_inf)
        lane_top, lane_total = _online_exp(z, lane_top, lane_total)
        if MEAN_LOGIT:
            lane_sum += tl.where(real, z, 0.0)
    top = tl.max(lane_top, axis=0)
    total = tl.sum(lane_total * tl.exp(lane_top - top), axis=0)
    top = tl.where(total > 0.0, top, neg_inf)  # m_r: max over the real columns
    logit_sum = tl.sum(lane_sum, axis=0)

    number_top = tl.full((), neg_inf, tl.float32)  # n_r: max over the number columns
    number_mass = tl.zeros((), tl.float32)  # M = sum_N exp(z - m_r)
    number_total = tl.zeros((), tl.float32)  # Q
    expected = tl.zeros((), tl.float32)  # E
    transport = tl.zeros((), tl.float32)  # W
    gauss_logit = tl.zeros((), tl.float32)  # G = sum_N g z (raw logits: never re-based)
    gauss_total = tl.zeros((), tl.float32)  # Z = sum_N g
    if NUMBERS or GAUSSIAN:
        target_value = tl.load(target_values_ptr + row).to(tl.float32)
        if GROUPED:
            target_group = tl.load(target_groups_ptr + row)
        shift = tl.where(top == neg_inf, 0.0, top)
        for start in range(0, n_numbers, NUMBER_BLOCK):
            index, present, cols = _number_block(number_cols_ptr, start, n_numbers, NUMBER_BLOCK)
            if GROUPED:  # only the number tokens of the row's target group (< 0: all)
                group = tl.load(number_groups_ptr + index, mask=present, other=-2)
                # The broadcast keeps the mask a block of int1 (the interpreter needs it).
                any_group = tl.zeros_like(group) + target_group < 0
                present = present & ((group == target_group) | any_group)
            values = tl.load(number_values_ptr + index, mask=present, other=0.0)
            z = tl.load(row_logits + cols, mask=present, other=neg_inf).to(tl.float32)
            if NUMBERS:
                number_mass += tl.sum(tl.exp(z - shift), axis=0)
                new_top = tl.maximum(number_top, tl.max(z, axis=0))
                number_shift = tl.where(new_top == neg_inf, 0.0, new_top)
                rescale = tl.exp(number_top - number_shift)
                weights = tl.exp(z - number_shift)
                number_total = number_total * rescale + tl.sum(weights, axis=0)
                expected = expected * rescale + tl.sum(weights * values, axis=0)
                if WASSERSTEIN:
                    dist = _distance(values, target_value, SQUASH, squash_min, squash_scale)
                    transport = transport * rescale + tl.sum(weights * dist, axis=0)
                number_top = new_top
            if GAUSSIAN:
                gauss = _gaussian(values, target_value, inv_sigma, present)
                # A -inf logit under a weight that underflowed to 0 adds 0, not NaN.
                gauss_logit += tl.sum(tl.where(gauss > 0.0, gauss * z, 0.0), axis=0)
                gauss_total += tl.sum(gauss, axis=0)

    local_target = tl.load(targets_ptr + row) - vocab_start
    on_shard = (local_target >= 0) & (local_target < real_width)
    target_logit = tl.load(row_logits + tl.where(on_shard, local_target, 0)).to(tl.float32)
    target_logit = tl.where(on_shard, target_logit, 0.0)

    tl.store(maxima_ptr + row * 2, top)
    tl.store(maxima_ptr + row * 2 + 1, number_top)
    out = sums_ptr + row * SUMS
    tl.store(out + 0, total)
    tl.store(out + 1, target_logit)
    tl.store(out + 2, logit_sum)
    tl.store(out + 3, number_total)
    tl.store(out + 4, expected)
    tl.store(out + 5, transport)
    tl.store(out + 6, number_mass)
    if GAUSSIAN:
        tl.store(out + GAUSS_G, gauss_logit)
        tl.store(out + GAUSS_Z, gauss_total)


@triton.jit
def _gradient_kernel(
    logits_ptr, row_stride, grad_ptr, grad_row_stride, stats_ptr, log_q_ptr, grads_ptr,
    targets_ptr, target_values_ptr, number_cols_ptr, number_values_ptr, stash_ptr,
    gauss_scale_ptr, number_groups_ptr, target_groups_ptr,
    vocab_start, width, real_width, n_numbers, inv_real_vocab, squash_min, squash_scale,
    inv_sigma,
    NUMBERS: tl.constexpr, WASSERSTEIN: tl.constexpr, MEAN_LOGIT: tl.constexpr,
    SQUASH: tl.constexpr, GAUSSIAN: tl.constexpr, STATS: tl.constexpr, BLOCK: tl.constexpr,
    NUMBER_BLOCK: tl.constexpr, GROUPED: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    row_logits = logits_ptr + row * row_stride
    row_grad = grad_ptr + row * grad_row_stride
    stats = stats_ptr + row * STATS
    upstream = grads_ptr + row * STATS
    lse = tl.load(stats + 0)
    # A row of -inf logits has lse = -inf: use +inf so that exp(z - lse) = 0, not NaN (as the
    # torch stage does for any non-finite lse).
    lse = tl.where((lse == lse) & (tl.abs(lse) < float("inf")), lse, float("inf"))
    lse2 = lse * LOG2E
    mass = tl.load(stats + 5)
    g_lse = tl.load(upstream + 0)
    g_target = tl.load(upstream + 1)
    g_mean = tl.load(upstream + 2)
    g_mass = tl.load(upstream + 5)
    softmax_scale = g_lse - g_mass * mass
    flat = g_mean * inv_real_vocab
    dtype = grad_ptr.dtype.element_ty
    # The gradient may be written over the logits (grad_ptr == logits_ptr): what the last loop
    # reads, the number tokens' and the target's logits, is stashed before the first loop writes
    # (in memory, not registers: a register held across the loops spills on sm_100).
    local_target = tl.load(targets_ptr + row) - vocab_start
    local_target = tl.where((local_target >= 0) & (local_target < real_width), local_target, -1)
    row_stash = stash_ptr + row * (n_numbers + 1)
    if NUMBERS or GAUSSIAN:
        for start in range(0, n_numbers, NUMBER_BLOCK):
            index, present, cols = _number_block(number_cols_ptr, start, n_numbers, NUMBER_BLOCK)
            z = tl.load(row_logits + cols, mask=present, other=float("-inf")).to(tl.float32)
            tl.store(row_stash + index, z, mask=present)
    tl.store(row_stash + n_numbers,
             tl.load(row_logits + local_target, mask=local_target >= 0, other=0.0))
    tl.debug_barrier()
    whole = real_width // BLOCK * BLOCK
    for start in range(0, whole, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(row_logits + cols).to(tl.float32)
        grad = _softmax_grad(z, lse2, softmax_scale, flat, MEAN_LOGIT)
        tl.store(row_grad + cols, grad.to(dtype))
    for start in range(whole, width, BLOCK):  # the partial block and the vocab padding
        cols = start + tl.arange(0, BLOCK)
        inside = cols < width
        z = tl.load(row_logits + cols, mask=inside, other=float("-inf")).to(tl.float32)
        grad = _softmax_grad(z, lse2, softmax_scale, flat, MEAN_LOGIT)
        tl.store(row_grad + cols, tl.where(cols < real_width, grad, 0.0).to(dtype), mask=inside)

    # The target's and the number tokens' columns are rewritten whole: each store below must
    # land after the loops' store of the same column, which another thread may have made.
    tl.debug_barrier()
    target_hits = tl.zeros((), tl.int32)
    if NUMBERS or GAUSSIAN:
        yhat = tl.load(stats + 3)
        was = tl.load(stats + 4)
        g_yhat = tl.load(upstream + 3)
        g_was = tl.load(upstream + 4)
        log_q = tl.load(log_q_ptr + row)
        if GAUSSIAN:  # d soft / d z_j = q_j = g_j / Z: the upstream gradient of soft, over Z
            g_soft = tl.load(upstream + GAUSS_STAT) * tl.load(gauss_scale_ptr + row)
        target_value = tl.load(target_values_ptr + row).to(tl.float32)
        if GROUPED:
            target_group = tl.load(target_groups_ptr + row)
        for start in range(0, n_numbers, NUMBER_BLOCK):
            index, present, cols = _number_block(number_cols_ptr, start, n_numbers, NUMBER_BLOCK)
            values = tl.load(number_values_ptr + index, mask=present, other=0.0)
            z = tl.load(row_stash + index, mask=present, other=float("-inf"))
            is_target = present & (cols == local_target)
            grad = _softmax_grad(z, lse2, softmax_scale, flat, MEAN_LOGIT)
            grad += tl.where(is_target, g_target, 0.0)
            # Outside the row's target group a number token is in the CE softmax only.
            member = present
            if GROUPED:
                group = tl.load(number_groups_ptr + index, mask=present, other=-2)
                any_group = tl.zeros_like(group) + target_group < 0
                member = present & ((group == target_group) | any_group)
                z = tl.where(member, z, float("-inf"))
            if NUMBERS:
                softmax = _exp2(z * LOG2E - lse2)  # as in _softmax_grad: the compiler shares it
                number_softmax = tl.exp(z - log_q)
                grad += number_softmax * g_yhat * (values - yhat) + softmax * g_mass
                if WASSERSTEIN:
                    dist = _distance(values, target_value, SQUASH, squash_min, squash_scale)
                    grad += number_softmax * g_was * (dist - was)
            if GAUSSIAN:
                grad += _gaussian(values, target_value, inv_sigma, member) * g_soft
            tl.store(row_grad + cols, grad.to(dtype), mask=present)
            target_hits += tl.sum(is_target.to(tl.int32), axis=0)
    if (local_target >= 0) & (target_hits == 0):
        target_logit = tl.load(row_stash + n_numbers)
        grad = _softmax_grad(target_logit, lse2, softmax_scale, flat, MEAN_LOGIT) + g_target
        tl.store(row_grad + local_target, grad.to(dtype))


def launch_flags(numbers: bool, wasserstein: bool, mean_logit: bool, squash: bool,
                 width: int, gaussian: bool = False, grouped: bool = False) -> dict:
    """The constexpr flags and num_warps of both kernels for a shard of `width` columns (the
    variants `kernel_check` compiles ahead of time). Wasserstein needs the numbers, the squash
    needs Wasserstein: flags that change nothing are cleared, so that no variant repeats.
    gaussian: the Gaussian number target (with or without the NTL numbers). grouped: each
    row's number tokens are those of its target's group (digit groups)."""
    block = _block(width)
    wasserstein = numbers and wasserstein
    return {
        "GROUPED": grouped and (numbers or gaussian),
        "NUMBERS": numbers,
        "WASSERSTEIN": wasserstein,
        "MEAN_LOGIT": mean_logit,
        "SQUASH": wasserstein and squash,
        "GAUSSIAN": gaussian,
        "BLOCK": block,
        "NUMBER_BLOCK": NUMBER_BLOCK,
        # Wide blocks keep several fp32 arrays live per thread: more warps, fewer spills.
        "num_warps": 8 if block >= 2048 else 4,
    }


def _flags(plan: Plan) -> dict:
    columns = plan.columns
    has_numbers = plan.shard.number_cols.numel() > 0
    return launch_flags(columns.numbers and has_numbers, columns.wasserstein,
                        columns.mean_logit, _squash(plan)[0], plan.shard.width,
                        columns.gaussian and has_numbers, plan.shard.grouped)


def _groups(plan: Plan, rows: RowChunk) -> tuple[torch.Tensor, torch.Tensor]:
    """(number_groups, target_groups) for the launch; without groups, placeholders the kernels
    never read."""
    shard = plan.shard
    if shard.grouped:
        return shard.number_groups, rows.target_groups.contiguous()
    return shard.number_cols, rows.targets


def _inv_sigma(plan: Plan) -> float:
    return 1.0 / plan.columns.gaussian_sigma if plan.columns.gaussian else 0.0


def triton_partials(
    logits: torch.Tensor, rows: RowChunk, plan: Plan
) -> tuple[torch.Tensor, torch.Tensor]:
    """As statistics.local_partials: logits [t, V/tp] -> maxima fp32 [t, 2], sums fp32
    [t, 7 or 9]. rows: the chunk's targets and target_values. One launch of t programs."""
    tokens, width = logits.shape
    maxima = torch.empty((tokens, 2), dtype=torch.float32, device=logits.device)
    # zeros: a shard without number tokens launches without GAUSSIAN and stores no G, Z.
    sums = torch.zeros((tokens, plan.columns.sum_width), dtype=torch.float32,
                       device=logits.device)
    if tokens == 0:
        return maxima, sums
    logits = _rows_contiguous(logits)
    _, squash_min, squash_scale = _squash(plan)
    shard = plan.shard
    with _on_device(logits):
        _partials_kernel[(tokens,)](
            logits, logits.stride(0), rows.targets, rows.target_values, shard.number_cols,
            shard.number_values, *_groups(plan, rows), maxima, sums, shard.vocab_start, width,
            shard.real_width, shard.number_cols.numel(), squash_min, squash_scale, _inv_sigma(plan),
            SUMS=plan.columns.sum_width, **_flags(plan),
        )
    return maxima, sums


def triton_gradient(logits: torch.Tensor, rows: RowChunk, plan: Plan, out: torch.Tensor) -> None:
    """As statistics.local_gradient, for all V/tp columns: writes the gradient of the chunk's
    logits [t, V/tp] into out [t, V/tp] (any float dtype, rounded once; padding columns get 0).
    rows: the chunk with its fp32 stats [t, 6 or 7], log_q [t], grads [t, 6 or 7] and
    gauss_scale [t] (with the Gaussian target). out may be logits
    itself (the gradient written over them). One launch, and a [t, n + 1] fp32 stash of the
    logits of the n number tokens on this shard and of the target."""
    tokens, width = logits.shape
    if tokens == 0:
        return
    if out.stride(-1) != 1:  # the kernel writes rows of unit stride
        dense = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        triton_gradient(logits, rows, plan, dense)
        out.copy_(dense)
        return
    logits = _rows_contiguous(logits)
    _, squash_min, squash_scale = _squash(plan)
    shard = plan.shard
    flags = _flags(plan)
    numbers = shard.number_cols.numel() if flags["NUMBERS"] or flags["GAUSSIAN"] else 0
    stash = logits.new_empty((tokens, numbers + 1), dtype=torch.float32)
    gauss_scale = rows.gauss_scale if flags["GAUSSIAN"] else rows.log_q
    with _on_device(logits):
        _gradient_kernel[(tokens,)](
            logits, logits.stride(0), out, out.stride(0), rows.stats.contiguous(),
            rows.log_q.contiguous(), rows.grads.contiguous(), rows.targets, rows.target_values,
            shard.number_cols, shard.number_values, stash, gauss_scale.contiguous(),
            *_groups(plan, rows), shard.vocab_start, width, shard.real_width, numbers,
            1.0 / plan.real_vocab, squash_min, squash_scale, _inv_sigma(plan),
            STATS=plan.columns.stat_width, **flags, **GRADIENT_OPTIONS,
        )


def _on_device(logits: torch.Tensor):
    # Triton launches on the current CUDA device: make it the logits' one (any rank layout).
    return torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext()


def _rows_contiguous(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.stride(-1) == 1 else logits.contiguous()
