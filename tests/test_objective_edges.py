"""Single-process checks: gradcheck, extreme inputs, empty cases, bad input, the config."""

from __future__ import annotations

import math

import pytest
import torch
from cases import CONFIGS, make_case, number_table
from dist_pool import tp_group
from reference import reference_objective_loss

from token_objectives import ObjectiveConfig, objective_loss
from token_objectives.ops.number_level import digit_runs


@pytest.mark.parametrize("name", ["was", "was_squash", "mse", "huber", "number",
                                  "number_float", "all", "all_mse_weighted_mean"])
def test_gradcheck_float64(name):
    case = make_case(name, CONFIGS[name], vocab=24, real=22, number_ids=list(range(4, 14)),
                     batch=2, seq=14, seed=5)
    logits = case.logits.double().requires_grad_()

    def loss(x):
        return objective_loss(x, case.labels, case.config, case.numbers, case.pdl_weights,
                              loss_mask=case.loss_mask).loss

    assert torch.autograd.gradcheck(loss, (logits,), eps=1e-6, atol=1e-5)


def test_bf16_and_fp16_logits_accumulate_in_fp32():
    case = make_case("low", CONFIGS["all"], seed=11)
    for dtype in (torch.bfloat16, torch.float16):
        rounded = case.logits.to(dtype)
        logits = rounded.clone().requires_grad_()
        out = objective_loss(logits, case.labels, case.config, case.numbers, case.pdl_weights,
                             loss_mask=case.loss_mask)
        assert out.loss.dtype == torch.float32
        expected = reference_objective_loss(rounded.double(), case.labels, case.config,
                                            case.numbers, case.pdl_weights,
                                            loss_mask=case.loss_mask)
        torch.testing.assert_close(out.loss.double(), expected.loss, rtol=1e-5, atol=1e-5)
        out.loss.sum().backward()
        assert logits.grad.dtype == dtype and torch.isfinite(logits.grad).all()


def test_huge_and_infinite_logits_stay_finite():
    case = make_case("extreme", CONFIGS["all"], seed=12, with_mask=False)
    logits = case.logits.clone()
    logits[0, :, :5] = 1e4
    logits[1, :, 5:9] = -1e4
    logits[0, 3, 20:] = -math.inf  # part of a row
    logits[1, 7, case.numbers.number_ids] = -math.inf  # no mass on any number token
    config = ObjectiveConfig(ntl="was", pdl_alpha=0.3, z_loss=1e-4)
    labels = case.labels.clone()
    labels[0, 3] = 2  # the targets' own logits stay finite
    labels[1, 7] = 1
    leaf = logits.requires_grad_()
    out = objective_loss(leaf, labels, config, case.numbers, case.pdl_weights)
    out.loss.sum().backward()
    assert torch.isfinite(out.loss).all() and torch.isfinite(leaf.grad).all()
    expected = reference_objective_loss(logits.detach().double(), labels, config, case.numbers,
                                        case.pdl_weights)
    torch.testing.assert_close(out.loss.double(), expected.loss, rtol=1e-5, atol=1e-3)


def test_all_ignored_batch_gives_zero_and_zero_gradients():
    case = make_case("ignored", CONFIGS["all"], seed=13)
    labels = torch.full_like(case.labels, -100)
    logits = case.logits.clone().requires_grad_()
    out = objective_loss(logits, labels, case.config, case.numbers, case.pdl_weights)
    total = out.loss.sum()
    total.backward()
    assert total.item() == 0 and not out.counted.any()
    assert torch.count_nonzero(logits.grad) == 0
    assert out.totals().tolist() == [0.0] * 6


def test_batch_without_numbers_has_zero_ntl():
    case = make_case("plain", CONFIGS["was"], seed=14, with_mask=False)
    labels = case.labels.clone()
    labels[case.numbers.is_number[labels.clamp_min(0)]] = 1
    logits = case.logits.clone().requires_grad_()
    out = objective_loss(logits, labels, case.config, case.numbers)
    (out.ntl.sum()).backward()
    assert not out.is_number.any() and out.ntl.abs().sum() == 0
    assert torch.count_nonzero(logits.grad) == 0
    ce_only = objective_loss(case.logits, labels, ObjectiveConfig(ntl=None), case.numbers)
    torch.testing.assert_close(out.loss, ce_only.loss, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [-1, -7, 64, 1000, 62])
def test_bad_labels_are_a_clear_error(bad):
    case = make_case("bad", CONFIGS["was"], vocab=64, real=61)
    labels = case.labels.clone()
    labels[1, 3] = bad
    with pytest.raises(ValueError, match=rf"label {bad} is .*ignore_index"):
        objective_loss(case.logits, labels, case.config, case.numbers)


def test_label_in_vocab_padding_is_named():
    case = make_case("pad", CONFIGS["ce"], vocab=64, real=61)
    labels = case.labels.clone()
    labels[0, 0] = 62
    with pytest.raises(ValueError, match="in the vocab padding"):
        objective_loss(case.logits, labels, case.config, case.numbers)


def test_table_of_another_size_is_a_clear_error():
    case = make_case("size", CONFIGS["was"], vocab=64, real=61)
    with pytest.raises(ValueError, match=r"NumberTable has 64 entries.*vocab_size=60"):
        objective_loss(case.logits[..., :60], case.labels.clamp(max=59), case.config,
                       case.numbers)


def _vocab_not_divisible(tp_size):
    numbers = number_table(66, 66, list(range(10)))
    logits = torch.randn(2, 3, 16)
    try:
        objective_loss(logits, torch.zeros(2, 3, dtype=torch.long), ObjectiveConfig(), numbers,
                       tp_group=tp_group(tp_size))
    except ValueError as error:
        return str(error)
    return None


def test_vocab_not_divisible_by_tp_is_a_clear_error(pool4):
    for message in pool4.run(_vocab_not_divisible, 4):
        assert message is not None and "not divisible by the tensor-parallel size 4" in message
        assert "make-vocab-size-divisible-by" in message


def test_pdl_needs_a_table_and_a_table_needs_alpha():
    case = make_case("pdl", CONFIGS["pdl"])
    with pytest.raises(ValueError, match="pdl_alpha > 0 needs pdl_weights"):
        objective_loss(case.logits, case.labels, case.config, case.numbers)
    with pytest.raises(ValueError, match="pdl_alpha is 0"):
        objective_loss(case.logits, case.labels, ObjectiveConfig(), case.numbers,
                       case.pdl_weights)
    with pytest.raises(ValueError, match="pdl_weights has 10 entries but the vocab has 64"):
        objective_loss(case.logits, case.labels, case.config, case.numbers, torch.ones(10))


def test_padded_columns_get_no_probability_and_no_gradient():
    case = make_case("padded", CONFIGS["ce"], vocab=64, real=61, with_mask=False)
    logits = case.logits.clone()
    logits[..., 61:] = 50.0  # would dominate the softmax if it were counted
    leaf = logits.requires_grad_()
    out = objective_loss(leaf, case.labels, case.config, case.numbers)
    out.loss.sum().backward()
    expected = torch.nn.functional.cross_entropy(
        logits[..., :61].detach().reshape(-1, 61), case.labels.flatten(), reduction="none",
        ignore_index=-100).reshape(case.labels.shape)
    torch.testing.assert_close(out.loss, expected)
    assert torch.count_nonzero(leaf.grad[..., 61:]) == 0


def test_label_smoothing_matches_pytorch():
    case = make_case("ls", CONFIGS["label_smoothing"], real=64, with_mask=False)
    out = objective_loss(case.logits, case.labels, case.config, case.numbers)
    expected = torch.nn.functional.cross_entropy(
        case.logits.reshape(-1, 64), case.labels.flatten(), reduction="none",
        label_smoothing=0.1).reshape(case.labels.shape)
    torch.testing.assert_close(out.loss, expected)


def test_digit_runs_read_whole_numbers():
    # Sequence: 4 2 x 7 . 5 x 1 . . 3   (x = no digit)
    is_digit = torch.tensor([[1, 1, 0, 1, 0, 1, 0, 1, 0, 0, 1]], dtype=torch.bool)
    is_dot = torch.tensor([[0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    digits = torch.tensor([[4, 2, 0, 7, 0, 5, 0, 1, 0, 0, 3]], dtype=torch.float64)
    integers = digit_runs(is_digit)
    assert integers.starts.nonzero()[:, 1].tolist() == [0, 3, 5, 7, 10]
    assert integers.assemble(digits)[0, [0, 3, 5, 7, 10]].tolist() == [42, 7, 5, 1, 3]
    floats = digit_runs(is_digit, is_dot)
    # "7 . 5" reads as 75, as in ntloss; "1 . . 3" is two numbers.
    assert floats.starts.nonzero()[:, 1].tolist() == [0, 3, 7, 10]
    assert floats.assemble(digits)[0, [0, 3, 7, 10]].tolist() == [42, 75, 1, 3]
    capped = digit_runs(is_digit, max_number_length=1)
    assert capped.assemble(digits)[0, 0].item() == 6  # every exponent clamped to 0


def test_number_level_along_the_first_axis():
    """Megatron hands over [s, b]: seq_dim=0 must equal the [b, s] result transposed."""
    case = make_case("seq0", CONFIGS["number"], seed=21)
    out = objective_loss(case.logits, case.labels, case.config, case.numbers,
                         loss_mask=case.loss_mask)
    out_t = objective_loss(case.logits.transpose(0, 1), case.labels.t(), case.config,
                           case.numbers, loss_mask=case.loss_mask.t(), seq_dim=0)
    assert out.is_number.sum() >= 3
    torch.testing.assert_close(out_t.loss.t(), out.loss)


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['ntl_wieght'\] in config "
                                         r"section 'objectives'; valid keys"):
        ObjectiveConfig.from_dict({"ntl": "mse", "ntl_wieght": 0.1})
    assert ObjectiveConfig.from_dict({"ntl": "mse"}).ntl == "mse"
    with pytest.raises(TypeError):
        ObjectiveConfig(ntl_wieght=0.1)
    for bad in ({"ntl": "cosine"}, {"squash_factor": 1.0}, {"ntl": "mse", "squash_factor": 2.0},
                {"label_smoothing": 1.0}, {"pdl_alpha": -1.0}, {"pdl_normalization": "mean"}):
        with pytest.raises(ValueError):
            ObjectiveConfig(**bad)


def test_totals_sum_each_component():
    case = make_case("totals", CONFIGS["all"], seed=22)
    out = objective_loss(case.logits, case.labels, case.config, case.numbers, case.pdl_weights,
                         loss_mask=case.loss_mask)
    totals = out.totals()
    assert totals[1] == out.counted.sum() and totals[4] == out.is_number.sum()
    torch.testing.assert_close(totals[0], out.loss.sum())
    torch.testing.assert_close(totals[5], (out.weight).sum())


@pytest.mark.parametrize("name", ["ce", "was", "z_loss", "all", "gaussian_was"])
def test_ignored_row_of_minus_inf_gives_no_nan_gradient(name):
    case = make_case("inf_row", CONFIGS[name], seed=23)
    logits = case.logits.clone()
    logits[0, 2, :] = -math.inf
    labels = case.labels.clone()
    labels[0, 2] = -100
    leaf = logits.requires_grad_()
    out = objective_loss(leaf, labels, case.config, case.numbers, case.pdl_weights)
    out.loss.sum().backward()
    assert torch.isfinite(out.loss).all() and torch.isfinite(leaf.grad).all()
    assert torch.count_nonzero(leaf.grad[0, 2]) == 0
