"""Local data for the CPU quickstart: a generated number-rich corpus, its tokenizer, Megatron
.bin/.idx train/valid splits and the PDL token counts. Nothing is downloaded; every step is seeded.

    python -m token_objectives.quickstart.build_data --output-dir data/quickstart
"""

from __future__ import annotations

import argparse
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece
import torch

from token_objectives.quickstart.corpus import CORPUS_VERSION, generate_corpus
from token_objectives.tables.frequencies import (
    count_indexed_dataset,
    load_frequencies,
    pdl_weights,
    save_frequencies,
)
from token_objectives.tables.numbers import NumberTable, tokenizer_identity
from token_objectives.tables.output_files import set_mode
from token_objectives.tables.tokenizers import encode_batch, list_vocab, load_tokenizer

__all__ = [
    "QuickstartData",
    "build_quickstart_data",
    "generate_corpus",
    "split_train_valid",
    "train_tokenizer",
    "write_indexed_dataset",
]

VALID_FRACTION = 0.05
TOKENIZER_NAME = "tokenizer"
TRAIN_NAME = "train_text_document"
VALID_NAME = "valid_text_document"
FREQUENCIES_NAME = "frequencies.safetensors"
MANIFEST_NAME = "manifest.json"
# The module's old name, kept so that data built before the rename is reused.
_MANIFEST_FORMAT = "token_objectives.quickstart.data"
# Bump when the tokenizer settings or the file layout change, so old builds are not reused.
_BUILD_VERSION = 1


@dataclass(frozen=True)
class QuickstartData:
    """What `build_quickstart_data` produced.

    train_prefix / valid_prefix: Megatron indexed-dataset path prefixes (without .bin/.idx).
    vocab_size: the tokenizer's own size (the frequency table has exactly this many entries).
    """

    tokenizer_path: Path
    train_prefix: Path
    valid_prefix: Path
    frequencies_path: Path
    vocab_size: int
    num_train_tokens: int
    num_valid_tokens: int


# --------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(documents: list[str], output_dir: Path, vocab_size: int = 512) -> Path:
    """Train a sentencepiece BPE on the documents; returns `output_dir/tokenizer.model`.

    Llama-style settings: every digit is its own token (split_digits), unseen characters fall back
    to byte tokens, text is kept verbatim. The newline is a token of its own, so line breaks
    survive and never merge with punctuation. Ids: <unk> 0, <s> 1, </s> 2 (end of document),
    "\\n" 3. Trained on whole documents, so the pieces fit how `write_indexed_dataset` encodes.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    longest = max((len(document.encode("utf-8")) for document in documents), default=0)
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(documents),
            # Written from memory: a model_prefix would be stored in the model, so the same
            # corpus would give different bytes in different directories.
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            split_digits=True,
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            user_defined_symbols=["\n"],
            # The trainer silently skips longer sentences (default 4192 bytes).
            max_sentence_length=max(4192, longest + 1),
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as error:
        if "Vocabulary size too high" not in str(error):
            raise
        raise ValueError(
            f"the corpus ({len(documents)} documents) is too small for a vocab of {vocab_size} "
            f"pieces ({error}); use more documents or a smaller vocab_size"
        ) from error
    path = output_dir / f"{TOKENIZER_NAME}.model"
    path.write_bytes(model.getvalue())
    return path


# ------------------------------------------------------------------------------- indexed datasets


def _megatron_indexed_dataset():
    try:
        with warnings.catch_warnings():
            # megatron-core warns at import about optional GPU libraries that writing never uses.
            warnings.filterwarnings("ignore", message="Transformer Engine and Apex")
            from megatron.core.datasets import indexed_dataset
    except ImportError as error:
        raise ImportError(
            "writing Megatron indexed datasets needs megatron-core: "
            "pip install 'token-objectives[megatron]'"
        ) from error
    return indexed_dataset


def _end_of_document_id(tokenizer: object, eos_id: int | None) -> int:
    if eos_id is not None:
        return eos_id
    if isinstance(tokenizer, sentencepiece.SentencePieceProcessor) and tokenizer.eos_id() >= 0:
        return tokenizer.eos_id()
    raise ValueError(
        "cannot tell the tokenizer's end-of-document token: pass eos_id (e.g. the id of '</s>' "
        "or '<|endoftext|>')"
    )


def write_indexed_dataset(
    documents: list[str],
    tokenizer_path: Path,
    output_prefix: Path,
    eos_id: int | None = None,
) -> int:
    """Tokenize each document, append EOS, write `output_prefix`.bin/.idx (one entry per document).

    tokenizer_path: any local tokenizer `tokenizer_io.load_tokenizer` reads. eos_id: the
    end-of-document id; default the sentencepiece model's eos id. The token dtype is Megatron's
    choice for the vocab size (uint16 below 65500 ids, else int32), as in preprocess_data.py.
    Returns the number of tokens written (EOS included).
    """
    tokenizer = load_tokenizer(tokenizer_path)
    end_id = _end_of_document_id(tokenizer, eos_id)
    indexed_dataset = _megatron_indexed_dataset()
    dtype = indexed_dataset.DType.optimal_dtype(list_vocab(tokenizer).size)
    output_prefix = str(output_prefix)
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    builder = indexed_dataset.IndexedDatasetBuilder(output_prefix + ".bin", dtype=dtype)
    num_tokens = 0
    for ids in encode_batch(tokenizer, documents):
        tokens = np.asarray([*ids, end_id], dtype=np.int64)
        builder.add_item(torch.from_numpy(tokens))
        builder.end_document()
        num_tokens += tokens.size
    builder.finalize(output_prefix + ".idx")
    for suffix in (".bin", ".idx"):
        set_mode(output_prefix + suffix)
    return num_tokens


# ----------------------------------------------------------------------------------------- build


def _outputs(output_dir: Path) -> dict[str, Path]:
    """Every file of a build by its name in the manifest (the manifest itself excluded)."""
    files = {
        f"{TOKENIZER_NAME}.model": output_dir / f"{TOKENIZER_NAME}.model",
        FREQUENCIES_NAME: output_dir / FREQUENCIES_NAME,
    }
    for name in (TRAIN_NAME, VALID_NAME):
        for suffix in (".bin", ".idx"):
            files[name + suffix] = output_dir / (name + suffix)
    return files


def _result(output_dir: Path, vocab_size: int, num_train: int, num_valid: int) -> QuickstartData:
    return QuickstartData(
        tokenizer_path=output_dir / f"{TOKENIZER_NAME}.model",
        train_prefix=output_dir / TRAIN_NAME,
        valid_prefix=output_dir / VALID_NAME,
        frequencies_path=output_dir / FREQUENCIES_NAME,
        vocab_size=vocab_size,
        num_train_tokens=num_train,
        num_valid_tokens=num_valid,
    )


def _reuse(output_dir: Path, arguments: dict) -> QuickstartData | None:
    """The recorded build when its manifest matches `arguments` and its files are intact."""
    try:
        manifest = json.loads((output_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
        if manifest["format"] != _MANIFEST_FORMAT or manifest["arguments"] != arguments:
            return None
        # A size check is cheap and catches truncated or replaced files.
        for name, path in _outputs(output_dir).items():
            if path.stat().st_size != manifest["file_sizes"][name]:
                return None
        return _result(
            output_dir,
            manifest["vocab_size"],
            manifest["num_train_tokens"],
            manifest["num_valid_tokens"],
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_manifest(output_dir: Path, arguments: dict, data: QuickstartData) -> None:
    manifest = {
        "format": _MANIFEST_FORMAT,
        "arguments": arguments,
        "vocab_size": data.vocab_size,
        "num_train_tokens": data.num_train_tokens,
        "num_valid_tokens": data.num_valid_tokens,
        "file_sizes": {name: path.stat().st_size for name, path in _outputs(output_dir).items()},
    }
    path = output_dir / MANIFEST_NAME
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)


def split_train_valid(documents: list[str]) -> tuple[list[str], list[str]]:
    """The last VALID_FRACTION of the documents (at least one) are the validation split."""
    if len(documents) < 2:
        raise ValueError(f"need at least 2 documents for a train/valid split, got {len(documents)}")
    num_valid = max(1, round(len(documents) * VALID_FRACTION))
    return documents[:-num_valid], documents[-num_valid:]


def build_quickstart_data(
    output_dir: Path,
    num_documents: int = 4000,
    vocab_size: int = 512,
    seed: int = 0,
    pdl_alpha: float | None = None,
) -> QuickstartData:
    """Corpus -> tokenizer -> train/valid .bin/.idx (95/5) -> token counts over the train split.

    Idempotent: when `output_dir/manifest.json` records the same arguments and the files are
    intact, nothing is rebuilt. The manifest is removed first and written last, so an interrupted
    build is always redone. pdl_alpha: when given, the PDL weights are computed once from the
    counts so a bad alpha fails here, not in training; it is not part of the manifest (the counts
    do not depend on it).
    """
    output_dir = Path(output_dir).resolve()
    arguments = {
        "num_documents": num_documents,
        "vocab_size": vocab_size,
        "seed": seed,
        "corpus_version": CORPUS_VERSION,
        "build_version": _BUILD_VERSION,
    }
    data = _reuse(output_dir, arguments)
    if data is None:
        data = _build(output_dir, arguments)
    if pdl_alpha is not None:
        pdl_weights(load_frequencies(data.frequencies_path, vocab_size=data.vocab_size), pdl_alpha)
    return data


def _build(output_dir: Path, arguments: dict) -> QuickstartData:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / MANIFEST_NAME).unlink(missing_ok=True)
    documents = generate_corpus(arguments["num_documents"], seed=arguments["seed"])
    train, valid = split_train_valid(documents)
    tokenizer_path = train_tokenizer(train, output_dir, arguments["vocab_size"])
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer_size = list_vocab(tokenizer).size
    data = _result(
        output_dir,
        tokenizer_size,
        write_indexed_dataset(train, tokenizer_path, output_dir / TRAIN_NAME),
        write_indexed_dataset(valid, tokenizer_path, output_dir / VALID_NAME),
    )
    counts = count_indexed_dataset([str(data.train_prefix)], tokenizer_size, progress=False)
    save_frequencies(
        data.frequencies_path,
        counts,
        tokenizer_identity=tokenizer_identity(tokenizer),
        vocab_size=tokenizer_size,
    )
    _write_manifest(output_dir, arguments, data)
    return data


# -------------------------------------------------------------------------------------------- CLI


def _summary(data: QuickstartData) -> str:
    numbers = NumberTable.from_tokenizer(data.tokenizer_path)
    counts = load_frequencies(data.frequencies_path, vocab_size=data.vocab_size).counts
    number_share = counts[numbers.number_ids].sum().item() / max(1, data.num_train_tokens)
    digits = sorted(int(v) for v in numbers.values[numbers.number_ids].tolist())
    return "\n".join(
        [
            f"tokenizer:   {data.tokenizer_path} ({data.vocab_size} pieces)",
            f"train data:  {data.train_prefix} ({data.num_train_tokens} tokens)",
            f"valid data:  {data.valid_prefix} ({data.num_valid_tokens} tokens)",
            f"frequencies: {data.frequencies_path}",
            f"number tokens: {numbers.number_ids.numel()} (values {digits}), "
            f"{number_share:.1%} of the train tokens",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m token_objectives.quickstart.build_data`: build (or reuse) the data, print a
    summary."""
    parser = argparse.ArgumentParser(
        prog="python -m token_objectives.quickstart.build_data",
        description="Generate the quickstart corpus, tokenizer, Megatron datasets and PDL counts.",
    )
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--num-documents", type=int, default=4000)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data = build_quickstart_data(args.output_dir, args.num_documents, args.vocab_size, args.seed)
    print(_summary(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
