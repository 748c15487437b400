"""NTL on the numbers real tokenizers make: Llama-3's 1-3 digit groups, Qwen's single digits,
cl100k's groups, GPT-2's merges, Mistral's split-digit sentencepiece, T5's `▁`-digit pieces
(tests/real_vocabularies.py).

The expected number-token sets are counted here from the raw vocabularies (the ranks' bytes, the
sentencepiece pieces), not through NumberTable; the NTL values are written out by hand."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import real_vocabularies as vocabularies
import torch

from token_objectives import NumberTable, ObjectiveConfig, objective_loss
from token_objectives.cli import main
from token_objectives.tables.numbers import digit_share

# Number-rich text as a pretraining corpus has it: years, prices, decimals, long numbers,
# leading zeros, phone numbers, times, arithmetic, ordinals.
NUMBER_TEXT = [
    "In 2024 the plant made 1234567 parts, 3.14159 per second, not -42 or 007.",
    "Call 555-0199 at 12:30; the total was 98,765.43 dollars on 2023-11-05.",
    "Revenue rose from 1,024 to 65536 units (a 6300% jump) between 1999 and 2001.",
    "The 3rd and 21st runners finished in 2:04:31 and 2:05:02; 17 of 250 quit.",
    "Compute 4587 + 918 = 5505, then 5505 * 12 = 66060 and 66060 / 4 = 16515.",
    "Pi is 3.14159265358979, e is 2.71828, and 1/7 = 0.142857142857.",
    "Room 101, floor 7, zip 90210; ISBN 978-0-306-40615-7; lot 000123.",
]

# What `auto` picks, and the number tokens by digit count, as each vocabulary is known to be.
EXPECTED = {
    "llama3": ("groups", {1: 10, 2: 100, 3: 1000}),
    "cl100k": ("groups", {1: 10, 2: 100, 3: 1000}),
    "qwen2": ("digit", {1: 10}),
    "mistral_v1": ("digit", {1: 10}),
    "mistral_v1_sp": ("digit", {1: 10}),
    "gpt2": ("groups", None),  # merges of any length: counted from the ranks below
    "t5": ("groups", None),  # unigram pieces "▁2019", "24": counted from the pieces below
}
DIGITS = re.compile(r"[0-9]+")


def _load(family: str):
    return vocabularies.FAMILIES[family][0]()


def _raw_decimals(family: str) -> int:
    """Pieces of a sentencepiece family that are ASCII decimals such as "1.6" (after '▁')."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(vocabularies.t5_path()))
    assert family == "t5"
    pieces = (processor.id_to_piece(i).removeprefix("\u2581")
              for i in range(processor.get_piece_size()) if processor.is_control(i) is False)
    return sum(bool(re.fullmatch(r"[0-9]+\.[0-9]+", piece)) for piece in pieces)


def _raw_number_tokens(family: str) -> dict[int, int]:
    """{digit count: tokens}: vocabulary entries that are ASCII digits after at most one leading
    space (byte-level) or '▁' (sentencepiece), read from the raw files."""
    counts: dict[int, int] = {}
    if family.startswith("mistral") or family == "t5":
        import sentencepiece

        path = vocabularies.t5_path() if family == "t5" else vocabularies.mistral_v1_path()
        processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
        texts = [processor.id_to_piece(i) for i in range(processor.get_piece_size())
                 if not (processor.is_control(i) or processor.is_byte(i)
                         or processor.is_unknown(i))]
        texts = [t[1:] if t.startswith("\u2581") else t for t in texts]
    else:
        path = getattr(vocabularies, f"{family}_path")()
        raw = vocabularies.read_tiktoken_ranks(path)
        texts = [token.decode("latin-1") for token in raw]
        texts = [t[1:] if t.startswith(" ") else t for t in texts]
    for text in texts:
        if DIGITS.fullmatch(text):
            counts[len(text)] = counts.get(len(text), 0) + 1
    return counts


@pytest.mark.parametrize("family", list(EXPECTED))
def test_auto_picks_the_mode_and_takes_every_number_token(family):
    mode, by_count = EXPECTED[family]
    if family == "t5":  # pieces such as "1.6" are decimals: left out, and said so
        decimals, kept = _raw_decimals(family), sum(_raw_number_tokens(family).values())
        share = f"{decimals / (decimals + kept):.1%}".replace(".", r"\.")
        with pytest.warns(UserWarning, match=rf"leaves {decimals} of {decimals + kept} number "
                          rf"tokens \({share}, decimal\)"):
            table = NumberTable.from_tokenizer(_load(family))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # auto leaves nothing out: no warning
            table = NumberTable.from_tokenizer(_load(family))
    assert table.mode == mode
    raw = _raw_number_tokens(family)
    if by_count is not None:
        assert raw == by_count, "the raw vocabulary is not what the family is known to hold"
    assert table.by_digit_count() == raw
    if family == "gpt2":  # "7" and " 7"; "2018", " 1999", ...: merges of any length
        assert max(raw) >= 4 and raw[1] == 20


def _texts():
    from tokenizer_fixtures import make_corpus

    return {"dense": NUMBER_TEXT, "quickstart corpus": make_corpus()}


@pytest.mark.parametrize("family", [f for f in EXPECTED if f != "t5"])
def test_ntl_reaches_99_percent_of_the_digits_by_default(family):
    tokenizer = _load(family)
    table = NumberTable.from_tokenizer(tokenizer)
    for name, lines in _texts().items():
        assert digit_share(lines, tokenizer, table.mode) >= 0.99, name


def test_t5_leaves_out_only_digits_fused_with_other_characters():
    """T5's unigram pieces fuse digits with punctuation ("▁9.", "▁$4", "1.6", "2:30"): those
    digits stay CE's; every piece of digits alone ("▁20", "24") is a number token."""
    tokenizer = vocabularies.t5()
    table = NumberTable.from_tokenizer(tokenizer)
    for lines in _texts().values():
        for line in lines:
            for piece_id in tokenizer.encode(line):
                piece = tokenizer.id_to_piece(piece_id).removeprefix("\u2581")
                if any(ch.isdigit() for ch in piece):
                    assert table.is_number[piece_id] == bool(DIGITS.fullmatch(piece)), piece
    # "▁20" starts a number and "24" continues it: 2024, read whole by ntl="number".
    ids = tokenizer.encode("In 2024 and")
    predicted = list(ids)
    predicted[2] = tokenizer.piece_to_id("25")  # 2025
    out = objective_loss(_peaked_logits(table.vocab_size, predicted), torch.tensor([ids]),
                         ObjectiveConfig(ntl="number"), table)
    assert out.ntl_positions[0].tolist() == [False, True, False, False]
    assert out.ntl[0, 1].item() == pytest.approx(1 / (2025 + 2024), rel=1e-4)


def test_digit_mode_on_llama3_reaches_a_fraction_and_warns_with_the_share():
    tokenizer = vocabularies.llama3()
    assert digit_share(NUMBER_TEXT, tokenizer, "digit") < 0.5
    with pytest.warns(UserWarning, match=r"number_tokens='digit' \(digit\) leaves 1100 of 1110 "
                      r"number tokens \(99\.1%, multi-digit\).*number_tokens='auto'"):
        NumberTable.from_tokenizer(tokenizer, number_tokens="digit", vocab_size=128_257)


def _ids(tokenizer, *tokens: str) -> list[int]:
    return [tokenizer.token_to_id(t) for t in tokens]


def _peaked_logits(vocab: int, peaks: list[int], height: float = 40.0) -> torch.Tensor:
    logits = torch.zeros(1, len(peaks), vocab, dtype=torch.float64)
    for position, token_id in enumerate(peaks):
        logits[0, position, token_id] = height
    return logits


def test_a_near_group_costs_less_than_a_far_one_on_llama3():
    tokenizer = vocabularies.llama3()
    table = NumberTable.from_tokenizer(tokenizer)
    target, near, far, short = _ids(tokenizer, "202", "203", "902", "20")
    labels = torch.tensor([[target]])
    config = ObjectiveConfig(ntl="was")
    costs = {name: objective_loss(_peaked_logits(table.vocab_size, [token]), labels, config,
                                  table).ntl.item()
             for name, token in (("near", near), ("far", far), ("short", short))}
    # Wasserstein-1 of a one-hot prediction is |v - u| within the target's group (3 digits).
    assert costs["near"] == pytest.approx(1.0, abs=1e-6)
    assert costs["far"] == pytest.approx(700.0, abs=1e-4)
    # "20" is another group: mass off the 3-digit group costs reweigh's 1.01 * 999.
    assert costs["short"] == pytest.approx(1.01 * 999, rel=1e-6)


def test_mse_on_llama3_compares_within_the_digit_count():
    tokenizer = vocabularies.llama3()
    table = NumberTable.from_tokenizer(tokenizer)
    four, forty_five, five = _ids(tokenizer, "4", "45", "5")
    config = ObjectiveConfig(ntl="mse", reweigh=False)
    # Half the number mass on "5", half on "45": the 1-digit group's expectation is 5 alone.
    logits = torch.zeros(1, 1, table.vocab_size, dtype=torch.float64)
    logits[0, 0, [five, forty_five]] = 40.0
    out = objective_loss(logits, torch.tensor([[four]]), config, table)
    assert out.ntl.item() == pytest.approx(1.0, abs=1e-9)  # (5 - 4) ** 2


def test_whole_numbers_read_group_by_group_on_llama3():
    tokenizer = vocabularies.llama3()
    table = NumberTable.from_tokenizer(tokenizer)
    text = " 1234567 and 1007"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    tokens = [tokenizer.id_to_token(i) for i in ids]
    assert tokens == ["Ġ", "123", "456", "7", "Ġand", "Ġ", "100", "7"]
    wrong = list(ids)
    wrong[2] = tokenizer.token_to_id("457")  # predicts 1234577
    labels = torch.tensor([ids])
    config = ObjectiveConfig(ntl="number")
    out = objective_loss(_peaked_logits(table.vocab_size, wrong), labels, config, table)
    # Numbers start at "123" and at "100"; the first is off by 10 of 1234567 (SMAPE).
    assert out.ntl_positions[0].tolist() == [False, True, False, False, False, False, True,
                                             False]
    assert out.ntl[0, 1].item() == pytest.approx(10 / (1234577 + 1234567), rel=1e-4)
    assert out.ntl[0, 6].item() == pytest.approx(0.0, abs=1e-7)


def test_inspect_vocab_prints_digit_counts_and_the_text_share(tmp_path, capsys):
    path = tmp_path / "tokenizer.json"
    vocabularies.llama3().save(str(path))
    text = tmp_path / "numbers.txt"
    text.write_text("\n".join(NUMBER_TEXT) + "\n", encoding="utf-8")
    assert main(["inspect-vocab", str(path), "--text", str(text)]) == 0
    out = capsys.readouterr().out
    assert "1110 number tokens (groups: digit groups" in out
    assert "by digit count: 10 of 1 digit, 100 of 2 digits, 1000 of 3 digits" in out
    shares = dict(re.findall(r"^  (digit|groups|multi) +([0-9.]+)%", out, re.M))
    digits = sum(ch.isdigit() for line in NUMBER_TEXT for ch in line)
    assert f"({digits} digits)" in out
    assert float(shares["groups"]) == 100.0 and float(shares["digit"]) < 50
    assert re.search(r"^  groups +100\.0%  <- this table$", out, re.M)


ntloss = pytest.importorskip("ntloss", reason="ntloss is in the test extra")


def test_multi_mode_matches_ntloss_digit_level_false_on_llama3():
    """number_tokens='multi' is ntloss's digit_level=False: every number token, by value."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = vocabularies.llama3()
    table = NumberTable.from_tokenizer(tokenizer, number_tokens="multi")
    assert table.by_digit_count() == {1: 10, 2: 100, 3: 1000}
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    ids = [tokenizer.encode(line, add_special_tokens=False).ids for line in NUMBER_TEXT[:2]]
    labels = torch.full((2, max(map(len, ids))), -100)
    for row, seq in enumerate(ids):
        labels[row, : len(seq)] = torch.tensor(seq)
    vocab = table.vocab_size
    logits = torch.randn(*labels.shape, vocab, generator=torch.Generator().manual_seed(0),
                         dtype=torch.float64) * 2
    for theirs_loss, config in (
        (ntloss.NTLoss(wrapped, digit_level=False, vocab_size=vocab), ObjectiveConfig(ntl="was")),
        (ntloss.NTLossDotProduct(wrapped, digit_level=False, vocab_size=vocab),
         ObjectiveConfig(ntl="mse")),
    ):
        theirs_logits = logits.clone().requires_grad_()
        theirs = theirs_loss(theirs_logits, labels, reduction="none")
        theirs.sum().backward()
        ours_logits = logits.clone().requires_grad_()
        out = objective_loss(ours_logits, labels, config, table)
        out.ntl.sum().backward()
        assert int(out.ntl_positions.sum()) >= 10 and math.isfinite(theirs.sum().item())
        torch.testing.assert_close(out.ntl, theirs, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(ours_logits.grad, theirs_logits.grad, rtol=1e-8,
                                   atol=1e-12)
