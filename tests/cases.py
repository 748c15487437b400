"""Deterministic test cases for the objective: full-vocab logits, labels and a number table."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from token_objectives import NumberTable, ObjectiveConfig

# Every objective alone and combined; PDL configs get a weight table in make_case.
CONFIGS = {
    "ce": ObjectiveConfig(ntl=None),
    "was": ObjectiveConfig(ntl="was"),
    "was_squash": ObjectiveConfig(ntl="was", squash_factor=4.0),
    "was_no_reweigh": ObjectiveConfig(ntl="was", reweigh=False),
    "mse": ObjectiveConfig(ntl="mse"),
    "l1": ObjectiveConfig(ntl="l1", reweigh=False),
    "huber": ObjectiveConfig(ntl="huber", huber_delta=2.0),
    "number": ObjectiveConfig(ntl="number"),
    "number_float": ObjectiveConfig(ntl="number", number_level_float=True, reweigh=False),
    "pdl": ObjectiveConfig(ntl=None, pdl_alpha=0.5),
    "label_smoothing": ObjectiveConfig(ntl=None, label_smoothing=0.1),
    "z_loss": ObjectiveConfig(ntl=None, z_loss=1e-2),
    "all": ObjectiveConfig(ntl="was", squash_factor=3.0, pdl_alpha=0.3, label_smoothing=0.05,
                           z_loss=1e-3, ntl_weight=0.7),
    "all_mse_weighted_mean": ObjectiveConfig(ntl="mse", pdl_alpha=1.0,
                                             pdl_normalization="weighted_mean",
                                             label_smoothing=0.1),
    # Gaussian number targets alone, and with NTL-WAS, PDL and label smoothing.
    "gaussian": ObjectiveConfig(ntl=None, gaussian_sigma=1.0),
    "gaussian_was": ObjectiveConfig(ntl="was", gaussian_sigma=0.7, pdl_alpha=0.3,
                                    label_smoothing=0.05, ntl_weight=0.5),
}


@dataclass
class Case:
    name: str
    config: ObjectiveConfig
    numbers: NumberTable
    logits: torch.Tensor  # fp32 [B, S, V], the whole (padded) vocab
    labels: torch.Tensor  # long [B, S]
    upstream: torch.Tensor  # fp32 [B, S], random weights for the backward
    pdl_weights: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


def number_table(vocab: int, real: int, number_ids: list[int], dot_id: int | None = None):
    values = torch.full((vocab,), float("nan"))
    for digit, token_id in enumerate(number_ids):
        values[token_id] = float(digit % 10)
    return NumberTable.from_values(values, valid_vocab_size=real, dot_id=dot_id)


def make_case(
    name: str,
    config: ObjectiveConfig,
    *,
    vocab: int = 64,
    real: int = 61,
    number_ids: list[int] | None = None,
    batch: int = 2,
    seq: int = 24,
    seed: int = 0,
    with_mask: bool = True,
) -> Case:
    """Logits ~ N(0, 3^2); labels mix random ids, digit runs, '.' tokens and ignore_index."""
    gen = torch.Generator().manual_seed(seed)
    number_ids = number_ids if number_ids is not None else [3, 9, 17, 22, 30, 38, 41, 47, 52, 58]
    dot_id = next(i for i in range(real) if i not in number_ids)
    numbers = number_table(vocab, real, number_ids, dot_id)
    logits = torch.randn(batch, seq, vocab, generator=gen) * 3
    logits[..., real:] = torch.randn(batch, seq, vocab - real, generator=gen) * 3 + 5
    labels = torch.randint(0, real, (batch, seq), generator=gen)
    ids = torch.tensor(number_ids)
    # Digit runs, a decimal number "d d . d", and ignored positions.
    labels[0, 2:5] = ids[torch.randint(0, 10, (3,), generator=gen)]
    labels[0, 8:12] = torch.stack([ids[1], ids[4], torch.tensor(dot_id), ids[7]])
    labels[1, 0:2] = ids[torch.randint(0, 10, (2,), generator=gen)]
    labels[1, 5] = ids[9]
    labels[1, 12:14] = config.ignore_index
    upstream = torch.rand(batch, seq, generator=gen) + 0.5
    pdl = None
    if config.pdl_alpha > 0:
        counts = torch.randint(0, 1000, (vocab,), generator=gen).double()
        counts[real:] = 0
        pdl = ((counts + 1) ** -config.pdl_alpha).float()
        pdl = pdl / (pdl * counts).sum() * counts.sum()
    mask = None
    if with_mask:
        mask = (torch.rand(batch, seq, generator=gen) > 0.15).float()
    return Case(name, config, numbers, logits, labels, upstream, pdl, mask)


def all_cases(seq: int = 24) -> list[Case]:
    """Every config, and the layouts that stress the sharding; seq >= 14 (the cases' digit runs
    and ignored positions)."""
    cases = [make_case(name, cfg, seed=i, seq=seq) for i, (name, cfg) in enumerate(CONFIGS.items())]
    # Number tokens on one shard only (ids 0..9 lie in the first quarter of 64).
    cases.append(make_case("numbers_first_shard", CONFIGS["all"], number_ids=list(range(10)),
                           seed=101, seq=seq))
    # ... and only on the last shard, right before the padding.
    cases.append(make_case("numbers_last_shard", CONFIGS["mse"],
                           number_ids=list(range(50, 60)), seed=102, seq=seq))
    # Gaussian targets with NTL, PDL and label smoothing, the number tokens on the last shard:
    # the other shards hold none, and add nothing to the normaliser Z.
    cases.append(make_case("gaussian_numbers_last_shard", CONFIGS["gaussian_was"],
                           number_ids=list(range(50, 60)), seed=104, seq=seq))
    # A vocab where the padding covers a whole shard at TP=4 (real 40 of 64).
    cases.append(make_case("wide_padding", CONFIGS["number"], real=40,
                           number_ids=list(range(20, 30)), seed=103, seq=seq))
    return cases
