"""Triton kernels for the objective's two per-shard stages: the forward partial sums
(`triton_partials`, the kernel of `statistics.local_partials`) and the logit gradient
(`triton_gradient`, the kernel of `statistics.local_gradient`).

One program per token row. Forward reads the row once with an online max (the running sums are
re-based whenever the row's max grows); backward reads it once and writes the gradient once, in
the logits' dtype, padding columns included. Accumulation is fp32 whatever the logits' dtype.
The math, the column layout of the [T, 7] sums and the [T, 6] statistics are those of
statistics.py, whose torch stages are the reference these kernels are tested against (on CPU
with TRITON_INTERPRET=1). No communication here; imports torch, triton and `plan` only.

Number tokens are read from a dense [V/tp] value row (NaN = not a number), so the kernels need
no gather and the number terms ride along the same pass over the logits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from token_objectives.ops.plan import NUM_STATISTICS, SUM_COLUMNS, Plan, RowChunk

# Columns per block: a power of two, large enough to keep each row's loop short on 128k vocabs.
MAX_BLOCK = 4096


def dense_number_values(plan: Plan, device: torch.device) -> torch.Tensor:
    """fp32 [V/tp] value of each local column, NaN where the column is not a number token."""
    shard = plan.shard
    values = torch.full((shard.width,), float("nan"), dtype=torch.float32, device=device)
    if plan.columns.numbers and shard.number_cols.numel() > 0:
        values[shard.number_cols.to(device)] = shard.number_values.to(device)
    return values


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
def _partials_kernel(
    logits_ptr, row_stride, targets_ptr, target_values_ptr, values_ptr, maxima_ptr, sums_ptr,
    vocab_start, real_width, squash_min, squash_scale,
    NUMBERS: tl.constexpr, WASSERSTEIN: tl.constexpr, MEAN_LOGIT: tl.constexpr,
    SQUASH: tl.constexpr, SUMS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_logits = logits_ptr + row * row_stride
    neg_inf = float("-inf")
    top = tl.full((), neg_inf, tl.float32)  # m_r: max over the real columns
    total = tl.zeros((), tl.float32)  # S = sum exp(z - m_r)
    number_mass = tl.zeros((), tl.float32)  # M = sum_N exp(z - m_r)
    logit_sum = tl.zeros((), tl.float32)
    number_top = tl.full((), neg_inf, tl.float32)  # n_r: max over the number columns
    number_total = tl.zeros((), tl.float32)  # Q
    expected = tl.zeros((), tl.float32)  # E
    transport = tl.zeros((), tl.float32)  # W
    target_value = tl.load(target_values_ptr + row).to(tl.float32)
    for start in range(0, real_width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < real_width
        z = tl.load(row_logits + cols, mask=inside, other=neg_inf).to(tl.float32)
        new_top = tl.maximum(top, tl.max(z, axis=0))
        # A row (so far) of -inf has no finite max to shift by: shift by 0, every term is 0.
        shift = tl.where(new_top == neg_inf, 0.0, new_top)
        rescale = tl.exp(top - shift)
        weights = tl.exp(z - shift)
        total = total * rescale + tl.sum(weights, axis=0)
        if MEAN_LOGIT:
            logit_sum += tl.sum(tl.where(inside, z, 0.0), axis=0)
        if NUMBERS:
            values = tl.load(values_ptr + cols, mask=inside, other=float("nan"))
            is_number = values == values
            number_mass = number_mass * rescale + tl.sum(tl.where(is_number, weights, 0.0), 0)
            number_z = tl.where(is_number, z, neg_inf)
            new_number_top = tl.maximum(number_top, tl.max(number_z, axis=0))
            number_shift = tl.where(new_number_top == neg_inf, 0.0, new_number_top)
            number_rescale = tl.exp(number_top - number_shift)
            number_weights = tl.exp(number_z - number_shift)
            safe_values = tl.where(is_number, values, 0.0)
            number_total = number_total * number_rescale + tl.sum(number_weights, axis=0)
            expected = expected * number_rescale + tl.sum(number_weights * safe_values, axis=0)
            if WASSERSTEIN:
                dist = _distance(safe_values, target_value, SQUASH, squash_min, squash_scale)
                transport = transport * number_rescale + tl.sum(
                    tl.where(is_number, number_weights * dist, 0.0), axis=0)
            number_top = new_number_top
        top = new_top

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


@triton.jit
def _gradient_kernel(
    logits_ptr, row_stride, grad_ptr, grad_row_stride, stats_ptr, log_q_ptr, grads_ptr,
    targets_ptr, target_values_ptr, values_ptr,
    vocab_start, width, real_width, inv_real_vocab, squash_min, squash_scale,
    NUMBERS: tl.constexpr, WASSERSTEIN: tl.constexpr, MEAN_LOGIT: tl.constexpr,
    SQUASH: tl.constexpr, STATS: tl.constexpr, BLOCK: tl.constexpr,
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
    yhat = tl.load(stats + 3)
    was = tl.load(stats + 4)
    mass = tl.load(stats + 5)
    g_lse = tl.load(upstream + 0)
    g_target = tl.load(upstream + 1)
    g_mean = tl.load(upstream + 2)
    g_yhat = tl.load(upstream + 3)
    g_was = tl.load(upstream + 4)
    g_mass = tl.load(upstream + 5)
    softmax_scale = g_lse - g_mass * mass
    log_q = tl.load(log_q_ptr + row)
    target_value = tl.load(target_values_ptr + row).to(tl.float32)
    local_target = tl.load(targets_ptr + row) - vocab_start
    local_target = tl.where((local_target >= 0) & (local_target < real_width), local_target, -1)
    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        real = cols < real_width
        z = tl.load(row_logits + cols, mask=real, other=float("-inf")).to(tl.float32)
        softmax = tl.exp(z - lse)
        grad = softmax * softmax_scale
        if MEAN_LOGIT:
            grad += g_mean * inv_real_vocab
        grad += tl.where(cols == local_target, g_target, 0.0)
        if NUMBERS:
            values = tl.load(values_ptr + cols, mask=real, other=float("nan"))
            is_number = values == values
            safe_values = tl.where(is_number, values, 0.0)
            number_softmax = tl.exp(z - log_q)
            number_grad = number_softmax * g_yhat * (safe_values - yhat) + softmax * g_mass
            if WASSERSTEIN:
                dist = _distance(safe_values, target_value, SQUASH, squash_min, squash_scale)
                number_grad += number_softmax * g_was * (dist - was)
            grad += tl.where(is_number, number_grad, 0.0)
        grad = tl.where(real, grad, 0.0)
        tl.store(row_grad + cols, grad.to(grad_ptr.dtype.element_ty), mask=cols < width)


def _flags(plan: Plan) -> dict:
    squash, _, _ = _squash(plan)
    columns = plan.columns
    return {
        "NUMBERS": columns.numbers and plan.shard.number_cols.numel() > 0,
        "WASSERSTEIN": columns.wasserstein,
        "MEAN_LOGIT": columns.mean_logit,
        "SQUASH": squash,
        "BLOCK": _block(plan.shard.width),
        # Wide blocks keep several fp32 arrays live per thread: more warps, fewer spills.
        "num_warps": 8 if _block(plan.shard.width) >= 2048 else 4,
    }


def triton_partials(
    logits: torch.Tensor, rows: RowChunk, plan: Plan, number_values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """As statistics.local_partials: logits [t, V/tp] -> maxima fp32 [t, 2], sums fp32 [t, 7].
    rows: the chunk's targets and target_values. number_values: `dense_number_values`."""
    tokens = logits.shape[0]
    maxima = torch.empty((tokens, 2), dtype=torch.float32, device=logits.device)
    sums = torch.empty((tokens, SUM_COLUMNS), dtype=torch.float32, device=logits.device)
    if tokens == 0:
        return maxima, sums
    logits = _rows_contiguous(logits)
    _, squash_min, squash_scale = _squash(plan)
    shard = plan.shard
    _partials_kernel[(tokens,)](
        logits, logits.stride(0), rows.targets, rows.target_values, number_values, maxima, sums,
        shard.vocab_start, shard.real_width, squash_min, squash_scale,
        SUMS=SUM_COLUMNS, **_flags(plan),
    )
    return maxima, sums


def triton_gradient(
    logits: torch.Tensor,
    rows: RowChunk,
    plan: Plan,
    number_values: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """As statistics.local_gradient, for all V/tp columns: writes the gradient of the chunk's
    logits [t, V/tp] into out [t, V/tp] (any float dtype, rounded once; padding columns get 0).
    rows: the chunk with its fp32 stats [t, 6], log_q [t] and grads [t, 6]."""
    tokens, width = logits.shape
    if tokens == 0:
        return
    if out.stride(-1) != 1:  # the kernel writes rows of unit stride
        dense = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        triton_gradient(logits, rows, plan, number_values, dense)
        out.copy_(dense)
        return
    logits = _rows_contiguous(logits)
    _, squash_min, squash_scale = _squash(plan)
    shard = plan.shard
    _gradient_kernel[(tokens,)](
        logits, logits.stride(0), out, out.stride(0), rows.stats.contiguous(),
        rows.log_q.contiguous(), rows.grads.contiguous(), rows.targets, rows.target_values,
        number_values, shard.vocab_start, width, shard.real_width, 1.0 / plan.real_vocab,
        squash_min, squash_scale, STATS=NUM_STATISTICS, **_flags(plan),
    )


def _rows_contiguous(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.stride(-1) == 1 else logits.contiguous()
