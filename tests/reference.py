"""A plain float64 single-process reference of objective_loss, on the full vocab.

Written for clarity, not speed, and independently of ops/statistics.py: log_softmax over the real
vocab, an explicit distance table as ntloss builds it, and a Python loop over digit runs. The
tests hold every distributed and fused result against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from token_objectives.objectives.loss import ObjectiveConfig, ObjectiveOutput
from token_objectives.tables.numbers import NumberTable


def _distance_table(values: torch.Tensor, squash_factor: float | None) -> torch.Tensor:
    """[N, N] distances between number values; ntloss's squashed lookup when asked."""
    diff = (values[:, None] - values[None, :]).abs()
    if squash_factor is None:
        return diff
    smallest = diff[diff > 0].min()
    largest = diff.max()
    scale = (squash_factor - 1) / (largest - smallest) if largest > smallest else 0.0
    table = 1 + (diff - smallest) * scale
    table[diff == 0] = 0
    return table


def _pointwise(config: ObjectiveConfig, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if config.ntl == "mse":
        return F.mse_loss(a, b, reduction="none")
    if config.ntl == "l1":
        return F.l1_loss(a, b, reduction="none")
    return F.huber_loss(a, b, reduction="none", delta=config.huber_delta)


def _digit_runs(digits: list[bool], dots: list[bool], float_mode: bool,
                starts_word: list[bool]) -> list[list[int]]:
    """One row: the digit positions of each number, walking the sequence left to right. A digit
    that starts a word ("▁3") always opens a new number."""
    runs, t, n = [], 0, len(digits)
    while t < n:
        if not digits[t]:
            t += 1
            continue
        members, u = [t], t + 1
        while u < n:
            if digits[u] and not starts_word[u]:
                members.append(u)
                u += 1
            elif (float_mode and dots[u] and u + 1 < n and digits[u + 1]
                  and not starts_word[u + 1]):
                u += 1  # the dot joins the run but adds nothing
            else:
                break
        runs.append(members)
        t = u
    return runs


def _whole_number(per_digit: torch.Tensor, members: list[int], max_len: int,
                  widths: list[int] | None = None) -> torch.Tensor:
    """sum of each member's value times 10 ** (the digits of the members after it); widths: the
    digits each member holds (one each by default)."""
    widths = widths or [1] * len(members)
    total = 0.0
    for i, p in enumerate(members):
        after = sum(widths[i + 1 :])
        total = total + per_digit[p] * 10.0 ** min(after, max_len - 1)
    return total


def _digits_of(numbers: NumberTable, token_id: int) -> int:
    """Digits a number token holds: 1 in a digit-level table, else its text's (or value's)."""
    if numbers.digit_level:
        return 1
    ids = numbers.number_ids.tolist()
    if numbers.number_token_texts:
        return sum(c.isdigit() for c in numbers.number_token_texts[ids.index(token_id)])
    return len(str(int(numbers.values[token_id].item())))


def _group_mask(numbers: NumberTable, target: torch.Tensor, is_num: torch.Tensor
                ) -> torch.Tensor:
    """bool [..., N]: the number tokens each position's NTL covers. A grouped table: those with
    the target's digit count (every one where the target is no number); else all."""
    ids = numbers.number_ids
    if not numbers.grouped:
        return torch.ones((*target.shape, len(ids)), dtype=torch.bool)
    digits = [len([c for c in text if c.isdigit()]) for text in numbers.number_token_texts]
    if not digits:  # a table built from values: count the integer digits
        digits = [len(str(int(v))) for v in numbers.values[ids].tolist()]
    by_id = dict(zip(ids.tolist(), digits, strict=True))
    wanted = torch.tensor([by_id.get(int(y), -1) for y in target.flatten().tolist()])
    wanted = torch.where(is_num.flatten(), wanted, -1).reshape(target.shape)
    member_digits = torch.tensor(digits)
    return (member_digits == wanted.unsqueeze(-1)) | (wanted.unsqueeze(-1) < 0)


def _target_distribution(target: torch.Tensor, ignored: torch.Tensor, numbers: NumberTable,
                         real: int, sigma: float) -> torch.Tensor:
    """[..., real] float64: the Gaussian over the number tokens' values around the target's
    value where the target is a number token, the one-hot target elsewhere."""
    values = numbers.values.double()[:real]
    u = numbers.values.double()[target]
    is_number_token = ~torch.isnan(values)
    gauss = torch.exp(-((values - u.unsqueeze(-1)) ** 2) / (2 * sigma**2))
    gauss = torch.where(is_number_token, gauss, 0.0)
    if numbers.grouped:  # only the number tokens of the target's digit count
        ids = numbers.number_ids
        covered = torch.zeros((*target.shape, real), dtype=torch.bool)
        covered[..., ids] = _group_mask(numbers, target, ~torch.isnan(u) & ~ignored)
        gauss = torch.where(covered, gauss, 0.0)
    gauss = gauss / gauss.sum(-1, keepdim=True)
    one_hot = F.one_hot(target, real).double()
    is_number = (~torch.isnan(u) & ~ignored).unsqueeze(-1)
    return torch.where(is_number, gauss, one_hot)


def reference_objective_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    config: ObjectiveConfig,
    numbers: NumberTable | None,
    pdl_weights: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    seq_dim: int = -1,
    real_vocab_size: int | None = None,
) -> ObjectiveOutput:
    """logits [..., V] (the whole vocab), labels [...]; float64 results, ObjectiveOutput.

    Columns at or past the real vocab (the table's valid_vocab_size, else real_vocab_size, else
    V) are padding and left out of every softmax."""
    x = logits.double()
    vocab = x.shape[-1]
    if numbers is not None:
        real = numbers.valid_vocab_size
    else:
        real = real_vocab_size if real_vocab_size is not None else vocab
    ignored = labels == config.ignore_index
    target = labels.masked_fill(ignored, 0).long()
    x_real = x[..., :real]
    log_probs = torch.log_softmax(x_real, dim=-1)
    ce = -log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    trained = ce
    if config.gaussian_sigma > 0:
        distribution = _target_distribution(target, ignored, numbers, real, config.gaussian_sigma)
        trained = -(distribution * log_probs).sum(-1)
        if config.label_smoothing > 0:
            eps = config.label_smoothing
            trained = (1 - eps) * trained - eps * log_probs.mean(-1)
    elif config.label_smoothing > 0:
        trained = F.cross_entropy(
            x_real.reshape(-1, real),
            target.flatten(),
            reduction="none",
            label_smoothing=config.label_smoothing,
        ).reshape(labels.shape)
    weight = torch.ones_like(ce)
    if pdl_weights is not None:
        weight = pdl_weights.double()[target]
    loss = weight * trained
    if config.z_loss > 0:
        loss = loss + config.z_loss * torch.logsumexp(x_real, dim=-1) ** 2

    ntl = torch.zeros_like(ce)
    positions = torch.zeros_like(ignored)
    if config.ntl is not None:
        ids = numbers.number_ids
        values = numbers.values[ids].double()
        u = numbers.values.double()[target]
        is_num = ~torch.isnan(u) & ~ignored
        u = torch.where(is_num, u, 0.0)
        covered = _group_mask(numbers, target, is_num)
        p_numbers = torch.softmax(x[..., ids].masked_fill(~covered, float("-inf")), dim=-1)
        mass = (torch.softmax(x_real, dim=-1)[..., ids] * covered).sum(-1)
        yhat = p_numbers @ values
        if config.ntl == "was":
            table = _distance_table(values, config.squash_factor)
            column = {v: i for i, v in enumerate(values.tolist())}
            rows = torch.stack(
                [
                    table[column[float(v)]] if ok else torch.zeros_like(values)
                    for v, ok in zip(u.flatten().tolist(), is_num.flatten().tolist(), strict=True)
                ]
            )
            raw = (p_numbers.reshape(-1, len(ids)) * rows).sum(-1).reshape(labels.shape)
            # The largest distance among the number tokens each position covers.
            max_d = torch.stack([
                table[m][:, m].max() for m in covered.reshape(-1, len(ids))
            ]).reshape(labels.shape)
            positions = is_num
        elif config.ntl in ("mse", "l1", "huber"):
            raw = _pointwise(config, yhat, u)
            spread = torch.stack([
                torch.stack([values[m].min(), values[m].max()])
                for m in covered.reshape(-1, len(ids))
            ]).reshape(*labels.shape, 2)
            lo, hi = spread.unbind(-1)
            max_d = torch.maximum(
                _pointwise(config, lo, hi).abs(), _pointwise(config, hi, lo).abs()
            )
            positions = is_num
        else:
            lab = labels.movedim(seq_dim, -1)
            shape = lab.shape
            flat_num = is_num.movedim(seq_dim, -1).reshape(-1, shape[-1])
            flat_u = u.movedim(seq_dim, -1).reshape(-1, shape[-1])
            flat_yhat = yhat.movedim(seq_dim, -1).reshape(-1, shape[-1])
            flat_lab = lab.reshape(-1, shape[-1])
            raw_rows = torch.zeros_like(flat_u)
            pos_rows = torch.zeros_like(flat_num)
            for r in range(flat_u.shape[0]):
                dots = [
                    numbers.dot_id is not None and int(v) == numbers.dot_id
                    for v in flat_lab[r].tolist()
                ]
                starts = [
                    bool(ok) and numbers.word_start is not None
                    and bool(numbers.word_start[int(v)])
                    for v, ok in zip(flat_lab[r].tolist(), flat_num[r].tolist(), strict=True)
                ]
                runs = _digit_runs(flat_num[r].tolist(), dots, config.number_level_float, starts)
                for members in runs:
                    widths = [_digits_of(numbers, int(flat_lab[r, p])) for p in members]
                    true = _whole_number(flat_u[r], members, config.max_number_length, widths)
                    guess = _whole_number(flat_yhat[r], members, config.max_number_length,
                                          widths)
                    raw_rows[r, members[0]] = (guess - true).abs() / (
                        guess.abs() + true.abs() + torch.finfo(torch.float32).eps
                    )
                    pos_rows[r, members[0]] = True
            raw = raw_rows.reshape(shape).movedim(-1, seq_dim)
            positions = pos_rows.reshape(shape).movedim(-1, seq_dim)
            max_d = torch.tensor(1.0, dtype=torch.float64)
        if config.reweigh:
            raw = raw * mass + 1.01 * max_d * (1 - mass)
        ntl = torch.where(positions, raw, 0.0)
        loss = loss + config.ntl_weight * ntl

    counted = ~ignored
    scale = torch.ones_like(ce)
    if loss_mask is not None:
        counted = counted & (loss_mask != 0)
        scale = loss_mask.double()

    def keep(t: torch.Tensor) -> torch.Tensor:
        return torch.where(counted, t, 0.0) * scale

    predicted = mass_kept = None
    if config.ntl is not None:
        predicted = torch.where(counted, yhat, 0.0)
        mass_kept = torch.where(counted, mass, 0.0)
    return ObjectiveOutput(
        loss=keep(loss),
        ce=keep(ce),
        ntl=keep(ntl),
        ntl_positions=positions & counted,
        weight=torch.where(counted, weight, 0.0),
        counted=counted,
        predicted_number=predicted,
        number_mass=mass_kept,
    )
