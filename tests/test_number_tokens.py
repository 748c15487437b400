"""Number tokens as real tokenizers write them (word-boundary digits), the predicted numbers the
objective exposes, and loss masks it refuses. Expected values are written out by hand."""

from __future__ import annotations

import pytest
import torch
from cases import CONFIGS, make_case
from tokenizer_fixtures import word_level_tokenizer

from token_objectives import NumberTable, ObjectiveConfig, objective_loss
from token_objectives.ops.number_level import digit_runs

T, F_ = True, False
SMAPE_EPS = torch.finfo(torch.float32).eps


def test_a_word_boundary_digit_starts_a_new_number():
    # Targets "▁1 2 ▁3 4 x ▁5 6": the numbers 12, 34 and 56, not 1234.
    is_digit = torch.tensor([[T, T, T, T, F_, T, T]])
    word_start = torch.tensor([[T, F_, T, F_, F_, T, F_]])
    digits = torch.tensor([[1, 2, 3, 4, 0, 5, 6]], dtype=torch.float64)
    runs = digit_runs(is_digit, word_start=word_start)
    assert runs.starts.nonzero()[:, 1].tolist() == [0, 2, 5]
    assert runs.assemble(digits)[0, [0, 2, 5]].tolist() == [12, 34, 56]
    assert digit_runs(is_digit).assemble(digits)[0, 0].item() == 1234  # without the markers


def test_a_word_boundary_digit_after_a_dot_starts_a_new_number():
    # Float mode, targets "▁1 2 . 5 ▁3 . ▁4": 125 (ntloss reads 12.5 as 125), 3 and 4.
    is_digit = torch.tensor([[T, T, F_, T, T, F_, T]])
    is_dot = torch.tensor([[F_, F_, T, F_, F_, T, F_]])
    word_start = torch.tensor([[T, F_, F_, F_, T, F_, T]])
    digits = torch.tensor([[1, 2, 0, 5, 3, 0, 4]], dtype=torch.float64)
    runs = digit_runs(is_digit, is_dot, word_start=word_start)
    assert runs.starts.nonzero()[:, 1].tolist() == [0, 4, 6]
    assert runs.assemble(digits)[0, [0, 4, 6]].tolist() == [125, 3, 4]


def _sentencepiece_style_table():
    tokens = ["▁1", "2", "▁3", "4", "+", "=", "▁"] + [str(d) for d in (0, 1, 3, 5, 6, 7, 8, 9)]
    tokenizer = word_level_tokenizer(tokens)
    return tokenizer, NumberTable.from_tokenizer(tokenizer)


def test_the_table_marks_word_boundary_digits():
    tokenizer, table = _sentencepiece_style_table()
    marked = {tokenizer.id_to_token(i) for i in table.word_start.nonzero().flatten().tolist()}
    assert marked == {"▁1", "▁3"}


def test_number_level_loss_reads_sentencepiece_digits_as_two_numbers():
    tokenizer, table = _sentencepiece_style_table()
    ids = [tokenizer.token_to_id(t) for t in ("▁1", "2", "▁3", "4")]
    labels = torch.tensor([ids])
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 4, table.vocab_size, generator=gen, dtype=torch.float64)
    config = ObjectiveConfig(ntl="number", reweigh=False)
    out = objective_loss(logits, labels, config, table)
    assert out.is_number[0].tolist() == [True, False, True, False]
    # By hand: the expected digit under the number-token softmax, then 10 * d0 + d1.
    numbers = table.number_ids
    values = table.values[numbers].double()
    digit = torch.softmax(logits[0][:, numbers], dim=-1) @ values
    for start, truth in ((0, 12.0), (2, 34.0)):
        guess = 10 * digit[start] + digit[start + 1]
        expected = (guess - truth).abs() / (guess.abs() + truth + SMAPE_EPS)
        torch.testing.assert_close(out.ntl[0, start], expected)
    assert out.ntl[0, 1] == 0 and out.ntl[0, 3] == 0


def test_predicted_number_and_number_mass_are_exposed():
    case = make_case("predict", CONFIGS["was"], seed=3, with_mask=False)
    out = objective_loss(case.logits, case.labels, case.config, case.numbers)
    ids = case.numbers.number_ids
    values = case.numbers.values[ids].double()
    logits = case.logits.double()
    expected_yhat = torch.softmax(logits[..., ids], dim=-1) @ values
    expected_mass = torch.softmax(logits[..., :61], dim=-1)[..., ids].sum(-1)
    counted = case.labels != -100
    torch.testing.assert_close(out.predicted_number.double()[counted], expected_yhat[counted],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.number_mass.double()[counted], expected_mass[counted],
                               rtol=1e-5, atol=1e-6)
    assert (out.predicted_number[~counted] == 0).all()
    ce_only = objective_loss(case.logits, case.labels, CONFIGS["ce"], None)
    assert ce_only.predicted_number is None and ce_only.number_mass is None


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_a_negative_or_nan_loss_mask_is_refused(bad):
    case = make_case("mask", CONFIGS["ce"], seed=4)
    mask = torch.ones_like(case.labels, dtype=torch.float32)
    mask[0, 3] = bad
    with pytest.raises(ValueError, match=r"loss_mask must hold finite weights >= 0"):
        objective_loss(case.logits, case.labels, case.config, None, loss_mask=mask)
