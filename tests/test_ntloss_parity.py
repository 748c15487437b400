"""Parity with the `ntloss` package itself: values and gradients on a locally trained tokenizer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

ntloss = pytest.importorskip("ntloss", reason="ntloss is in the test extra")
from tokenizer_fixtures import text_batch  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from token_objectives import NumberTable, ObjectiveConfig, objective_loss  # noqa: E402


@pytest.fixture()
def tokenizer(bpe_tokenizer_path):
    # A fresh tokenizer per test: ntloss may add tokens to the one it is given.
    return PreTrainedTokenizerFast(tokenizer_file=str(bpe_tokenizer_path), unk_token="<unk>",
                                   pad_token="<pad>", eos_token="<eos>")


@pytest.fixture()
def batch(tokenizer, corpus_lines):
    """Real text with numbers as labels, random fp64 logits, ignored padding and a loss mask."""
    labels, logits, gen = text_batch(tokenizer, corpus_lines[:6])
    weights = (torch.rand(labels.shape, generator=gen) > 0.2).double()
    upstream = torch.rand(labels.shape, generator=gen, dtype=torch.float64)
    return logits, labels, weights, upstream


def _compare(theirs_fn, config, tokenizer, batch, with_weights, dtype=torch.float64):
    logits, labels, weights, upstream = (t.to(dtype) if t.is_floating_point() else t
                                         for t in batch)
    tol = {"rtol": 1e-9, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5,
                                                                         "atol": 1e-6}
    numbers = NumberTable.from_tokenizer(tokenizer)
    theirs_logits = logits.clone().requires_grad_()
    theirs = theirs_fn(theirs_logits, labels, loss_weights=weights if with_weights else None,
                       reduction="none")
    (theirs * upstream).sum().backward()
    ours_logits = logits.clone().requires_grad_()
    out = objective_loss(ours_logits, labels, config, numbers,
                         loss_mask=weights if with_weights else None)
    (out.ntl * upstream).sum().backward()
    assert out.is_number.sum() >= 5 and theirs.abs().sum() > 0
    torch.testing.assert_close(out.ntl, theirs, **tol)
    torch.testing.assert_close(ours_logits.grad, theirs_logits.grad, rtol=tol["rtol"] * 10,
                               atol=tol["atol"] / 100)


@pytest.mark.parametrize("reweigh", [True, False])
@pytest.mark.parametrize("squash_factor", [None, 3.0])
@pytest.mark.parametrize("with_weights", [False, True])
def test_ntloss_wasserstein(tokenizer, batch, reweigh, squash_factor, with_weights):
    theirs = ntloss.NTLoss(tokenizer, reweigh=reweigh, squash_factor=squash_factor)
    config = ObjectiveConfig(ntl="was", reweigh=reweigh, squash_factor=squash_factor)
    _compare(theirs, config, tokenizer, batch, with_weights)


@pytest.mark.parametrize("reweigh", [True, False])
@pytest.mark.parametrize(
    ("flavour", "loss_function"),
    [("mse", F.mse_loss), ("l1", F.l1_loss), ("huber", F.huber_loss)],
)
def test_ntloss_dot_product(tokenizer, batch, reweigh, flavour, loss_function):
    theirs = ntloss.NTLossDotProduct(tokenizer, reweigh=reweigh, loss_function=loss_function)
    config = ObjectiveConfig(ntl=flavour, reweigh=reweigh)
    # ntloss's Huber backward fails on fp64 logits (its number values stay fp32): use fp32.
    dtype = torch.float32 if flavour == "huber" else torch.float64
    _compare(theirs, config, tokenizer, batch, with_weights=True, dtype=dtype)


@pytest.mark.parametrize("reweigh", [True, False])
@pytest.mark.parametrize("float_level", [False, True])
def test_ntloss_number_level(tokenizer, batch, reweigh, float_level):
    theirs = ntloss.NumberLevelLoss(tokenizer, reweigh=reweigh, float_level=float_level)
    config = ObjectiveConfig(ntl="number", reweigh=reweigh, number_level_float=float_level)
    _compare(theirs, config, tokenizer, batch, with_weights=True)


def test_same_number_tokens_as_ntloss(tokenizer):
    theirs = ntloss.NTLoss(tokenizer)
    ours = NumberTable.from_tokenizer(tokenizer)
    torch.testing.assert_close(ours.values, theirs.number_values, equal_nan=True)


def test_word_boundary_digits_differ_on_purpose():
    """ntloss counts only a bare '7'; we also count '▁7' and 'Ġ7' (a digit after a space)."""
    from tokenizers import Tokenizer, models

    tokens = ["<unk>", "a", "b", *map(str, range(10)), "\u25817", "\u01208"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "<unk>")),
                                 unk_token="<unk>")
    theirs = ntloss.NTLoss(hf)
    ours = NumberTable.from_tokenizer(hf)
    spaced_7, spaced_8 = vocab["\u25817"], vocab["\u01208"]
    assert torch.isnan(theirs.number_values[[spaced_7, spaced_8]]).all()
    assert ours.values[spaced_7] == 7 and ours.values[spaced_8] == 8

    labels = torch.tensor([[spaced_7, vocab["3"], vocab["a"]]])
    logits = torch.randn(1, 3, len(tokens), dtype=torch.float64)
    their_loss = theirs(logits, labels, reduction="none")
    our_loss = objective_loss(logits, labels, ObjectiveConfig(ntl="was"), ours).ntl
    assert their_loss[0, 0] == 0 and our_loss[0, 0] > 0  # the difference
    # ... and the only one: without the marked digits, the two agree everywhere.
    values = ours.values.clone()
    values[[spaced_7, spaced_8]] = float("nan")
    bare = NumberTable.from_values(values, valid_vocab_size=ours.valid_vocab_size)
    bare_loss = objective_loss(logits, labels, ObjectiveConfig(ntl="was"), bare).ntl
    torch.testing.assert_close(bare_loss, their_loss)
