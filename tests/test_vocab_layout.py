"""Uneven vocab shards (DeepSpeed AutoTP when TP does not divide V), padding without a table, and
layout / label errors that every rank raises together, in real gloo processes.

Every result is held against the float64 single-process reference on the whole vocab
(`reference.py`), or against torch's own cross-entropy.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from cases import CONFIGS, Case, make_case
from dist_pool import counted_collectives, in_tp_group, tp_group
from reference import reference_objective_loss

from token_objectives import fused_linear_objective_loss, objective_loss

VOCAB, REAL = 61, 58
NUMBER_IDS = [3, 9, 17, 22, 30, 38, 41, 47, 52, 56]
# (TP size, columns per rank): neither divides the vocab evenly.
LAYOUTS = {"tp2_31_30": (2, [31, 30]), "tp3_25_17_19": (3, [25, 17, 19])}
HIDDEN = 8


def _cases() -> list[Case]:
    cases = []
    for i, (name, config) in enumerate(CONFIGS.items()):
        case = make_case(name, config, vocab=VOCAB, real=REAL, number_ids=NUMBER_IDS,
                         seed=200 + i)
        if not config.uses_numbers:
            case.numbers = None  # CE / PDL runs need no table: the padding comes from real_vocab
        cases.append(case)
    return cases


def _hidden_and_weight(case: Case):
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(*case.labels.shape, HIDDEN, generator=gen)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen)
    weight[REAL:] += 3.0  # padding rows with large logits: wrong if they enter the softmax
    return hidden, weight


def _detached(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach()


def run_uneven(tp_size: int, widths: list[int], cases: list[Case], fused: bool):
    if not in_tp_group(tp_size):
        return None
    group = tp_group(tp_size)
    rank = dist.get_rank(group)
    start, width = sum(widths[:rank]), widths[rank]
    results = []
    for case in cases:
        layout = {"vocab_start": start, "vocab_size": VOCAB, "real_vocab_size": REAL}
        if fused:
            hidden, weight = _hidden_and_weight(case)
            leaf = hidden.clone().requires_grad_()
            local = weight[start:start + width].clone().requires_grad_()
            with counted_collectives() as forward:
                out = fused_linear_objective_loss(leaf, local, case.labels, case.config,
                                                  case.numbers, case.pdl_weights, group,
                                                  loss_mask=case.loss_mask, **layout)
        else:
            leaf = local = case.logits[..., start:start + width].clone().requires_grad_()
            with counted_collectives() as forward:
                out = objective_loss(local, case.labels, case.config, case.numbers,
                                     case.pdl_weights, group, loss_mask=case.loss_mask,
                                     **layout)
        with counted_collectives() as backward:
            (out.loss * case.upstream).sum().backward()
        results.append({
            "loss": out.loss.detach(), "ce": out.ce.detach(), "ntl": out.ntl.detach(),
            "weight": out.weight.detach(), "local_grad": local.grad,
            "hidden_grad": leaf.grad if fused else None,
            "predicted_number": _detached(out.predicted_number),
            "number_mass": _detached(out.number_mass),
            "forward": dict(forward), "backward": dict(backward),
        })
    return results


def _reference(case: Case, fused: bool) -> dict:
    if fused:
        hidden, weight = (t.double().requires_grad_() for t in _hidden_and_weight(case))
        logits = hidden @ weight.t()
    else:
        hidden = weight = logits = case.logits.double().requires_grad_()
    out = reference_objective_loss(logits, case.labels, case.config, case.numbers,
                                   case.pdl_weights, loss_mask=case.loss_mask,
                                   real_vocab_size=REAL)
    (out.loss * case.upstream.double()).sum().backward()
    return {"loss": out.loss, "ce": out.ce, "ntl": out.ntl, "weight": out.weight,
            "predicted_number": out.predicted_number, "number_mass": out.number_mass,
            "local_grad": weight.grad, "hidden_grad": hidden.grad if fused else None}


@pytest.fixture(scope="module")
def uneven_runs(pool4):
    cases = _cases()
    runs = {(name, fused): pool4.run(run_uneven, tp, widths, cases, fused)
            for name, (tp, widths) in LAYOUTS.items() for fused in (False, True)}
    return cases, runs


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused_head"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=list(CONFIGS))
def test_uneven_shards_match_the_float64_reference(uneven_runs, layout, fused, index):
    cases, runs = uneven_runs
    tp, widths = LAYOUTS[layout]
    per_rank = runs[(layout, fused)]
    expected = _reference(cases[index], fused)
    assert expected["loss"].abs().sum() > 0
    grad_dim = 0 if fused else -1  # the weight shard splits rows, the logits split columns
    local_grad = torch.cat([per_rank[r][index]["local_grad"] for r in range(tp)], dim=grad_dim)
    for rank in range(tp):
        got = per_rank[rank][index]
        for key in ("loss", "ce", "ntl", "weight"):
            torch.testing.assert_close(got[key].double(), expected[key], rtol=2e-5, atol=2e-5,
                                       msg=lambda m, k=key, r=rank: f"rank {r} {k}: {m}")
        if expected["predicted_number"] is not None:
            for key in ("predicted_number", "number_mass"):
                torch.testing.assert_close(got[key].detach().double(), expected[key].detach(),
                                           rtol=2e-5, atol=2e-5)
        else:
            assert got["predicted_number"] is None and got["number_mass"] is None
        assert got["forward"] == {"all_reduce": 2}, got["forward"]
        # The fused head's backward makes the LM head's own grad_hidden all-reduce.
        assert got["backward"] == ({"all_reduce": 1} if fused else {}), got["backward"]
        if fused:
            torch.testing.assert_close(got["hidden_grad"].double(), expected["hidden_grad"],
                                       rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(local_grad.double(), expected["local_grad"], rtol=1e-4,
                               atol=1e-5)
    assert local_grad.shape[grad_dim] == sum(widths) == VOCAB


def run_autotp_nine(labels: torch.Tensor, logits: torch.Tensor, explicit: bool):
    """V = 9 at TP = 2 as AutoTP shards it: 5 and 4 columns."""
    group = tp_group(2)
    rank = dist.get_rank(group)
    start, width = (0, 5) if rank == 0 else (5, 4)
    local = logits[..., start:start + width].clone().requires_grad_()
    layout = {"vocab_start": start, "vocab_size": 9} if explicit else {}
    try:
        out = objective_loss(local, labels, CONFIGS["ce"], None, tp_group=group, **layout)
    except ValueError as error:
        return str(error)
    out.loss.sum().backward()
    return out.loss.detach(), local.grad


def test_autotp_shards_of_an_odd_vocab_give_torch_cross_entropy(pool4):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, 9, generator=gen) * 2
    labels = torch.tensor([[0, 4, 5, 8], [3, 4, 5, 6], [1, 2, 7, 4]])
    full = logits.double().requires_grad_()
    expected = F.cross_entropy(full.reshape(-1, 9), labels.flatten(), reduction="none")
    expected.sum().backward()
    per_rank = pool4.run(run_autotp_nine, labels, logits, True)
    grads = []
    for rank in (0, 1):
        loss, grad = per_rank[rank]
        torch.testing.assert_close(loss.double().flatten(), expected.detach(), rtol=1e-6,
                                   atol=1e-6)
        grads.append(grad)
    torch.testing.assert_close(torch.cat(grads, -1).double(), full.grad, rtol=1e-5, atol=1e-6)


def test_uneven_shards_without_a_layout_are_an_error_on_every_rank(pool4):
    """Inferred as even (start = rank * width), 5 + 4 columns silently gave a wrong CE before."""
    labels = torch.tensor([[0, 4, 5, 8]])
    messages = pool4.run(run_autotp_nine, labels, torch.randn(1, 4, 9), False)
    assert all(isinstance(m, str) for m in messages), messages
    assert len(set(messages)) == 1, messages
    assert "vocab_start=" in messages[0] and "vocab_size=" in messages[0]


def run_layout_error(tp_size: int, starts: list[int], widths: list[int], vocab: int,
                     labels_by_rank: list[torch.Tensor], with_table: bool):
    if not in_tp_group(tp_size):
        return None
    group = tp_group(tp_size)
    rank = dist.get_rank(group)
    labels = labels_by_rank[rank]
    config = CONFIGS["was"] if with_table else CONFIGS["ce"]
    numbers = None
    if with_table:
        values = torch.full((vocab,), float("nan"))
        values[[1, 2, 3]] = torch.tensor([1.0, 2.0, 3.0])
        from token_objectives import NumberTable

        numbers = NumberTable.from_values(values)
    local = torch.randn(*labels.shape, widths[rank])
    try:
        objective_loss(local, labels, config, numbers, tp_group=group,
                       vocab_start=starts[rank], vocab_size=vocab)
    except ValueError as error:
        return str(error)
    return "no error"


def test_a_gap_between_shards_is_the_same_error_on_every_rank(pool4):
    labels = [torch.zeros(2, 3, dtype=torch.long)] * 3
    messages = pool4.run(run_layout_error, 3, [0, 4, 12], [4, 7, 3], 15, labels, False)[:3]
    assert len(set(messages)) == 1, messages
    assert "[0, 4), [4, 11), [12, 15) do not tile [0, 15)" in messages[0]


def test_overlapping_shards_are_an_error_with_a_table_too(pool4):
    labels = [torch.zeros(2, 3, dtype=torch.long)] * 2
    messages = pool4.run(run_layout_error, 2, [0, 4], [5, 4], 9, labels, True)[:2]
    assert len(set(messages)) == 1, messages
    assert "[0, 5), [4, 8) do not tile [0, 9)" in messages[0]


@pytest.mark.parametrize("bad,where", [(9, "out of range"), (-3, "out of range")])
def test_a_bad_label_raises_the_same_error_on_every_rank(pool4, bad, where):
    labels = torch.tensor([[0, 4, bad, 8]])
    messages = pool4.run(run_layout_error, 2, [0, 5], [5, 4], 9, [labels, labels], False)[:2]
    assert len(set(messages)) == 1, messages
    assert f"label {bad} is {where}" in messages[0]


def test_a_label_bad_on_one_rank_only_stops_every_rank(pool4):
    """Before, the rank that saw the bad label raised and the others waited in the all-reduce."""
    good = torch.tensor([[0, 4, 5, 8]])
    bad = torch.tensor([[0, 4, 12, 8]])
    messages = pool4.run(run_layout_error, 3, [0, 3, 6], [3, 3, 3], 9, [good, bad, good],
                         False)[:3]
    assert "label 12 is out of range" in messages[1]
    for rank in (0, 2):
        assert "a label on TP rank 1" in messages[rank], messages


def test_padding_from_real_vocab_size_alone_leaves_the_softmax():
    """CE only, no NumberTable: real_vocab_size says where the padding starts."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 6, 16, generator=gen)
    logits[..., 13:] = 20.0  # padding with the largest logits
    labels = torch.randint(0, 13, (2, 6), generator=gen)
    out = objective_loss(logits, labels, CONFIGS["ce"], None, real_vocab_size=13)
    expected = F.cross_entropy(logits[..., :13].double().reshape(-1, 13), labels.flatten(),
                               reduction="none")
    torch.testing.assert_close(out.ce.double().flatten(), expected, rtol=1e-6, atol=1e-6)
    labels[0, 0] = 14
    with pytest.raises(ValueError, match="label 14 is in the vocab padding"):
        objective_loss(logits, labels, CONFIGS["ce"], None, real_vocab_size=13)
