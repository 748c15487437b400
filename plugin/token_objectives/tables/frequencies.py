"""Token counts over a training corpus, their file format, and the PDL weight table built on them.

PDL (Power-Law Decay loss) weighs the cross-entropy of target token t by w[t] = (count[t] + eps)
** -alpha, so frequent tokens count less.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from token_objectives.tables.errors import InputError
from token_objectives.tables.indexed_dataset import check_indexed_dataset
from token_objectives.tables.output_files import DEFAULT_MODE, set_mode
from token_objectives.tables.tokenizers import (
    TokenizerLike,
    as_tokenizer,
    encode_batch,
    end_of_document_id,
)

FORMAT_NAME = "token_objectives.tables.frequencies"
FORMAT_VERSION = "1"
_RECOUNT = "recount with `token-objectives count-frequencies`"


@dataclass(frozen=True)
class FrequencyTable:
    """Token counts read from a frequencies file.

    counts: int64 [V]; num_tokens == counts.sum(); vocab_size == V (the model's padded vocab).
    """

    counts: torch.Tensor
    num_tokens: int
    vocab_size: int
    tokenizer_identity: str


# ---------------------------------------------------------------------------------------- counting


@dataclass(frozen=True)
class _TokenStream:
    """The flat token stream of one .bin file: `count` tokens of `dtype` from byte 0."""

    prefix: str
    dtype: np.dtype
    count: int


def _token_stream(prefix: str) -> _TokenStream:
    # The check also proves the documents lie back to back, which counting the bytes relies on.
    info = check_indexed_dataset(prefix)
    return _TokenStream(prefix, info.dtype, info.num_tokens)


def _chunks(stream: _TokenStream, chunk_tokens: int) -> Iterator[np.ndarray]:
    if stream.count == 0:
        return
    tokens = np.memmap(
        stream.prefix + ".bin",
        dtype=stream.dtype,
        mode="r",
        shape=(stream.count,),
    )
    for start in range(0, stream.count, chunk_tokens):
        yield np.asarray(tokens[start : start + chunk_tokens])


def _check_ids(ids: np.ndarray, vocab_size: int, source: str) -> None:
    if ids.size == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise InputError(
            f"{source}: token id {bad} is outside [0, vocab_size={vocab_size}); pass the model's "
            "padded vocab size (--vocab-size), which must exceed every id in the data"
        )


def count_indexed_dataset(
    prefixes: Sequence[str], vocab_size: int, chunk_tokens: int = 1 << 24, progress: bool = True
) -> np.ndarray:
    """Count token ids over Megatron indexed datasets (.bin/.idx path prefixes).

    Reads the flat token stream of each .bin in chunks of `chunk_tokens` (memory-mapped).
    Returns int64 [vocab_size].
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    streams = [_token_stream(str(prefix)) for prefix in prefixes]
    counts = np.zeros(vocab_size, dtype=np.int64)
    total = sum(stream.count for stream in streams)
    with tqdm(total=total, unit="tok", unit_scale=True, disable=not progress) as bar:
        for stream in streams:
            for chunk in _chunks(stream, chunk_tokens):
                _check_ids(chunk, vocab_size, f"indexed dataset {stream.prefix!r}")
                counts += np.bincount(chunk, minlength=vocab_size)
                bar.update(chunk.size)
    return counts


JSON_SUFFIXES = (".json", ".jsonl")


def _document(raw: bytes, path: str, line: int, offset: int, json_key: str) -> str:
    """Line `line` of `path`, which starts at byte `offset`: the document it holds."""
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as error:
        raise InputError(
            f"{path}:{line}: not UTF-8 ({error.reason} at byte {offset + error.start} of the "
            f"file); convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    if not path.endswith(JSON_SUFFIXES):
        return text
    try:
        document = json.loads(text)[json_key]
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(
            f"{path}:{line}: not a JSON object with a {json_key!r} string ({error!r}); a .json/"
            f".jsonl file holds one document per line, as for Megatron's preprocess_data.py "
            f"(--json-key names the field)"
        ) from None
    if not isinstance(document, str):
        raise InputError(f"{path}:{line}: {json_key!r} is {type(document).__name__}, not a string")
    return document


def _document_batches(
    paths: Sequence[str], batch: int, json_key: str, bar: tqdm
) -> Iterator[list[str]]:
    documents: list[str] = []
    for path in paths:
        with open(path, "rb") as file:
            offset = 0
            for line, raw in enumerate(file, start=1):
                bar.update(len(raw))
                documents.append(_document(raw, str(path), line, offset, json_key))
                offset += len(raw)
                if len(documents) == batch:
                    yield documents
                    documents = []
    if documents:
        yield documents


def count_text_files(
    paths: Sequence[str],
    tokenizer: TokenizerLike,
    vocab_size: int,
    progress: bool = True,
    batch_lines: int = 1024,
    append_eod: bool = True,
    eod_id: int | None = None,
    json_key: str = "text",
) -> np.ndarray:
    """Count token ids over UTF-8 text files as Megatron's preprocess_data.py tokenizes them.

    A document is one line; in a .json / .jsonl file, the `json_key` string of the JSON object
    on that line (preprocess_data's input, whose text may hold newlines). Each document is
    tokenized without BOS/EOS; append_eod (preprocess_data's --append-eod, which the training
    data needs to end its documents) counts one end-of-document token per non-empty document,
    as that script writes it, so EOD gets its real count instead of the unseen-token weight.
    Turn it off for data built without --append-eod.

    tokenizer: tokenizers.Tokenizer, transformers tokenizer, SentencePieceProcessor, or path.
    eod_id: the end-of-document id (default: tokenizers.end_of_document_id, as the training loops).
    Returns int64 [vocab_size].
    """
    tokenizer = as_tokenizer(tokenizer)
    if append_eod and eod_id is None:
        try:
            eod_id = end_of_document_id(tokenizer)
        except ValueError as error:
            raise InputError(f"{error}; pass eod_id (--eod-id), or append_eod=False "
                             f"(--no-append-eod) for data built without --append-eod") from None
    counts = np.zeros(vocab_size, dtype=np.int64)
    if append_eod:
        _check_ids(np.array([eod_id]), vocab_size, "the end-of-document id")
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"text file {str(path)!r} not found; pass UTF-8 text or "
                                    f".json/.jsonl files, one document per line")
    total = sum(os.path.getsize(path) for path in paths)
    with tqdm(total=total, unit="B", unit_scale=True, disable=not progress) as bar:
        for documents in _document_batches(paths, batch_lines, json_key, bar):
            encoded = encode_batch(tokenizer, documents)
            ids = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64)
            _check_ids(ids, vocab_size, "text files tokenized")
            counts += np.bincount(ids, minlength=vocab_size)
            if append_eod:
                # preprocess_data.py appends no EOD to a document without tokens.
                counts[eod_id] += sum(1 for document in encoded if len(document) > 0)
    return counts


# ------------------------------------------------------------------------------------- file format


def _as_counts(counts) -> np.ndarray:
    if isinstance(counts, torch.Tensor):
        counts = counts.detach().cpu().numpy()
    counts = np.asarray(counts)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"counts must be a non-empty 1-D array, got shape {counts.shape}")
    if not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(f"counts must be integers, got {counts.dtype}")
    if (counts < 0).any():
        raise ValueError("counts must be non-negative")
    return counts.astype(np.int64)


def save_frequencies(
    path: str | os.PathLike,
    counts: np.ndarray | torch.Tensor,
    *,
    tokenizer_identity: str,
    vocab_size: int | None = None,
    mode: int = DEFAULT_MODE,
) -> None:
    """Write counts (int64 [V]) as a safetensors file with metadata; replaces `path` atomically.

    vocab_size: when given, must equal V (guards against saving counts for the wrong vocab).
    mode: the file's permission bits, whatever the umask (default group- and world-readable).
    """
    counts = _as_counts(counts)
    if vocab_size is not None and vocab_size != counts.size:
        raise ValueError(f"counts have {counts.size} entries but vocab_size is {vocab_size}")
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "vocab_size": str(counts.size),
        "num_tokens": str(int(counts.sum())),
        "tokenizer_identity": tokenizer_identity,
    }
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    save_file({"counts": torch.from_numpy(counts)}, str(partial), metadata=metadata)
    set_mode(partial, mode)
    os.replace(partial, path)


def _read(path: str) -> tuple[torch.Tensor, dict[str, str]]:
    if not os.path.isfile(path):
        raise InputError(f"frequencies file {path!r} not found; {_RECOUNT}")
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
            if metadata.get("format") != FORMAT_NAME or "counts" not in file.keys():
                raise InputError("no token_objectives metadata or no 'counts' tensor")
            counts = file.get_tensor("counts")
    except Exception as error:  # safetensors raises its own error type for corrupt files
        raise InputError(
            f"{path!r} is not a valid token_objectives frequencies file ({error}); {_RECOUNT}"
        ) from error
    return counts, metadata


def load_frequencies(
    path: str | os.PathLike,
    vocab_size: int | None = None,
    tokenizer_identity: str | None = None,
) -> FrequencyTable:
    """Read a file written by `save_frequencies`, checking it against the model.

    vocab_size: the model's padded vocab size; a file of another size is refused.
    tokenizer_identity: when given, a file counted with another tokenizer is refused.
    """
    path = str(path)
    counts, metadata = _read(path)
    try:
        stored_size = int(metadata["vocab_size"])
        num_tokens = int(metadata["num_tokens"])
        identity = metadata["tokenizer_identity"]
    except (KeyError, ValueError) as error:
        raise InputError(f"{path!r}: incomplete metadata ({error}); {_RECOUNT}") from error
    if metadata.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"{path!r} has format version {metadata.get('format_version')!r}, this code reads "
            f"{FORMAT_VERSION!r}; {_RECOUNT}"
        )
    valid = (
        counts.dtype == torch.int64
        and counts.dim() == 1
        and counts.numel() == stored_size
        and bool((counts >= 0).all())
        and int(counts.sum()) == num_tokens
    )
    if not valid:
        raise InputError(f"{path!r}: counts do not match their metadata (corrupt?); {_RECOUNT}")
    if vocab_size is not None and vocab_size != stored_size:
        raise InputError(
            f"{path!r} holds counts for a vocab of {stored_size} ids but the model's vocab size is "
            f"{vocab_size}; recount with `token-objectives count-frequencies --vocab-size "
            f"{vocab_size}` (the padded vocab size)"
        )
    if tokenizer_identity is not None and tokenizer_identity != identity:
        raise InputError(
            f"{path!r} was counted with tokenizer {identity!r}, not {tokenizer_identity!r}; "
            f"{_RECOUNT} --tokenizer <this tokenizer>"
        )
    return FrequencyTable(counts, num_tokens, stored_size, identity)


# ----------------------------------------------------------------------------------------- weights


def pdl_weights(
    counts: np.ndarray | torch.Tensor | FrequencyTable,
    alpha: float,
    eps: float = 1.0,
    unseen_weight: float | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """PDL weight per token id: w[t] = (count[t] + eps) ** -alpha. Returns float32 [V].

    Tokens never seen (count 0: special tokens, vocab padding) get `unseen_weight`, given on the
    un-normalised scale of (count + eps) ** -alpha; by default the weight of the rarest token that
    was seen, so they never get the huge eps ** -alpha. normalize: scale all weights so the
    corpus-weighted mean is 1, sum(counts * w) / sum(counts) == 1 (unseen tokens do not enter it).
    """
    if isinstance(counts, FrequencyTable):
        counts = counts.counts
    counts = _as_counts(counts).astype(np.float64)
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    seen = counts > 0
    if not seen.any():
        raise ValueError("all counts are zero: count frequencies over the training corpus first")
    weights = np.empty_like(counts)
    weights[seen] = (counts[seen] + eps) ** -alpha
    if unseen_weight is None:
        unseen_weight = (counts[seen].min() + eps) ** -alpha
    elif not math.isfinite(unseen_weight) or unseen_weight < 0:
        raise ValueError(f"unseen_weight must be a finite number >= 0, got {unseen_weight}")
    weights[~seen] = unseen_weight
    if normalize:
        weights *= counts.sum() / (counts * weights).sum()
    return torch.from_numpy(weights).to(torch.float32)
