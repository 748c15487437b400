"""Token counting (Megatron indexed datasets, text), the frequencies file, PDL weights, the CLI."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from token_objectives.cli import main
from token_objectives.tables.frequencies import (
    FrequencyTable,
    count_indexed_dataset,
    count_text_files,
    load_frequencies,
    pdl_weights,
    save_frequencies,
)
from token_objectives.tables.numbers import tokenizer_identity

VOCAB = 1000
# Importing megatron-core warns about optional GPU libraries and its own deprecations.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Transformer Engine and Apex:UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def write_indexed_dataset(prefix: Path, documents: list[np.ndarray], dtype) -> str:
    """Megatron .bin/.idx pair holding `documents`, one item per document."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for document in documents:
        builder.add_item(torch.from_numpy(document.astype(np.int64)))
        builder.end_document()
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def random_documents(seed: int, count: int, high: int = VOCAB) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Zipf-like skew so counts differ a lot between ids; one empty document on purpose.
    lengths = [0, *rng.integers(1, 300, size=count - 1)]
    return [np.minimum(rng.zipf(1.3, size=n) - 1, high - 1) for n in lengths]


@pytest.fixture(scope="module")
def indexed_datasets(tmp_path_factory):
    """Two prefixes (uint16 and int32 token files) and every token written to them."""
    root = tmp_path_factory.mktemp("indexed")
    first, second = random_documents(1, 12), random_documents(2, 9)
    prefixes = [
        write_indexed_dataset(root / "first", first, np.uint16),
        write_indexed_dataset(root / "second", second, np.int32),
    ]
    return prefixes, np.concatenate(first + second)


# ----------------------------------------------------------------------------- indexed datasets


def test_count_indexed_dataset_matches_bincount(indexed_datasets):
    prefixes, tokens = indexed_datasets
    assert tokens.size > 5 * 97  # several chunks of 97 tokens per dataset
    counts = count_indexed_dataset(prefixes, VOCAB, chunk_tokens=97, progress=False)
    assert counts.dtype == np.int64 and counts.shape == (VOCAB,)
    np.testing.assert_array_equal(counts, np.bincount(tokens, minlength=VOCAB))


def test_count_indexed_dataset_chunk_size_does_not_matter(indexed_datasets):
    prefixes, _ = indexed_datasets
    whole = count_indexed_dataset(prefixes, VOCAB, progress=False)
    for chunk_tokens in (1, 64, 10_000):
        chunked = count_indexed_dataset(prefixes, VOCAB, chunk_tokens=chunk_tokens, progress=False)
        np.testing.assert_array_equal(chunked, whole)


def test_count_indexed_dataset_id_beyond_vocab(tmp_path):
    documents = [np.arange(10), np.array([3, 777, 4])]
    prefix = write_indexed_dataset(tmp_path / "wide", documents, np.int32)
    with pytest.raises(ValueError) as error:
        count_indexed_dataset([prefix], 500, chunk_tokens=4, progress=False)
    message = str(error.value)
    assert "777" in message and prefix in message and "padded vocab size" in message


def test_count_indexed_dataset_missing_prefix(tmp_path):
    with pytest.raises(FileNotFoundError, match="without .bin/.idx"):
        count_indexed_dataset([str(tmp_path / "absent")], VOCAB, progress=False)


def test_counting_needs_no_megatron(indexed_datasets, monkeypatch):
    """The .idx is read by tables.indexed_dataset's own check: counting needs no megatron-core."""
    prefixes, tokens = indexed_datasets
    monkeypatch.setitem(sys.modules, "megatron.core.datasets.indexed_dataset", None)
    counts = count_indexed_dataset(prefixes, VOCAB, progress=False)
    np.testing.assert_array_equal(counts, np.bincount(tokens, minlength=VOCAB))


# --------------------------------------------------------------------------------- text files


@pytest.fixture(scope="module")
def split_corpus(tmp_path_factory, corpus_lines) -> list[Path]:
    root = tmp_path_factory.mktemp("split")
    half = len(corpus_lines) // 2
    paths = [root / "a.txt", root / "b.txt"]
    paths[0].write_text("\n".join(corpus_lines[:half]) + "\n", encoding="utf-8")
    paths[1].write_text("\n".join(corpus_lines[half:]), encoding="utf-8")  # no final newline
    return paths


def expected_text_counts(encode, lines: list[str], vocab_size: int, eod: int | None = None
                         ) -> np.ndarray:
    """Counts of every line's ids, plus one `eod` per line with tokens (--append-eod)."""
    ids = [i for line in lines for i in encode(line)]
    ids += [eod for line in lines if eod is not None and encode(line)]
    return np.bincount(np.array(ids, dtype=np.int64), minlength=vocab_size)


def test_count_text_sentencepiece(split_corpus, corpus_lines, sp_model_path):
    processor = sentencepiece.SentencePieceProcessor(model_file=str(sp_model_path))
    size = processor.get_piece_size()
    counts = count_text_files(split_corpus, sp_model_path, size + 6, progress=False, batch_lines=7)
    np.testing.assert_array_equal(
        counts, expected_text_counts(processor.encode, corpus_lines, size + 6, processor.eos_id())
    )
    assert counts[processor.eos_id()] == len(corpus_lines)


def test_count_text_bpe_and_hf(split_corpus, corpus_lines, bpe_tokenizer_path, hf_tokenizer):
    tokenizer = Tokenizer.from_file(str(bpe_tokenizer_path))
    size = tokenizer.get_vocab_size()
    eod = tokenizer.token_to_id("<eos>")
    expected = expected_text_counts(
        lambda line: tokenizer.encode(line, add_special_tokens=False).ids, corpus_lines, size, eod
    )
    assert expected.sum() > 1000
    for candidate in (tokenizer, hf_tokenizer, str(bpe_tokenizer_path)):
        counts = count_text_files(split_corpus, candidate, size, progress=False, batch_lines=50)
        np.testing.assert_array_equal(counts, expected)
    without = count_text_files(split_corpus, tokenizer, size, progress=False, append_eod=False)
    expected[eod] = 0
    np.testing.assert_array_equal(without, expected)


def test_count_text_vocab_too_small(split_corpus, bpe_tokenizer_path):
    with pytest.raises(ValueError, match=r"outside \[0, vocab_size=20\)"):
        count_text_files(split_corpus, bpe_tokenizer_path, 20, progress=False)


# -------------------------------------------------------------------------------- file format


def test_save_load_roundtrip(tmp_path):
    counts = np.random.default_rng(0).integers(0, 2**40, size=321, dtype=np.int64)
    counts[[0, 5]] = 0
    path = tmp_path / "freq.safetensors"
    save_frequencies(
        path, counts, tokenizer_identity="tokenizers:BPE-321:sha256:abc", vocab_size=321
    )

    table = load_frequencies(
        path, vocab_size=321, tokenizer_identity="tokenizers:BPE-321:sha256:abc"
    )
    assert isinstance(table, FrequencyTable)
    assert table.counts.dtype == torch.int64
    np.testing.assert_array_equal(table.counts.numpy(), counts)
    assert table.num_tokens == int(sum(int(c) for c in counts))
    assert table.vocab_size == 321
    assert table.tokenizer_identity == "tokenizers:BPE-321:sha256:abc"
    assert not list(tmp_path.glob("*.partial"))


def test_load_size_mismatch_names_both_sizes(tmp_path):
    path = tmp_path / "freq.safetensors"
    save_frequencies(path, np.ones(256, dtype=np.int64), tokenizer_identity="x")
    with pytest.raises(ValueError) as error:
        load_frequencies(path, vocab_size=384)
    message = str(error.value)
    assert "256" in message and "384" in message and "--vocab-size 384" in message


def test_load_identity_mismatch(tmp_path):
    path = tmp_path / "freq.safetensors"
    save_frequencies(path, np.ones(8, dtype=np.int64), tokenizer_identity="spm:a")
    assert load_frequencies(path).tokenizer_identity == "spm:a"
    with pytest.raises(ValueError, match="counted with tokenizer 'spm:a', not 'spm:b'"):
        load_frequencies(path, tokenizer_identity="spm:b")


def corrupt_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.safetensors"
    counts = np.arange(64, dtype=np.int64)
    save_frequencies(good, counts, tokenizer_identity="x")
    data = good.read_bytes()
    files = {
        "truncated": data[: len(data) // 2],
        "garbage": bytes(range(256)) * 4,
        "empty": b"",
        # Same header, one count changed: only the num_tokens check can see it.
        "flipped": data[:-8] + np.int64(12345).tobytes(),
    }
    paths = {}
    for name, content in files.items():
        paths[name] = tmp_path / f"{name}.safetensors"
        paths[name].write_bytes(content)
    paths["foreign"] = tmp_path / "foreign.safetensors"
    save_file({"counts": torch.from_numpy(counts)}, str(paths["foreign"]))
    paths["missing"] = tmp_path / "missing.safetensors"
    return paths


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "flipped", "foreign", "missing"])
def test_load_rejects_bad_files(tmp_path, kind):
    path = corrupt_files(tmp_path)[kind]
    with pytest.raises(ValueError) as error:
        load_frequencies(path)
    assert str(path) in str(error.value)
    assert "token-objectives count-frequencies" in str(error.value)


def test_save_validates(tmp_path):
    with pytest.raises(ValueError, match="vocab_size is 9"):
        save_frequencies(
            tmp_path / "f", np.ones(8, dtype=np.int64), tokenizer_identity="x", vocab_size=9
        )
    with pytest.raises(ValueError, match="non-negative"):
        save_frequencies(tmp_path / "f", np.array([1, -1]), tokenizer_identity="x")
    with pytest.raises(ValueError, match="integers"):
        save_frequencies(tmp_path / "f", np.array([1.5, 2.0]), tokenizer_identity="x")


# ------------------------------------------------------------------------------------ weights

COUNTS = [0, 1, 5, 100, 0, 37, 2, 100_000]


def reference_weights(counts, alpha, eps, unseen=None, normalize=True) -> list[float]:
    seen = [c for c in counts if c > 0]
    unseen = math.pow(min(seen) + eps, -alpha) if unseen is None else unseen
    raw = [math.pow(c + eps, -alpha) if c > 0 else unseen for c in counts]
    if not normalize:
        return raw
    scale = sum(counts) / math.fsum(c * w for c, w in zip(counts, raw, strict=True))
    return [w * scale for w in raw]


@pytest.mark.parametrize(("alpha", "eps"), [(0.5, 1.0), (1.0, 0.01), (0.25, 3.0)])
@pytest.mark.parametrize("normalize", [True, False])
def test_pdl_weights_formula(alpha, eps, normalize):
    weights = pdl_weights(np.array(COUNTS), alpha, eps=eps, normalize=normalize)
    assert weights.dtype == torch.float32 and weights.shape == (len(COUNTS),)
    expected = torch.tensor(reference_weights(COUNTS, alpha, eps, normalize=normalize))
    torch.testing.assert_close(weights, expected.float(), rtol=1e-6, atol=0)


def test_unseen_tokens_get_the_rarest_seen_weight():
    alpha, eps = 1.0, 0.01
    weights = pdl_weights(torch.tensor(COUNTS), alpha, eps=eps, normalize=False)
    rarest_seen = (1 + eps) ** -alpha  # count 1 is the smallest positive count
    assert weights[0].item() == pytest.approx(rarest_seen, rel=1e-6)
    assert weights[4].item() == pytest.approx(rarest_seen, rel=1e-6)
    assert weights[0].item() < 0.01 * eps**-alpha


def test_unseen_weight_override_is_on_the_unnormalised_scale():
    alpha, eps = 0.5, 1.0
    weights = pdl_weights(np.array(COUNTS), alpha, eps=eps, unseen_weight=0.25)
    expected = reference_weights(COUNTS, alpha, eps, unseen=0.25)
    assert weights[0].item() == pytest.approx(expected[0], rel=1e-6)
    assert weights[4].item() == pytest.approx(expected[4], rel=1e-6)


def test_normalised_corpus_mean_is_one():
    counts = np.random.default_rng(3).integers(0, 10_000, size=500)
    weights = pdl_weights(counts, 0.7).double().numpy()
    assert (counts * weights).sum() / counts.sum() == pytest.approx(1.0, rel=1e-6)


def test_alpha_zero_is_all_ones():
    weights = pdl_weights(np.array(COUNTS), 0.0)
    assert torch.equal(weights, torch.ones(len(COUNTS)))


def test_pdl_weights_accept_a_frequency_table(tmp_path):
    save_frequencies(tmp_path / "f", np.array(COUNTS), tokenizer_identity="x")
    table = load_frequencies(tmp_path / "f")
    torch.testing.assert_close(pdl_weights(table, 0.5), pdl_weights(np.array(COUNTS), 0.5))


@pytest.mark.parametrize(
    ("counts", "kwargs", "match"),
    [
        ([0, 0, 0], {"alpha": 0.5}, "all counts are zero"),
        ([1, 2], {"alpha": -0.5}, "alpha"),
        ([1, 2], {"alpha": 0.5, "eps": -1.0}, "eps"),
        ([1, 2], {"alpha": 0.5, "unseen_weight": math.nan}, "unseen_weight"),
    ],
)
def test_pdl_weights_validation(counts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pdl_weights(np.array(counts), **kwargs)


# ---------------------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "token_objectives.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def test_cli_count_indexed_dataset(indexed_datasets, tmp_path):
    prefixes, tokens = indexed_datasets
    output = tmp_path / "freq.safetensors"
    result = run_cli(
        "count-frequencies", "--output", output, "--vocab-size", VOCAB, "--no-progress",
        "--data-prefix", *prefixes,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"counted {tokens.size} tokens" in result.stdout
    table = load_frequencies(output, vocab_size=VOCAB)
    np.testing.assert_array_equal(table.counts.numpy(), np.bincount(tokens, minlength=VOCAB))
    assert table.tokenizer_identity == "unknown"


def test_cli_count_text(split_corpus, corpus_lines, bpe_tokenizer_path, tmp_path, capsys):
    tokenizer = Tokenizer.from_file(str(bpe_tokenizer_path))
    output = tmp_path / "freq.safetensors"
    padded = 512
    code = main([
        "count-frequencies", "--output", str(output), "--tokenizer", str(bpe_tokenizer_path),
        "--vocab-size", str(padded), "--no-progress", "--text", *map(str, split_corpus),
    ])  # fmt: skip
    assert code == 0
    identity = tokenizer_identity(tokenizer)
    table = load_frequencies(output, vocab_size=padded, tokenizer_identity=identity)
    expected = expected_text_counts(
        lambda line: tokenizer.encode(line, add_special_tokens=False).ids, corpus_lines, padded,
        tokenizer.token_to_id("<eos>"),
    )
    np.testing.assert_array_equal(table.counts.numpy(), expected)
    assert identity in capsys.readouterr().out


@pytest.mark.parametrize("layout", ["lines", "jsonl"])
def test_cli_count_text_equals_the_indexed_dataset_built_from_it(layout, corpus_lines,
                                                                 sp_model_path, tmp_path):
    """--text counts what preprocess_data.py --append-eod (here quickstart_data's writer) puts
    in the .bin: every token and one EOD per document, so EOD is not an unseen token."""
    import json

    from token_objectives.quickstart.build_data import write_indexed_dataset as write_documents

    if layout == "lines":
        documents = corpus_lines[:120]
        path = tmp_path / "corpus.txt"
        path.write_text("\n".join(documents) + "\n", encoding="utf-8")
    else:  # documents spanning several lines, as preprocess_data's JSON input holds them
        documents = ["\n".join(corpus_lines[i:i + 3]) for i in range(0, 120, 3)]
        path = tmp_path / "corpus.jsonl"
        path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n"
                                for i, d in enumerate(documents)), encoding="utf-8")
    size = sentencepiece.SentencePieceProcessor(model_file=str(sp_model_path)).get_piece_size()
    written = write_documents(documents, sp_model_path, tmp_path / "corpus_text_document")
    from_bin = count_indexed_dataset([str(tmp_path / "corpus_text_document")], size,
                                     progress=False)
    output = tmp_path / "freq.safetensors"
    assert main(["count-frequencies", "--output", str(output), "--tokenizer", str(sp_model_path),
                 "--no-progress", "--text", str(path)]) == 0  # fmt: skip
    from_text = load_frequencies(output, vocab_size=size).counts.numpy()
    np.testing.assert_array_equal(from_text, from_bin)
    eos = sentencepiece.SentencePieceProcessor(model_file=str(sp_model_path)).eos_id()
    assert from_text[eos] == len(documents) and from_text.sum() == written


def test_cli_count_text_without_eod_and_bad_json(corpus_lines, sp_model_path, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(corpus_lines[:20]) + "\n", encoding="utf-8")
    output = tmp_path / "freq.safetensors"
    common = ["count-frequencies", "--output", str(output), "--tokenizer", str(sp_model_path),
              "--no-progress"]
    assert main([*common, "--no-append-eod", "--text", str(path)]) == 0
    without = load_frequencies(output).counts
    eos = sentencepiece.SentencePieceProcessor(model_file=str(sp_model_path)).eos_id()
    assert without[eos] == 0
    assert main([*common, "--eod-id", "5", "--text", str(path)]) == 0
    added = load_frequencies(output).counts - without
    assert added[5] == 20 and added.sum() == 20
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "12 apples"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON object with a 'text' string"):
        count_text_files([bad], sp_model_path, 1000, progress=False)


def test_cli_count_defaults_vocab_size_to_the_tokenizer(split_corpus, sp_model_path, tmp_path):
    output = tmp_path / "freq.safetensors"
    assert main(["count-frequencies", "--output", str(output), "--tokenizer", str(sp_model_path),
                 "--no-progress", "--text", str(split_corpus[0])]) == 0  # fmt: skip
    size = sentencepiece.SentencePieceProcessor(model_file=str(sp_model_path)).get_piece_size()
    assert load_frequencies(output).vocab_size == size


def test_cli_count_usage_errors(split_corpus, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["count-frequencies", "--output", str(tmp_path / "f"), "--text", str(split_corpus[0])])
    assert exit_info.value.code == 2
    assert "--text needs --tokenizer" in capsys.readouterr().err


def test_cli_inspect_vocab(sp_model_path):
    result = run_cli("inspect-vocab", sp_model_path, "--vocab-size", 512)
    assert result.returncode == 0, result.stderr
    processor = sentencepiece.SentencePieceProcessor(model_file=str(sp_model_path))
    assert "table size 512" in result.stdout
    for digit in range(10):
        token_id = processor.piece_to_id(str(digit))
        assert f"{token_id} {repr(str(digit)):>12} -> {digit}" in result.stdout


def test_cli_inspect_vocab_bad_path(tmp_path):
    result = run_cli("inspect-vocab", tmp_path / "nope.model")
    assert result.returncode == 2
    assert "inspect-vocab: error:" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_inspect_vocab_no_numbers(tmp_path, capsys):
    from tokenizer_fixtures import word_level_tokenizer

    path = tmp_path / "tokenizer.json"
    word_level_tokenizer(["a", "b"]).save(str(path))
    assert main(["inspect-vocab", str(path)]) == 2
    assert "--split_digits=true" in capsys.readouterr().err


# ------------------------------------------------------------- the tables are the model's


def _two_vocabularies_of_one_size(tmp_path: Path) -> tuple[Path, Path]:
    """Two word-level tokenizer.json files of the same size, ids mapped to other words."""
    from tokenizers import models, pre_tokenizers

    words = [f"w{i}" for i in range(40)] + [str(d) for d in range(10)]
    paths = []
    for name, order in (("a", words), ("b", list(reversed(words)))):
        tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(order)},
                                               unk_token="w0"))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        path = tmp_path / f"{name}.json"
        tokenizer.save(str(path))
        paths.append(path)
    return paths[0], paths[1]


def test_every_door_refuses_a_frequency_file_of_another_tokenizer(tmp_path):
    """The Megatron loop refused it; the ds_config section and the HF helper took it and
    weighted every id by another token's count."""
    from token_objectives.integrations.deepspeed import objective_from_ds_config
    from token_objectives.integrations.hf.loss import objective_loss_from_options

    ours, theirs = _two_vocabularies_of_one_size(tmp_path)
    counts = tmp_path / "theirs.safetensors"
    save_frequencies(counts, np.arange(50) + 1, tokenizer_identity=tokenizer_identity(
        Tokenizer.from_file(str(theirs))))
    section = {"token_objectives": {"ntl": None, "pdl_alpha": 0.5, "tokenizer": str(ours),
                                    "frequencies": str(counts)}}
    for build in (lambda: objective_from_ds_config(section, vocab_size=50),
                  lambda: objective_loss_from_options({"ntl": None, "pdl_alpha": 0.5},
                                                      str(ours), str(counts), vocab_size=50)):
        with pytest.raises(ValueError, match=r"was counted with tokenizer .*not "
                           + re.escape(repr(tokenizer_identity(Tokenizer.from_file(str(ours)))))):
            build()
    # The same file, counted with our tokenizer, is taken.
    save_frequencies(counts, np.arange(50) + 1, tokenizer_identity=tokenizer_identity(
        Tokenizer.from_file(str(ours))))
    objective_from_ds_config(section, vocab_size=50)


def test_count_frequencies_refuses_a_tokenizer_that_cannot_have_made_the_data(tmp_path, capsys):
    ours, _ = _two_vocabularies_of_one_size(tmp_path)
    prefix = write_indexed_dataset(tmp_path / "data", [np.array([3, 4, 55, 6])], np.int32)
    code = main(["count-frequencies", "--data-prefix", prefix, "--tokenizer", str(ours),
                 "--vocab-size", "64", "--output", str(tmp_path / "f.safetensors")])
    assert code != 0
    assert "the data holds token id 55, which" in capsys.readouterr().err
    assert not (tmp_path / "f.safetensors").exists()
