"""Quickstart data: generated corpus, tokenizer, Megatron .bin/.idx splits, counts, manifest."""

from __future__ import annotations

import json
import re
import shutil
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
import sentencepiece

from token_objectives.quickstart.build_data import (
    build_quickstart_data,
    generate_corpus,
    main,
    train_tokenizer,
    write_indexed_dataset,
)
from token_objectives.tables.frequencies import load_frequencies
from token_objectives.tables.numbers import NumberTable, tokenizer_identity

pytestmark = [
    pytest.mark.filterwarnings("ignore:Transformer Engine and Apex:UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

NUM_DOCUMENTS = 300
NUM_VALID = 15  # 5 % of 300, the last documents
SEED = 7

SYMBOLIC = re.compile(r"Q: (\d+) ([-+*/]) (\d+) = \? A: (\d+)")
SPOKEN = re.compile(r"What is (\d+) (plus|minus|times|divided by) (\d+)\? (\d+)")
COUNT = re.compile(
    r"(\w+) has (\d+) (\w+) and (buys (\d+) more|gives away (\d+)), so \1 now has (\d+) \3\."
)
PRICE = re.compile(r"One (\w+) costs \$(\d+\.\d\d), so (\d+) (\w+) cost \$(\d+\.\d\d)\.")


def expected_result(a: int, operation: str, b: int) -> int:
    if operation in ("+", "plus"):
        return a + b
    if operation in ("-", "minus"):
        return a - b
    if operation in ("*", "times"):
        return a * b
    assert a % b == 0, f"{a} / {b} is not a whole number"
    return a // b


def read_documents(prefix: Path) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix), mmap=True)
    return [dataset[i].tolist() for i in range(len(dataset))]


def modification_times(directory: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def documents() -> list[str]:
    return generate_corpus(NUM_DOCUMENTS, seed=SEED)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_quickstart_data(
        tmp_path_factory.mktemp("quickstart"), num_documents=NUM_DOCUMENTS, seed=SEED
    )


@pytest.fixture(scope="module")
def processor(built) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(built.tokenizer_path))


@pytest.fixture
def build_copy(built, tmp_path) -> Path:
    """A private copy of the module's build directory, to rebuild or damage."""
    directory = tmp_path / "copy"
    shutil.copytree(built.tokenizer_path.parent, directory)
    return directory


# ------------------------------------------------------------------------------------------ corpus


def test_corpus_arithmetic_answers_are_correct(documents):
    lines = [line for document in documents for line in document.splitlines()]
    checked = {"symbolic": 0, "spoken": 0, "count": 0, "price": 0}
    for line in lines:
        if match := SYMBOLIC.fullmatch(line):
            a, operation, b, answer = match.groups()
            assert expected_result(int(a), operation, int(b)) == int(answer), line
            checked["symbolic"] += 1
        elif match := SPOKEN.fullmatch(line):
            a, operation, b, answer = match.groups()
            assert expected_result(int(a), operation, int(b)) == int(answer), line
            checked["spoken"] += 1
        elif match := COUNT.fullmatch(line):
            _, have, _, _, bought, given, now = match.groups()
            change = int(bought) if bought is not None else -int(given)
            assert int(have) + change == int(now), line
            assert int(now) >= 0, line
            checked["count"] += 1
        elif match := PRICE.fullmatch(line):
            _, price, count, _, total = match.groups()
            assert Decimal(price) * int(count) == Decimal(total), line
            checked["price"] += 1
        else:
            # Whatever no pattern matched must not look like a problem with an answer.
            assert not re.search(r"= \?|What is|now has| cost \$", line), f"unparsed: {line!r}"
    assert min(checked.values()) >= 50, checked


def test_corpus_is_deterministic_per_seed(documents):
    assert generate_corpus(NUM_DOCUMENTS, seed=SEED) == documents
    other = generate_corpus(NUM_DOCUMENTS, seed=SEED + 1)
    assert len(other) == NUM_DOCUMENTS
    assert other != documents
    assert generate_corpus(10, seed=SEED) == documents[:10]
    assert all(document.count("\n") >= 2 for document in documents)
    digits = sum(character.isdigit() for document in documents for character in document)
    assert digits / sum(len(document) for document in documents) > 0.15


# --------------------------------------------------------------------------------------- tokenizer


def test_every_digit_is_a_single_token(built, processor):
    for text in ("0123456789", "The year 2024 cost $13.50.", "Q: 37 + 45 = ? A: 82"):
        pieces = processor.encode(text, out_type=str)
        assert processor.decode(processor.encode(text)) == text
        for piece in pieces:
            if any(character.isdigit() for character in piece):
                assert len(piece) == 1, (text, pieces)
    numbers = NumberTable.from_tokenizer(built.tokenizer_path)
    values = sorted(numbers.values[numbers.number_ids].tolist())
    assert values == [float(digit) for digit in range(10)]
    assert numbers.number_ids.tolist() == sorted(processor.piece_to_id(str(d)) for d in range(10))
    assert processor.get_piece_size() == built.vocab_size == 512
    assert processor.id_to_piece(processor.eos_id()) == "</s>"


def test_too_small_corpus_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="smaller vocab_size"):
        train_tokenizer(generate_corpus(3), tmp_path, vocab_size=4000)


# -------------------------------------------------------------------------------- indexed datasets


def test_indexed_datasets_hold_the_encodings_plus_eos(built, processor, documents):
    splits = [
        (built.train_prefix, documents[:-NUM_VALID], built.num_train_tokens),
        (built.valid_prefix, documents[-NUM_VALID:], built.num_valid_tokens),
    ]
    for prefix, texts, num_tokens in splits:
        expected = [processor.encode(text) + [processor.eos_id()] for text in texts]
        assert read_documents(prefix) == expected
        assert num_tokens == sum(map(len, expected))
        # Megatron's dtype for a vocab below 65500 ids is uint16.
        assert Path(f"{prefix}.bin").stat().st_size == 2 * num_tokens


def test_write_indexed_dataset_needs_eos_for_other_tokenizers(bpe_tokenizer_path, tmp_path):
    from tokenizers import Tokenizer

    texts = ["Alice bought 12 apples.", "", "It was 3.5 degrees in 1999."]
    with pytest.raises(ValueError, match="eos_id"):
        write_indexed_dataset(texts, bpe_tokenizer_path, tmp_path / "data")
    tokenizer = Tokenizer.from_file(str(bpe_tokenizer_path))
    eos = tokenizer.token_to_id("<eos>")
    written = write_indexed_dataset(texts, bpe_tokenizer_path, tmp_path / "data", eos_id=eos)
    expected = [tokenizer.encode(text, add_special_tokens=False).ids + [eos] for text in texts]
    assert read_documents(tmp_path / "data") == expected
    assert written == sum(map(len, expected))


# ------------------------------------------------------------------------------------- frequencies


def test_frequencies_count_the_train_split(built, processor):
    train_tokens = np.concatenate([np.asarray(ids) for ids in read_documents(built.train_prefix)])
    table = load_frequencies(built.frequencies_path)
    assert table.vocab_size == processor.get_piece_size() == built.vocab_size
    np.testing.assert_array_equal(
        table.counts.numpy(), np.bincount(train_tokens, minlength=processor.get_piece_size())
    )
    assert table.num_tokens == built.num_train_tokens == train_tokens.size
    assert table.tokenizer_identity == tokenizer_identity(processor)


def test_pdl_alpha_is_checked(build_copy):
    build_quickstart_data(build_copy, NUM_DOCUMENTS, seed=SEED, pdl_alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        build_quickstart_data(build_copy, NUM_DOCUMENTS, seed=SEED, pdl_alpha=-1.0)


# ---------------------------------------------------------------------------------------- manifest


def test_matching_manifest_skips_the_build(built, build_copy):
    before = modification_times(build_copy)
    again = build_quickstart_data(build_copy, num_documents=NUM_DOCUMENTS, seed=SEED)
    assert modification_times(build_copy) == before
    assert again.tokenizer_path == build_copy.resolve() / "tokenizer.model"
    assert (again.vocab_size, again.num_train_tokens) == (built.vocab_size, built.num_train_tokens)


def file_contents(directory: Path) -> dict[str, bytes]:
    """Bytes of each file; the safetensors header's key order varies, so its counts instead."""
    contents = {path.name: path.read_bytes() for path in directory.iterdir()}
    frequencies = load_frequencies(directory / "frequencies.safetensors")
    contents["frequencies.safetensors"] = frequencies.counts.numpy().tobytes()
    return contents


def test_changed_argument_rebuilds_and_the_build_is_reproducible(built, build_copy):
    original = file_contents(build_copy)
    other = build_quickstart_data(build_copy, num_documents=NUM_DOCUMENTS, seed=SEED + 1)
    manifest = json.loads((build_copy / "manifest.json").read_text())
    assert manifest["arguments"]["seed"] == SEED + 1
    train_bin = (build_copy / "train_text_document.bin").read_bytes()
    assert train_bin != original["train_text_document.bin"]
    assert other.num_train_tokens == load_frequencies(other.frequencies_path).num_tokens
    # Back to the first arguments: rebuilt from scratch, byte for byte the same files.
    build_quickstart_data(build_copy, num_documents=NUM_DOCUMENTS, seed=SEED)
    assert file_contents(build_copy) == original


def test_build_without_manifest_is_redone(built, build_copy):
    (build_copy / "manifest.json").unlink()
    train_bin = build_copy / "train_text_document.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:100])  # an interrupted write
    before = modification_times(build_copy)
    again = build_quickstart_data(build_copy, num_documents=NUM_DOCUMENTS, seed=SEED)
    after = modification_times(build_copy)
    assert "manifest.json" in after
    assert all(after[name] != time for name, time in before.items())
    assert again.num_train_tokens == built.num_train_tokens
    assert read_documents(again.train_prefix) == read_documents(built.train_prefix)


def test_damaged_file_under_a_manifest_is_rebuilt(built, build_copy):
    frequencies = build_copy / "frequencies.safetensors"
    frequencies.write_bytes(b"truncated")
    build_quickstart_data(build_copy, num_documents=NUM_DOCUMENTS, seed=SEED)
    assert load_frequencies(frequencies).num_tokens == built.num_train_tokens


def test_cli_prints_a_summary(build_copy, capsys):
    before = modification_times(build_copy)
    argv = ["--output-dir", str(build_copy), "--num-documents", str(NUM_DOCUMENTS)]
    assert main([*argv, "--seed", str(SEED)]) == 0
    output = capsys.readouterr().out
    assert modification_times(build_copy) == before
    assert "number tokens: 10 (values [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])" in output
    train_tokens = load_frequencies(build_copy / "frequencies.safetensors").num_tokens
    assert f"({train_tokens} tokens)" in output
    assert str(build_copy.resolve() / "tokenizer.model") in output


def test_interrupted_rebuild_leaves_no_manifest(built, build_copy, monkeypatch):
    import token_objectives.quickstart.build_data as quickstart_data

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(quickstart_data, "count_indexed_dataset", interrupted)
        with pytest.raises(KeyboardInterrupt):
            build_quickstart_data(build_copy, num_documents=NUM_DOCUMENTS, seed=SEED + 1)
    assert not (build_copy / "manifest.json").exists()
    again = build_quickstart_data(build_copy, num_documents=NUM_DOCUMENTS, seed=SEED)
    assert read_documents(again.train_prefix) == read_documents(built.train_prefix)
