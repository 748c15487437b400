"""ObjectiveOutput and the composition of CE + NTL + PDL on the fused statistics (the math that
`Objective` runs: targets looked up and checked, then the per-token terms).

Per token t with target y (global id) and PDL weight w[y] (1 without PDL):

    loss_t = w[y] * ((1 - eps) * ce + eps * smooth) + z * lse**2 + lambda * [y is a number] * ntl

ce = lse - z_y; smooth = lse - mean_j z_j over the real vocab (PyTorch's label smoothing, taken
over the GLOBAL vocab, so it is the same at every TP size); ntl is one of ntloss's flavours.
With gaussian_sigma > 0 the ce of a number target in that sum is lse - soft = -sum_j q_j log p_j
(the Gaussian target over the number tokens, ObjectiveConfig.gaussian_sigma); the reported ce
stays plain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from token_objectives.objectives.config import ObjectiveConfig
from token_objectives.objectives.device_tables import DeviceTables
from token_objectives.ops.layout import layout_problem, resolve_layout
from token_objectives.ops.number_level import digit_runs
from token_objectives.ops.plan import (
    GAUSSIAN_STATISTIC,
    Columns,
    Distance,
    LabelCheck,
    VocabShard,
)
from token_objectives.tables.numbers import NumberTable

# ntloss's symmetric-MAPE denominator guard: float32 machine epsilon, whatever the dtype.
SMAPE_EPS = torch.finfo(torch.float32).eps
REWEIGH_MARGIN = 1.01


@dataclass(frozen=True)
class ObjectiveOutput:
    """Per-token results, each of labels' shape [...]; zero where the token is not counted.

    loss: the combined per-token loss to sum. ce: plain cross-entropy (no smoothing, z-loss or
    PDL weight), for perplexity. ntl: the NTL term before lambda, 0 where the target is not a
    number. ntl_positions: bool, where an NTL term is counted (for "number": the first digit of each
    number). weight: the PDL weight w[y] (1 without PDL), not scaled by loss_mask. counted:
    bool, the tokens counted (a target and loss_mask != 0).

    With NTL on (None otherwise), from the statistics the loss already gathered (no further
    collective), at every counted token whatever its target, 0 elsewhere and not scaled by the
    loss mask:
    predicted_number: the expected value y-hat = sum_j pN_j v_j under the softmax over the
        number tokens only (ntloss's `predict_numbers`; per digit for digit-level tokens).
    number_mass: the probability the full softmax puts on number tokens.
    """

    loss: torch.Tensor
    ce: torch.Tensor
    ntl: torch.Tensor
    ntl_positions: torch.Tensor
    weight: torch.Tensor
    counted: torch.Tensor
    predicted_number: torch.Tensor | None = None
    number_mass: torch.Tensor | None = None

    TOTAL_NAMES = ("loss", "tokens", "ce", "ntl", "number_tokens", "weight")

    @property
    def is_number(self) -> torch.Tensor:
        """The former name of `ntl_positions` (for ntl="number" it marks numbers, not number
        tokens); kept for code written against it."""
        return self.ntl_positions

    def totals(self) -> torch.Tensor:
        """fp32 [6]: sums of loss, counted tokens, ce, ntl, number tokens, weight.

        Counted tokens are positions with a target and loss_mask != 0, the one definition of a
        counted token that both loops normalise by; loss, ce and ntl are scaled by loss_mask,
        the weight is not, so its sum is the weighted_mean denominator: w summed over the
        counted tokens.

        One all-reduce of this vector over DP gives every global normaliser.
        """
        return torch.stack(
            [
                self.loss.sum(dtype=torch.float32),
                self.counted.sum(dtype=torch.float32),
                self.ce.sum(dtype=torch.float32),
                self.ntl.sum(dtype=torch.float32),
                self.ntl_positions.sum(dtype=torch.float32),
                self.weight.sum(dtype=torch.float32),
            ]
        )


def _check_labels(labels: torch.Tensor, ignored: torch.Tensor, real_vocab: int, padded: int,
                  raise_now: bool) -> LabelCheck:
    """Labels must be real token ids or ignore_index. Without TP (raise_now) a bad label raises
    here; under TP the check travels to the MAX all-reduce and raises on every rank there."""
    bad = ~ignored & ((labels < 0) | (labels >= real_vocab))
    if labels.is_cuda:
        # No host sync on the GPU; the error surfaces at the next synchronisation.
        if raise_now:
            torch._assert_async(~bad.any(), f"labels must be in [0, {real_vocab}) or ignore_index")
            return LabelCheck()
        return LabelCheck(bad=bad.any())
    if not bad.any():
        return LabelCheck()
    value = int(labels[bad][0])
    where = "in the vocab padding" if real_vocab <= value < padded else "out of range"
    message = (
        f"label {value} is {where}: labels must be token ids in [0, {real_vocab}) or "
        f"ignore_index; check the tokenizer/vocab size the data was built with, and mark "
        f"positions without a target with ignore_index"
    )
    if raise_now:
        raise ValueError(message)
    return LabelCheck(bad=torch.ones((), dtype=torch.float32), message=message)


def _ntl_term(
    config: ObjectiveConfig,
    numbers: NumberTable,
    distance: Distance,
    yhat: torch.Tensor,
    was: torch.Tensor,
    mass: torch.Tensor,
    target_values: torch.Tensor,
    is_number: torch.Tensor,
    labels: torch.Tensor,
    targets: torch.Tensor,
    seq_dim: int,
    tables: DeviceTables,
    target_groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ntl [...], positions bool [...]) before lambda; ntl is 0 outside positions.

    target_groups [...] (grouped tables): reweigh's largest distance is that of the target's
    group, the number tokens its softmax covered."""
    if config.ntl == "number":
        return _number_level_term(
            config, numbers, yhat, mass, target_values, is_number, labels, targets, seq_dim,
            tables,
        )
    if target_groups is not None:
        bounds = tables.group_bounds_for(numbers, yhat.device)
        bounds = bounds[target_groups.clamp(min=0).long()]
        low, high = bounds.to(yhat.dtype).unbind(-1)
    if config.ntl == "was":
        raw = was
        if target_groups is None:
            max_distance = tables.max_distance_for(numbers, distance)
        else:
            spread = (high - low).unsqueeze(-1)
            max_distance = distance(spread, torch.zeros_like(spread)).squeeze(-1)
    else:
        if target_groups is None:
            values = numbers.values[numbers.is_number].to(yhat.dtype)
            low, high = values.min(), values.max()
        raw = _pointwise(config, yhat, target_values)
        max_distance = torch.maximum(
            _pointwise(config, low, high).abs(), _pointwise(config, high, low).abs()
        )
    if config.reweigh:
        raw = raw * mass + REWEIGH_MARGIN * max_distance * (1 - mass)
    return torch.where(is_number, raw, torch.zeros_like(raw)), is_number


def _pointwise(config: ObjectiveConfig, prediction: torch.Tensor, target: torch.Tensor):
    if config.ntl == "mse":
        return (prediction - target) ** 2
    if config.ntl == "l1":
        return (prediction - target).abs()
    return F.huber_loss(prediction, target, reduction="none", delta=config.huber_delta)


def _number_level_term(config, numbers, yhat, mass, target_values, is_number, labels, targets,
                       seq_dim, tables):
    if numbers.mode == "multi":
        raise ValueError(
            "ntl='number' assembles numbers from digits or digit groups, each in its place: "
            "number_tokens='multi' compares tokens of every length by value, so a token has no "
            "place; use number_tokens='auto' (or 'groups' / 'digit', --number-tokens)"
        )
    if config.number_level_float and numbers.dot_id is None:
        raise ValueError(
            "number_level_float needs a '.' token in the vocabulary; the tokenizer has none"
        )
    if yhat.numel() == 0:
        return torch.zeros_like(yhat), torch.zeros_like(is_number)
    to_rows = lambda x: x.movedim(seq_dim, -1)  # noqa: E731
    flat = lambda x: to_rows(x).reshape(-1, x.shape[seq_dim])  # noqa: E731
    # labels, not targets: an ignored position is never a dot, whatever the dot's id.
    is_dot = flat(labels == numbers.dot_id) if config.number_level_float else None
    word_start = None
    if numbers.word_start is not None:
        word_start = flat(tables.on_device(numbers.word_start, labels.device)[targets]
                          & is_number)
    digits = None
    if not numbers.digit_level:  # digit groups: a group shifts the groups before it by its size
        digits = flat(tables.on_device(numbers.digit_counts, labels.device)[targets]
                      * is_number)
    runs = digit_runs(flat(is_number), is_dot, config.max_number_length, word_start, digits)
    truth = runs.assemble(flat(target_values).to(yhat.dtype))
    guess = runs.assemble(flat(yhat))
    raw = (guess - truth).abs() / (guess.abs() + truth.abs() + SMAPE_EPS)
    if config.reweigh:
        raw = raw * flat(mass) + REWEIGH_MARGIN * (1 - flat(mass))
    raw = torch.where(runs.starts, raw, torch.zeros_like(raw))
    shape = to_rows(yhat).shape
    back = lambda x: x.reshape(shape).movedim(-1, seq_dim)  # noqa: E731
    return back(raw), back(runs.starts)


@dataclass(frozen=True)
class PreparedTargets:
    """Targets checked and looked up once, for the fused statistics and the composition."""

    shard: VocabShard
    real_vocab: int
    columns: Columns
    distance: Distance
    targets: torch.Tensor  # long [...], ignored positions -> 0
    target_values: torch.Tensor  # [...] value of the target, 0 where not a number
    is_number_target: torch.Tensor  # bool [...]
    counted: torch.Tensor  # bool [...]
    tables: DeviceTables  # the objective's device copies
    label_check: LabelCheck = LabelCheck()  # raised after the MAX all-reduce under TP
    # int32 [...] with a grouped table: the target's digit count, -1 where it is no number.
    target_groups: torch.Tensor | None = None

    def flat_target_groups(self) -> torch.Tensor | None:
        return None if self.target_groups is None else self.target_groups.flatten()


def prepare_targets(
    labels: torch.Tensor,
    config: ObjectiveConfig,
    numbers: NumberTable | None,
    pdl_weights: torch.Tensor | None,
    tp_group: dist.ProcessGroup | None,
    width: int,
    device: torch.device,
    loss_mask: torch.Tensor | None,
    tables: DeviceTables,
    *,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    real_vocab_size: int | None = None,
) -> PreparedTargets:
    """Validate the inputs against a vocab shard `width` columns wide; look the targets up.

    tp_group: a group of more than one rank, or None. Without one, a bad layout or label raises
    here; under TP both are checked on the gathered layouts after the MAX all-reduce.
    """
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    tp_size = 1 if tp_group is None else dist.get_world_size(tp_group)
    tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)
    layout = resolve_layout(
        width, tp_rank, tp_size, vocab_start=vocab_start, vocab_size=vocab_size,
        real_vocab_size=real_vocab_size,
        table_size=numbers.vocab_size if numbers is not None else None,
        table_real=numbers.valid_vocab_size if numbers is not None else None,
    )
    if tp_group is None:
        problem = layout_problem([[layout.vocab_start, layout.width, layout.vocab_size,
                                   layout.real_vocab, 0]], layout.source)
        if problem is not None:
            raise ValueError(problem)
    shard = tables.shard_of(numbers, layout, device)
    padded_vocab, real_vocab = layout.vocab_size, layout.real_vocab
    if pdl_weights is not None and pdl_weights.numel() != padded_vocab:
        raise ValueError(
            f"pdl_weights has {pdl_weights.numel()} entries but the vocab has {padded_vocab}; "
            f"count frequencies with --vocab-size {padded_vocab}"
        )

    ignored = labels == config.ignore_index
    label_check = _check_labels(labels, ignored, real_vocab, padded_vocab,
                                raise_now=tp_group is None)
    counted = ~ignored
    if loss_mask is not None:
        _check_loss_mask(loss_mask, labels)
        counted = counted & (loss_mask != 0)
    targets = torch.where(ignored, torch.zeros_like(labels), labels).long()

    target_groups = None
    if config.uses_numbers:  # NTL or the Gaussian target
        values = tables.on_device(numbers.values, device)[targets]
        is_number_target = ~torch.isnan(values) & ~ignored
        target_values = torch.where(is_number_target, values, torch.zeros_like(values))
        if numbers.grouped:
            groups = tables.on_device(numbers.digit_counts, device)[targets]
            target_groups = torch.where(is_number_target, groups, -1).to(torch.int32)
    else:
        is_number_target = torch.zeros_like(ignored)
        target_values = torch.zeros(labels.shape, device=device)
    columns = Columns(
        numbers=config.ntl is not None,
        wasserstein=config.ntl == "was",
        mean_logit=config.label_smoothing > 0,
        gaussian_sigma=config.gaussian_sigma,
    )
    distance = Distance()
    if config.ntl is not None:
        distance = tables.distance_for(numbers, config.squash_factor)
    return PreparedTargets(shard, real_vocab, columns, distance, targets, target_values,
                           is_number_target, counted, tables, label_check, target_groups)


def _check_loss_mask(loss_mask: torch.Tensor, labels: torch.Tensor) -> None:
    if loss_mask.shape != labels.shape:
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must have labels' shape")
    if loss_mask.dtype == torch.bool:
        return
    # NaN fails the comparison too: a mask must be a finite weight >= 0.
    bad = ~(loss_mask >= 0) | torch.isinf(loss_mask)
    message = ("loss_mask must hold finite weights >= 0 (1 counts a token, 0 skips it); a "
               "negative or NaN entry would subtract or poison the loss")
    if loss_mask.is_cuda:
        torch._assert_async(~bad.any(), message)
    elif bad.any():
        value = loss_mask[bad][0].item()
        raise ValueError(f"{message}; got {value}")


def compose(
    stats: torch.Tensor,
    prep: PreparedTargets,
    labels: torch.Tensor,
    config: ObjectiveConfig,
    numbers: NumberTable | None,
    pdl_weights: torch.Tensor | None,
    loss_mask: torch.Tensor | None,
    seq_dim: int,
) -> ObjectiveOutput:
    """Statistics [T, 6] ([T, 7] with the Gaussian target) -> the per-token objectives of
    labels' shape (plain torch, autograd)."""
    lse, target_logit, mean_logit, yhat, was, mass = (
        s.reshape(labels.shape) for s in stats[:, :6].unbind(-1)
    )
    zero = torch.zeros((), dtype=stats.dtype, device=stats.device)
    counted, targets = prep.counted, prep.targets

    ce = lse - target_logit
    trained_ce = ce
    if prep.columns.gaussian:
        # The Gaussian target replaces the one-hot term of number targets only; where() keeps
        # the soft statistic of the others (computed around u = 0) out of the gradient.
        soft = stats[:, GAUSSIAN_STATISTIC].reshape(labels.shape)
        trained_ce = torch.where(prep.is_number_target, lse - soft, ce)
    if config.label_smoothing > 0:
        eps = config.label_smoothing
        trained_ce = (1 - eps) * trained_ce + eps * (lse - mean_logit)
    if pdl_weights is not None:
        weight = prep.tables.on_device(pdl_weights, stats.device, stats.dtype)[targets]
        loss = weight * trained_ce
    else:
        weight = torch.ones_like(ce)
        loss = trained_ce
    if config.z_loss > 0:
        loss = loss + config.z_loss * torch.where(counted, lse, 0.0).square()

    if config.ntl is not None:
        ntl, ntl_positions = _ntl_term(
            config,
            numbers,
            prep.distance,
            yhat,
            was,
            mass,
            prep.target_values.to(stats.dtype),
            prep.is_number_target,
            labels,
            targets,
            seq_dim,
            prep.tables,
            prep.target_groups,
        )
        loss = loss + config.ntl_weight * ntl
    else:
        ntl, ntl_positions = torch.zeros_like(ce), torch.zeros_like(prep.is_number_target)

    scale = loss_mask.to(stats.dtype) if loss_mask is not None else None

    def keep(x: torch.Tensor) -> torch.Tensor:
        # where(), not a product: an ignored token's statistics may be inf.
        x = torch.where(counted, x, zero)
        return x * scale if scale is not None else x

    predicted = mass_out = None
    if config.ntl is not None:
        predicted = torch.where(counted, yhat, zero)
        mass_out = torch.where(counted, mass, zero)
    return ObjectiveOutput(
        loss=keep(loss),
        ce=keep(ce),
        ntl=keep(ntl),
        ntl_positions=ntl_positions & counted,
        weight=torch.where(counted, weight, zero),
        counted=counted,
        predicted_number=predicted,
        number_mass=mass_out,
    )
