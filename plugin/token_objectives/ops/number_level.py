"""Digit runs -> whole numbers, for the number-level NTL (ntloss's NumberLevelLoss semantics).

A run of consecutive digit targets along the sequence is one number; its value is
sum_i digit_i * 10**(run_length - 1 - i). With digit groups (Llama-3's "123 456 7") each token
counts its own digits: sum_i group_i * 10**(digits after token i), so 123|456|7 is 1234567 and
a leading-zero group "007" keeps its place. In float mode a single "." between two digits continues
the run and contributes nothing, so 12.34 reads as 1234, as in ntloss. A digit token that starts
a word ("▁3" in sentencepiece, "Ġ3" in byte-level BPE) starts a new number, so the targets
"▁1 2 ▁3 4" are the two numbers 12 and 34 (ntloss, which knows only bare digits, reads 1234).
The number's value is written at the run's first digit; every other position of the run carries
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DigitRuns:
    """Where numbers start and how each digit is scaled, all [B, S].

    starts: bool, the first digit of each run. scale: 10**exponent at digits, 0 elsewhere.
    run_id: int64 index of each position's run in a flat [B * (S + 1)] table (0-slot per row
    for positions outside every run).
    """

    starts: torch.Tensor
    scale: torch.Tensor
    run_id: torch.Tensor

    def assemble(self, per_digit: torch.Tensor) -> torch.Tensor:
        """[B, S] per-digit values -> [B, S] whole numbers at run starts, 0 elsewhere."""
        scale = self.scale.to(per_digit.dtype)
        contributions = torch.where(scale > 0, per_digit * scale, 0.0).flatten()
        totals = torch.zeros(
            self.run_id.numel() + self.run_id.shape[0],
            dtype=per_digit.dtype,
            device=per_digit.device,
        )
        totals = totals.index_add(0, self.run_id.flatten(), contributions)
        return torch.where(self.starts, totals[self.run_id], 0.0)


def _shift_right(x: torch.Tensor, by: int = 1) -> torch.Tensor:
    out = torch.zeros_like(x)
    if x.shape[-1] > by:
        out[..., by:] = x[..., :-by]
    return out


def _shift_left(x: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    out[..., :-1] = x[..., 1:]
    return out


def digit_runs(
    is_digit: torch.Tensor,
    is_dot: torch.Tensor | None = None,
    max_number_length: int = 20,
    word_start: torch.Tensor | None = None,
    digits: torch.Tensor | None = None,
) -> DigitRuns:
    """is_digit, is_dot, word_start: bool [B, S] over target positions (sequence last).

    is_dot None means integer mode: any non-digit ends a run. word_start marks digits that
    begin a word; each starts a new run. digits: long [B, S], the digits each number token
    holds (None: one each). Exponents are clamped to max_number_length - 1, as in ntloss.
    """
    batch, seq = is_digit.shape
    digit_before = _shift_right(is_digit)
    inner_digit = is_digit if word_start is None else is_digit & ~word_start
    if is_dot is None:
        in_run = is_digit
        continues = digit_before
    else:
        dot_inside = is_dot & digit_before & _shift_left(inner_digit)
        in_run = is_digit | dot_inside
        continues = digit_before | (_shift_right(is_dot) & _shift_right(is_digit, 2))
    if word_start is not None:
        continues = continues & ~word_start
    starts_run = in_run & ~continues
    run_in_row = torch.cumsum(starts_run.long(), dim=-1) * in_run.long()
    row_base = torch.arange(batch, device=is_digit.device).unsqueeze(-1) * (seq + 1)
    run_id = row_base + run_in_row

    slots = batch * (seq + 1)
    width = is_digit.long() if digits is None else torch.where(is_digit, digits.long(), 0)
    digits_per_run = torch.zeros(slots, dtype=torch.long, device=is_digit.device)
    digits_per_run.index_add_(0, run_id.flatten(), width.flatten())
    digits_so_far = torch.cumsum(width, dim=-1)
    # digits_so_far at the run's first position, less its own, counts the digits before the run.
    before_run = torch.zeros(slots, dtype=torch.long, device=is_digit.device)
    before_run[run_id[starts_run]] = digits_so_far[starts_run] - width[starts_run]
    through_token = digits_so_far - before_run[run_id]  # the run's digits up to this token's last
    exponent = (digits_per_run[run_id] - through_token).clamp(0, max_number_length - 1)
    scale = torch.where(is_digit, torch.pow(10.0, exponent.double()), 0.0)
    return DigitRuns(starts=starts_run & is_digit, scale=scale, run_id=run_id)
