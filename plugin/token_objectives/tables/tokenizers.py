"""One view over the tokenizers we accept: load from a local path, list the vocabulary, encode.

Accepted: `tokenizers.Tokenizer`, a `transformers` tokenizer (slow or fast), a
`sentencepiece.SentencePieceProcessor`, or a local path to one of them. Nothing is ever downloaded
and no tokenizer is ever modified.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import sentencepiece
import tokenizers

from token_objectives.tables.errors import InputError

TokenizerLike = object  # any of the accepted kinds, or a str / os.PathLike pointing to one


@dataclass(frozen=True)
class VocabListing:
    """Every id of a tokenizer with its token string.

    kind: "sentencepiece" | "tokenizers" | "transformers" (a slow HF tokenizer).
    model: the tokenization model's name ("BPE", "Unigram", "spm", a class name).
    size: ids lie in [0, size).
    pieces: id -> token string, as the vocabulary spells it ("▁7", "Ġ7", "7").
    special_ids: control, unknown, byte-fallback and special tokens: never plain text.
    """

    kind: str
    model: str
    size: int
    pieces: dict[int, str]
    special_ids: frozenset[int]


def load_tokenizer(path: str | os.PathLike) -> object:
    """Load a tokenizer from a local path; never downloads.

    path: a sentencepiece `.model` file, a `tokenizer.json` file, or a directory holding
    `tokenizer.json` (preferred) or `tokenizer.model`.
    Returns a `sentencepiece.SentencePieceProcessor` or a `tokenizers.Tokenizer`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer path {str(path)!r} does not exist. token_objectives never downloads: save "
            "the tokenizer locally (e.g. AutoTokenizer.from_pretrained(name).save_pretrained(dir)) "
            "and pass that directory, its tokenizer.json, or a sentencepiece .model file"
        )
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        raise InputError(
            f"directory {str(path)!r} holds neither tokenizer.json nor tokenizer.model; pass the "
            "tokenizer file itself"
        )
    if path.suffix == ".json":
        return _load_file(path, tokenizers.Tokenizer.from_file, "tokenizers JSON file")
    if path.suffix == ".model":
        return _load_file(path, _load_sentencepiece, "sentencepiece model")
    raise InputError(
        f"cannot tell the tokenizer kind of {str(path)!r}: expected a sentencepiece .model file, a "
        "tokenizer.json file, or a directory holding one of them"
    )


def _load_file(path: Path, loader, what: str) -> object:
    try:
        return loader(str(path))
    except Exception as error:  # both libraries raise bare Exception / RuntimeError subclasses
        raise InputError(f"{str(path)!r} is not a valid {what}: {error}") from error


def _load_sentencepiece(path: str) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=path)


def as_tokenizer(tokenizer: TokenizerLike) -> object:
    """The tokenizer itself, or the one loaded from `tokenizer` when it is a path."""
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_tokenizer(tokenizer)
    return tokenizer


def _transformers_tokenizer_class():
    # transformers is optional: a tokenizer of its kind can only exist once it has been imported.
    module = sys.modules.get("transformers")
    return None if module is None else module.PreTrainedTokenizerBase


def _hf_backend(tokenizer) -> tokenizers.Tokenizer | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if isinstance(backend, tokenizers.Tokenizer) else None


def _is_transformers(tokenizer) -> bool:
    base = _transformers_tokenizer_class()
    return base is not None and isinstance(tokenizer, base)


def list_vocab(tokenizer: TokenizerLike) -> VocabListing:
    """All ids and token strings of `tokenizer` (added tokens included)."""
    tokenizer = as_tokenizer(tokenizer)
    if isinstance(tokenizer, sentencepiece.SentencePieceProcessor):
        return _list_sentencepiece(tokenizer)
    if isinstance(tokenizer, tokenizers.Tokenizer):
        return _list_tokenizers(tokenizer)
    if _is_transformers(tokenizer):
        backend = _hf_backend(tokenizer)
        if backend is not None:
            # A fast HF tokenizer produces exactly its backend's ids: same listing, same identity.
            listing = _list_tokenizers(backend)
            specials = listing.special_ids | frozenset(tokenizer.all_special_ids)
            return VocabListing(listing.kind, listing.model, listing.size, listing.pieces, specials)
        return _list_transformers_slow(tokenizer)
    raise TypeError(
        f"unsupported tokenizer type {type(tokenizer).__name__}: pass a tokenizers.Tokenizer, a "
        "transformers tokenizer, a sentencepiece.SentencePieceProcessor, or a local path"
    )


def _list_sentencepiece(processor: sentencepiece.SentencePieceProcessor) -> VocabListing:
    size = processor.get_piece_size()
    pieces = {i: processor.id_to_piece(i) for i in range(size)}
    special = frozenset(
        i
        for i in range(size)
        if processor.is_control(i) or processor.is_unknown(i) or processor.is_byte(i)
    )
    return VocabListing("sentencepiece", "spm", size, pieces, special)


def _list_tokenizers(tokenizer: tokenizers.Tokenizer) -> VocabListing:
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    pieces = {i: token for token, i in vocab.items()}
    size = max(tokenizer.get_vocab_size(with_added_tokens=True), max(pieces, default=-1) + 1)
    special = frozenset(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)
    return VocabListing("tokenizers", type(tokenizer.model).__name__, size, pieces, special)


def _list_transformers_slow(tokenizer) -> VocabListing:
    pieces = {i: token for token, i in tokenizer.get_vocab().items()}
    size = max(len(tokenizer), max(pieces, default=-1) + 1)
    special = frozenset(tokenizer.all_special_ids)
    return VocabListing("transformers", type(tokenizer).__name__, size, pieces, special)


def tokenizer_identity(tokenizer: TokenizerLike) -> str:
    """A stable name for a vocabulary: "<kind>:<model>-<size>:sha256:<16 hex>".

    The hash covers the full (id, token) list, so two different vocabularies never share an
    identity, while the same vocabulary loaded twice (or a tokenizer.json and its fast HF wrapper)
    always does.
    """
    listing = list_vocab(tokenizer)
    entries = sorted(listing.pieces.items())
    # JSON keeps the encoding unambiguous whatever characters the tokens hold.
    digest = hashlib.sha256(json.dumps(entries, ensure_ascii=False).encode("utf-8")).hexdigest()
    return f"{listing.kind}:{listing.model}-{listing.size}:sha256:{digest[:16]}"


def encode_batch(tokenizer: object, lines: list[str]) -> list[list[int]]:
    """Token ids of each line, without BOS/EOS or other added special tokens.

    tokenizer: an already loaded tokenizer (see `as_tokenizer`).
    """
    if isinstance(tokenizer, sentencepiece.SentencePieceProcessor):
        return tokenizer.encode(lines)
    if isinstance(tokenizer, tokenizers.Tokenizer):
        return [e.ids for e in tokenizer.encode_batch(lines, add_special_tokens=False)]
    if _is_transformers(tokenizer):
        return tokenizer(lines, add_special_tokens=False)["input_ids"]
    raise TypeError(f"unsupported tokenizer type {type(tokenizer).__name__}")


def end_of_document_id(tokenizer) -> int:
    """The id that ends each document: sentencepiece's eos, a transformers tokenizer's
    eos_token_id (Megatron's HuggingFaceTokenizer.eod), else </s>, <eos>, <|endoftext|>."""
    eos = getattr(tokenizer, "eos_id", None)
    if callable(eos) and eos() >= 0:
        return int(eos())  # sentencepiece
    eos_token_id = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos_token_id, int):
        return eos_token_id
    for token in ("</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>"):
        token_id = tokenizer.token_to_id(token) if hasattr(tokenizer, "token_to_id") else None
        if token_id is not None:
            return int(token_id)
    raise InputError("the tokenizer has no end-of-document token (</s>, <eos>, <|endoftext|>)")
