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


# The same objectives over digit groups (number_tokens "groups", as Llama-3's 1-3 digit tokens):
# make_case(..., grouped=True) adds 2- and 3-digit number tokens to the digits.
GROUPED_CONFIGS = {
    "groups_was": ObjectiveConfig(ntl="was"),
    "groups_was_squash": ObjectiveConfig(ntl="was", squash_factor=4.0),
    "groups_mse": ObjectiveConfig(ntl="mse"),
    "groups_number": ObjectiveConfig(ntl="number"),
    "groups_number_float": ObjectiveConfig(ntl="number", number_level_float=True),
    "groups_all": ObjectiveConfig(ntl="was", pdl_alpha=0.3, label_smoothing=0.05, z_loss=1e-3,
                                  ntl_weight=0.7),
    "groups_gaussian_was": ObjectiveConfig(ntl="was", gaussian_sigma=30.0, ntl_weight=0.5),
}
# Ids, values and texts of the multi-digit tokens of a grouped case ("007" keeps 3 digits).
GROUP_TOKENS = {5: (10, "10"), 12: (25, "25"), 25: (42, "42"), 33: (50, "50"), 44: (75, "75"),
                55: (99, "99"), 7: (7, "007"), 20: (100, "100"), 28: (202, "202"),
                36: (203, "203"), 49: (456, "456"), 60: (902, "902")}


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


def number_table(vocab: int, real: int, number_ids: list[int], dot_id: int | None = None,
                 grouped: bool = False):
    """Digit d at number_ids[d]; grouped: the GROUP_TOKENS that fit the real vocab too."""
    values = torch.full((vocab,), float("nan"))
    texts = {}
    for digit, token_id in enumerate(number_ids):
        values[token_id] = float(digit % 10)
        texts[token_id] = str(digit % 10)
    if not grouped:
        return NumberTable.from_values(values, valid_vocab_size=real, dot_id=dot_id)
    for token_id, (value, text) in GROUP_TOKENS.items():
        if token_id < real and token_id not in number_ids and token_id != dot_id:
            values[token_id] = float(value)
            texts[token_id] = text
    return NumberTable.from_values(values, valid_vocab_size=real, dot_id=dot_id, grouped=True,
                                   number_token_texts=tuple(texts[i] for i in sorted(texts)))


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
    grouped: bool = False,
) -> Case:
    """Logits ~ N(0, 3^2); labels mix random ids, digit runs, '.' tokens and ignore_index.
    grouped: a table of digit groups; numbers then also run over 3-, 2- and 1-digit tokens."""
    gen = torch.Generator().manual_seed(seed)
    number_ids = number_ids if number_ids is not None else [3, 9, 17, 22, 30, 38, 41, 47, 52, 58]
    dot_id = next(i for i in range(real) if i not in number_ids and i not in GROUP_TOKENS)
    numbers = number_table(vocab, real, number_ids, dot_id, grouped)
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
    if grouped:  # 202|456|7, 42 . 007, 99 then a digit, and 203
        labels[0, 14:17] = torch.tensor([28, 49, number_ids[7]])
        labels[0, 18:21] = torch.tensor([25, dot_id, 7])
        labels[1, 15:17] = torch.tensor([55, number_ids[1]])
        labels[1, 19] = 36
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
    return cases + grouped_cases(seq)


def grouped_cases(seq: int = 24) -> list[Case]:
    """GROUPED_CONFIGS over a table of 1-, 2- and 3-digit tokens; seq >= 21."""
    return [make_case(name, cfg, seed=200 + i, seq=max(seq, 21), grouped=True)
            for i, (name, cfg) in enumerate(GROUPED_CONFIGS.items())]


def case_named(name: str, **kwargs) -> Case:
    """make_case for a name of CONFIGS or of GROUPED_CONFIGS (then over digit groups)."""
    if name in GROUPED_CONFIGS:
        kwargs["seq"] = max(kwargs.get("seq", 24), 21)
        return make_case(name, GROUPED_CONFIGS[name], grouped=True, **kwargs)
    return make_case(name, CONFIGS[name], **kwargs)
