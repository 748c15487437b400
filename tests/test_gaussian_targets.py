"""Gaussian number targets (ObjectiveConfig.gaussian_sigma): parity with the NTL authors'
GaussianLabelSmoother (tum-ai/number-token-loss, src/ntl/utils/label_smoother.py), its limits
(sigma = 0, sigma -> 0, tokens of equal value) and its surfaces. The TP = 1/2/4 comparisons with
the float64 reference, the collective counts, the uneven layouts, the fused head and the Triton
kernels run the "gaussian*" cases of cases.py in test_objective_tp, test_vocab_layout,
test_fused_linear and test_triton_kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cases import CONFIGS, make_case
from tokenizer_fixtures import text_batch
from transformers import PreTrainedTokenizerFast

from token_objectives import NumberTable, ObjectiveConfig, objective_loss


def repo_gaussian_label_smoother(logits: torch.Tensor, labels: torch.Tensor,
                                 nvocab: torch.Tensor, sigma: float,
                                 ignore_index: int = -100) -> torch.Tensor:
    """The repo's GaussianLabelSmoother.__call__ (sigma > 0, no shift, no NTL), written from its
    definition: log_softmax over the full vocab; for a number target of value u, the target
    gaussian / (gaussian.sum() + 1e-8) over the number tokens (by value) against their
    log-probabilities; one-hot CE for every other valid target; mean over the valid labels.
    nvocab: [V] value per token id, NaN for non-numbers (the selector's nvocab)."""
    eps = 1e-8
    number_ids = torch.nonzero(~torch.isnan(nvocab)).flatten()
    number_values = nvocab[number_ids]
    log_probs = F.log_softmax(logits, dim=-1)
    valid = labels != ignore_index
    safe = labels.masked_fill(~valid, 0)
    number_mask = torch.isin(labels, number_ids)
    u = torch.nan_to_num(nvocab[safe], nan=0.0).to(logits.dtype)
    gaussian = torch.exp(-0.5 * ((number_values.to(logits.dtype) - u.unsqueeze(-1)) / sigma) ** 2)
    probs = gaussian / (gaussian.sum(-1, keepdim=True) + eps) * number_mask.unsqueeze(-1)
    loss_numbers = -(probs * log_probs[..., number_ids]).sum(-1)
    one_hot = F.one_hot(safe, logits.shape[-1]).to(logits.dtype)
    one_hot = one_hot * (valid & ~number_mask).unsqueeze(-1)
    loss_non_numbers = -(one_hot * log_probs).sum(-1)
    per_token = torch.where(number_mask, loss_numbers, loss_non_numbers)
    return per_token.sum() / torch.clamp(valid.sum().to(logits.dtype), min=1.0)


@pytest.fixture()
def digit_batch(bpe_tokenizer_path, corpus_lines):
    """The locally trained BPE tokenizer (digits split one by one), real text as labels with
    ignored padding, random fp64 logits over its vocab."""
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(bpe_tokenizer_path),
                                        unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<eos>")
    numbers = NumberTable.from_tokenizer(tokenizer)
    labels, logits, _ = text_batch(tokenizer, corpus_lines[:6])
    return numbers, logits, labels


@pytest.mark.parametrize("sigma", [0.3, 1.0, 4.0])
def test_parity_with_the_ntl_repos_gaussian_label_smoother(digit_batch, sigma):
    numbers, logits, labels = digit_batch
    values = numbers.values.double()
    assert (~torch.isnan(values[labels.clamp(min=0)]) & (labels >= 0)).sum() >= 10
    theirs_logits = logits.clone().requires_grad_()
    theirs = repo_gaussian_label_smoother(theirs_logits, labels, values, sigma)
    theirs.backward()
    ours_logits = logits.clone().requires_grad_()
    out = objective_loss(ours_logits, labels, ObjectiveConfig(ntl=None, gaussian_sigma=sigma),
                         numbers)
    ours = out.loss.sum() / out.counted.sum()
    ours.backward()
    # The repo's 1e-8 in the normaliser (which is >= 1: the target's own token) is all apart.
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(ours_logits.grad, theirs_logits.grad, rtol=1e-6, atol=1e-9)
    plain = objective_loss(logits, labels, ObjectiveConfig(ntl=None), None,
                           real_vocab_size=numbers.valid_vocab_size)
    assert (out.loss - plain.loss).abs().max() > 1e-3, "the Gaussian target changed nothing"


def _case(config: ObjectiveConfig, seed: int = 21):
    return make_case("gaussian", config, seed=seed, with_mask=False)


def test_sigma_zero_is_plain_cross_entropy_exactly():
    case = _case(ObjectiveConfig(ntl="was", gaussian_sigma=0.0))
    off = objective_loss(case.logits, case.labels, case.config, case.numbers)
    plain = objective_loss(case.logits, case.labels, ObjectiveConfig(ntl="was"), case.numbers)
    assert torch.equal(off.loss, plain.loss) and torch.equal(off.ce, plain.ce)


def test_a_small_sigma_is_cross_entropy_on_the_number_target():
    case = _case(CONFIGS["gaussian"])
    small = objective_loss(case.logits, case.labels, ObjectiveConfig(ntl=None,
                           gaussian_sigma=1e-3), case.numbers)
    wide = objective_loss(case.logits, case.labels, case.config, case.numbers)
    is_number = ~torch.isnan(case.numbers.values[case.labels.clamp(min=0)]) & (case.labels >= 0)
    assert is_number.sum() >= 4
    torch.testing.assert_close(small.loss, small.ce, rtol=1e-6, atol=1e-6)
    # sigma = 1 moves mass to the neighbouring digits: number targets only, the others keep CE.
    assert (wide.loss - wide.ce)[is_number].abs().min() > 1e-3
    torch.testing.assert_close(wide.loss[~is_number], wide.ce[~is_number], rtol=0, atol=0)
    # ce stays the plain cross-entropy, whatever the target distribution.
    torch.testing.assert_close(wide.ce, small.ce, rtol=0, atol=0)


def test_tokens_of_equal_value_share_the_target_by_value():
    values = torch.full((16,), float("nan"))
    values[[2, 5, 9]] = torch.tensor([1.0, 1.0, 2.0])  # "1" and "▁1": one value, two ids
    numbers = NumberTable.from_values(values, valid_vocab_size=16)
    logits = torch.randn(3, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    labels = torch.tensor([2, 9, 4])
    out = objective_loss(logits, labels, ObjectiveConfig(ntl=None, gaussian_sigma=1e-3), numbers)
    log_p = logits.log_softmax(-1)
    expected = torch.stack([-(log_p[0, 2] + log_p[0, 5]) / 2, -log_p[1, 9], -log_p[2, 4]])
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-12)


def test_gradcheck_with_ntl_pdl_and_label_smoothing():
    case = make_case("gradcheck", CONFIGS["gaussian_was"], vocab=24, real=22,
                     number_ids=list(range(4, 14)), batch=2, seq=16, seed=5)
    pdl = case.pdl_weights.double()

    def loss(logits):
        return objective_loss(logits, case.labels, case.config, case.numbers, pdl,
                              loss_mask=case.loss_mask).loss

    logits = case.logits.double().requires_grad_()
    assert torch.autograd.gradcheck(loss, (logits,), eps=1e-6, atol=1e-6, fast_mode=True)


def test_gaussian_sigma_needs_the_number_table_and_names_it():
    case = _case(CONFIGS["gaussian"])
    with pytest.raises(ValueError, match=r"^gaussian_sigma=1.0 needs a NumberTable"):
        objective_loss(case.logits, case.labels, case.config, None)
    with pytest.raises(ValueError, match=r"^gaussian_sigma: expected a number >= 0"):
        ObjectiveConfig(gaussian_sigma=-1.0)


def test_the_hf_options_take_gaussian_sigma(bpe_tokenizer_path):
    from token_objectives.integrations.hf.loss import objective_loss_from_options

    loss = objective_loss_from_options({"ntl": None, "gaussian_sigma": 0.5},
                                       str(bpe_tokenizer_path))
    assert loss.config.gaussian_sigma == 0.5 and loss.numbers is not None


def test_the_ds_config_section_builds_the_number_table_for_gaussian_sigma(bpe_tokenizer_path):
    from token_objectives.integrations.deepspeed.section import numbers_from_section, read_section

    section = read_section({"token_objectives": {"ntl": None, "gaussian_sigma": 0.5,
                                                 "tokenizer": str(bpe_tokenizer_path)}})
    assert section.objective_config().gaussian_sigma == 0.5
    assert numbers_from_section(section, vocab_size=512) is not None
    untokenized = read_section({"token_objectives": {"ntl": None, "gaussian_sigma": 0.5}})
    with pytest.raises(ValueError, match=r'\.gaussian_sigma = 0.5 needs "tokenizer"'):
        numbers_from_section(untokenized, vocab_size=512)
