"""Number-token tables built from real, locally trained tokenizers."""

from __future__ import annotations

import math
import re
import shutil

import pytest
import sentencepiece
import torch
from tokenizer_fixtures import word_level_tokenizer
from tokenizers import Tokenizer

from token_objectives.tables.numbers import NumberTable, load_tokenizer, tokenizer_identity

DIGITS = [str(d) for d in range(10)]


def table_as_dict(table: NumberTable) -> dict[int, float]:
    return {i: table.values[i].item() for i in table.number_ids.tolist()}


def expected_digit_ids(lookup, marker: str) -> dict[int, float]:
    """id -> value for every spelling "d" / "<marker>d" that the vocabulary really holds."""
    expected = {}
    for digit in DIGITS:
        for spelling in (digit, marker + digit):
            token_id = lookup(spelling)
            if token_id is not None:
                expected[token_id] = float(digit)
    return expected


def sp_lookup(processor: sentencepiece.SentencePieceProcessor):
    def lookup(piece: str) -> int | None:
        token_id = processor.piece_to_id(piece)
        return token_id if processor.id_to_piece(token_id) == piece else None

    return lookup


# ---------------------------------------------------------------------------------- digit mode


def test_sentencepiece_digits(sp_model_path):
    processor = sentencepiece.SentencePieceProcessor(model_file=str(sp_model_path))
    table = NumberTable.from_tokenizer(processor)

    expected = expected_digit_ids(sp_lookup(processor), "\u2581")
    assert table_as_dict(table) == expected
    assert sorted(set(expected.values())) == [float(d) for d in range(10)]
    assert table.vocab_size == table.valid_vocab_size == processor.get_piece_size()
    assert table.digit_level
    assert table.dot_id == processor.piece_to_id(".")
    assert processor.id_to_piece(table.dot_id) == "."


def test_bpe_digits_and_hf_wrapper_agree(bpe_tokenizer_path, hf_tokenizer):
    tokenizer = Tokenizer.from_file(str(bpe_tokenizer_path))
    table = NumberTable.from_tokenizer(tokenizer)

    expected = expected_digit_ids(tokenizer.token_to_id, "\u0120")
    assert table_as_dict(table) == expected
    # The pre-tokenizer isolates digits, so each digit is one plain token (what ntloss expects).
    assert sorted(expected) == sorted(tokenizer.token_to_id(d) for d in DIGITS)
    assert table.dot_id == tokenizer.token_to_id(".")

    hf_table = NumberTable.from_tokenizer(hf_tokenizer)
    expected_hf = {hf_tokenizer.convert_tokens_to_ids(d): float(d) for d in DIGITS}
    assert table_as_dict(hf_table) == expected_hf
    torch.testing.assert_close(hf_table.values, table.values, equal_nan=True, rtol=0, atol=0)
    assert hf_table.tokenizer_identity == table.tokenizer_identity


MISSING_DIGITS_OK = pytest.mark.filterwarnings("ignore:digit-level number tokens")


@MISSING_DIGITS_OK
def test_word_boundary_markers_strip_exactly_one():
    numbers = ["7", "\u25817", "\u01207", " 7"]
    not_numbers = ["\u2581\u25817", "\u0120 7", "  7", "7\u2581", "7 ", "77", "\u2581", "a7"]
    tokenizer = word_level_tokenizer(["a", *numbers, *not_numbers])
    table = NumberTable.from_tokenizer(tokenizer, number_tokens="digit")
    assert table_as_dict(table) == {tokenizer.token_to_id(t): 7.0 for t in numbers}
    assert len(set(numbers)) == table.number_ids.numel() == 4


@MISSING_DIGITS_OK
def test_digit_mode_ignores_multi_digit_tokens():
    tokenizer = word_level_tokenizer(["3", "42", "\u25812024", "3.5"])
    table = NumberTable.from_tokenizer(tokenizer, digit_level=True)
    assert table_as_dict(table) == {tokenizer.token_to_id("3"): 3.0}


def test_missing_digits_warn():
    with pytest.warns(UserWarning, match=r"lack the digits \[0, 1, 2, 4, 5, 6, 7, 8, 9\]"):
        NumberTable.from_tokenizer(word_level_tokenizer(["3", "x"]))


# ----------------------------------------------------------------------------- multi-digit mode

MULTI_DIGIT_NUMBERS = {"42": 42.0, "\u25812024": 2024.0, "3.5": 3.5, "\u01200.25": 0.25, "007": 7.0}
# Python's float() accepts most of these; none is a number token.
JUNK = [
    "nan", "NaN", "inf", "infinity", "Infinity", "1e5", "3.5e2", "1_000", "_1", "\u0661",
    "\u0663\u0664", "+3", "-2", " 7 ", "7\n", "\u25817 ", "3.", ".5", "1.2.3", "1,000", "0x1F",
    "\u00b2", "\uff17",
]  # fmt: skip


def test_multi_digit_tokens_and_junk():
    tokenizer = word_level_tokenizer([*MULTI_DIGIT_NUMBERS, *JUNK])
    table = NumberTable.from_tokenizer(tokenizer, digit_level=False)
    expected = {tokenizer.token_to_id(t): v for t, v in MULTI_DIGIT_NUMBERS.items()}
    assert table_as_dict(table) == expected
    assert not table.digit_level


@pytest.mark.parametrize("junk", JUNK)
def test_each_junk_string_is_not_a_number(junk):
    tokenizer = word_level_tokenizer(["1", junk])
    table = NumberTable.from_tokenizer(tokenizer, digit_level=False)
    assert table_as_dict(table) == {tokenizer.token_to_id("1"): 1.0}


def test_junk_list_holds_real_traps():
    def float_accepts(text: str) -> bool:
        try:
            float(text)
        except ValueError:
            return False
        return True

    traps = {"nan", "inf", "infinity", "1e5", "1_000", "\u0661", "+3", "-2", " 7 ", "3.", ".5"}
    assert all(float_accepts(t) for t in traps)
    assert traps <= set(JUNK)


def test_multi_digit_mode_on_trained_tokenizers(sp_model_path, bpe_tokenizer_path):
    # Digits are split in both, so multi-digit mode sees the same ten digit tokens.
    for path in (sp_model_path, bpe_tokenizer_path):
        digit = NumberTable.from_tokenizer(path, digit_level=True)
        multi = NumberTable.from_tokenizer(path, digit_level=False)
        torch.testing.assert_close(multi.values, digit.values, equal_nan=True, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ padding


def test_padded_vocab(bpe_tokenizer_path):
    tokenizer = Tokenizer.from_file(str(bpe_tokenizer_path))
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    plain = NumberTable.from_tokenizer(tokenizer)
    padded = NumberTable.from_tokenizer(tokenizer, vocab_size=size + 13)

    assert padded.vocab_size == padded.values.numel() == size + 13
    assert padded.valid_vocab_size == plain.valid_vocab_size == size
    assert torch.isnan(padded.values[size:]).all()
    assert not padded.is_number[size:].any()
    assert torch.equal(padded.number_ids, plain.number_ids)
    torch.testing.assert_close(padded.values[:size], plain.values, equal_nan=True, rtol=0, atol=0)


def test_vocab_size_smaller_than_tokenizer(bpe_tokenizer_path):
    tokenizer = Tokenizer.from_file(str(bpe_tokenizer_path))
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    with pytest.raises(ValueError, match=rf"vocab_size {size - 1} is smaller .* {size} ids"):
        NumberTable.from_tokenizer(tokenizer, vocab_size=size - 1)


# ------------------------------------------------------------------------------------- errors


def test_no_number_tokens_digit_mode_names_the_fixes():
    tokenizer = word_level_tokenizer(["a", "b", "\u2581x", "42"])
    with pytest.raises(ValueError) as error:
        NumberTable.from_tokenizer(tokenizer, number_tokens="digit")
    message = str(error.value)
    for fix in ("--split_digits=true", "number_tokens='auto'", "--number-tokens auto",
                "ntl=None"):
        assert fix in message
    assert tokenizer_identity(tokenizer) in message


def test_no_number_tokens_multi_mode_names_the_fix():
    tokenizer = word_level_tokenizer(["a", "nan", "1e5"])
    with pytest.raises(ValueError, match="ntl=None"):
        NumberTable.from_tokenizer(tokenizer, digit_level=False)


def test_unsupported_tokenizer_type():
    with pytest.raises(TypeError, match="unsupported tokenizer type"):
        NumberTable.from_tokenizer(object())


# ------------------------------------------------------------------------------ from_values


def test_from_values_properties():
    nan = math.nan
    table = NumberTable.from_values([nan, 5.0, nan, 0.0, 2.5, nan], valid_vocab_size=5, dot_id=2)
    assert table.values.dtype == torch.float32
    assert table.vocab_size == 6 and table.valid_vocab_size == 5 and table.dot_id == 2
    assert table.is_number.tolist() == [False, True, False, True, True, False]
    assert table.number_ids.tolist() == [1, 3, 4]
    assert table.number_ids.dtype == torch.long
    assert table.tokenizer_identity == "values"


@pytest.mark.parametrize(
    ("values", "kwargs", "match"),
    [
        ([math.nan, math.nan], {}, "no number tokens"),
        ([1.0, 2.0, 3.0], {"valid_vocab_size": 2}, "padding and must be NaN"),
        ([1.0, math.inf], {}, "finite"),
        ([1.0, math.nan], {"valid_vocab_size": 3}, "valid_vocab_size 3"),
        ([1.0, math.nan], {"dot_id": 0}, "dot_id 0"),
        ([[1.0]], {}, "1-D"),
    ],
)
def test_from_values_validation(values, kwargs, match):
    with pytest.raises(ValueError, match=match):
        NumberTable.from_values(values, **kwargs)


def test_describe_lists_every_number_token(sp_model_path):
    processor = sentencepiece.SentencePieceProcessor(model_file=str(sp_model_path))
    table = NumberTable.from_tokenizer(processor)
    text = table.describe()
    assert f"{table.number_ids.numel()} number tokens (digit: digit-level)" in text
    assert "by digit count: 10 of 1 digit\n" in text
    assert table.tokenizer_identity in text
    for token_id, value in expected_digit_ids(sp_lookup(processor), "\u2581").items():
        piece = processor.id_to_piece(token_id)
        assert re.search(rf"^\s+{token_id}\s+{re.escape(repr(piece))} -> {int(value)}$", text, re.M)


# ----------------------------------------------------------------------- loading and identity


def test_load_tokenizer_path_forms(sp_model_path, bpe_tokenizer_path, tmp_path):
    assert isinstance(load_tokenizer(sp_model_path), sentencepiece.SentencePieceProcessor)
    assert isinstance(load_tokenizer(str(sp_model_path)), sentencepiece.SentencePieceProcessor)
    assert isinstance(load_tokenizer(bpe_tokenizer_path), Tokenizer)
    assert isinstance(load_tokenizer(bpe_tokenizer_path.parent), Tokenizer)

    sp_dir = tmp_path / "sp_only"
    sp_dir.mkdir()
    shutil.copy(sp_model_path, sp_dir / "tokenizer.model")
    assert isinstance(load_tokenizer(sp_dir), sentencepiece.SentencePieceProcessor)

    shutil.copy(bpe_tokenizer_path, sp_dir / "tokenizer.json")
    assert isinstance(load_tokenizer(sp_dir), Tokenizer)  # tokenizer.json is preferred


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_tokenizer("gpt2")
    with pytest.raises(ValueError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path)
    text = tmp_path / "vocab.txt"
    text.write_text("a\nb\n")
    with pytest.raises(ValueError, match="cannot tell the tokenizer kind"):
        load_tokenizer(text)
    broken_json = tmp_path / "tokenizer.json"
    broken_json.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizers JSON file"):
        load_tokenizer(broken_json)
    broken_model = tmp_path / "broken.model"
    broken_model.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="not a valid sentencepiece model"):
        load_tokenizer(broken_model)


def test_identity_format_stability_and_distinctness(sp_model_path, bpe_tokenizer_path):
    sp_identity = tokenizer_identity(sp_model_path)
    bpe_identity = tokenizer_identity(bpe_tokenizer_path)
    assert re.fullmatch(r"sentencepiece:[^:]+:sha256:[0-9a-f]{16}", sp_identity)
    assert re.fullmatch(r"tokenizers:[^:]+:sha256:[0-9a-f]{16}", bpe_identity)
    assert sp_identity != bpe_identity
    assert tokenizer_identity(load_tokenizer(sp_model_path)) == sp_identity
    assert tokenizer_identity(Tokenizer.from_file(str(bpe_tokenizer_path))) == bpe_identity
    assert tokenizer_identity(bpe_tokenizer_path.parent) == bpe_identity


def test_identity_sees_id_order():
    # Same token set, two ids swapped: a different vocabulary, so a different identity.
    first = tokenizer_identity(word_level_tokenizer(["1", "2", "a"]))
    second = tokenizer_identity(word_level_tokenizer(["2", "1", "a"]))
    assert first != second
    assert first == tokenizer_identity(word_level_tokenizer(["1", "2", "a"]))


def test_tokenizers_are_not_mutated(hf_tokenizer, bpe_tokenizer_path, sp_model_path):
    hf_before = (len(hf_tokenizer), dict(hf_tokenizer.get_vocab()))
    NumberTable.from_tokenizer(hf_tokenizer, digit_level=True)
    NumberTable.from_tokenizer(hf_tokenizer, digit_level=False)
    assert (len(hf_tokenizer), dict(hf_tokenizer.get_vocab())) == hf_before

    tokenizer = Tokenizer.from_file(str(bpe_tokenizer_path))
    before = tokenizer.get_vocab(with_added_tokens=True)
    NumberTable.from_tokenizer(tokenizer)
    assert tokenizer.get_vocab(with_added_tokens=True) == before

    processor = sentencepiece.SentencePieceProcessor(model_file=str(sp_model_path))
    size = processor.get_piece_size()
    NumberTable.from_tokenizer(processor)
    assert processor.get_piece_size() == size


def test_slow_transformers_tokenizer(sp_model_path):
    transformers = pytest.importorskip("transformers")
    slow_class = getattr(transformers, "SentencePieceBackend", None)
    if slow_class is None:
        pytest.skip("this transformers version has no SentencePieceBackend")
    slow = slow_class(vocab_file=str(sp_model_path))
    table = NumberTable.from_tokenizer(slow)
    reference = NumberTable.from_tokenizer(sp_model_path)
    torch.testing.assert_close(table.values, reference.values, equal_nan=True, rtol=0, atol=0)
    assert table.dot_id == reference.dot_id
    assert table.tokenizer_identity.startswith("transformers:")
