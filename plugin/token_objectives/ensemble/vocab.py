"""The union vocabulary of N tokenizers, keyed by the bytes each token stands for (GaC ensembling).

A token's key is the exact byte string it appends to the text, after undoing its tokenizer's
spelling conventions:
- byte-level BPE (GPT-2, Llama 3, Qwen): every character stands for one byte through the GPT-2
  byte-to-unicode table ("Ġ" is b" ", "Ċ" is b"\\n", "âĢ" is b"\\xe2\\x80");
- sentencepiece / Metaspace: "▁" is a space;
- byte fallback: "<0xNN>" is the single byte 0xNN;
- anything else (added tokens, plain vocabularies) is its own UTF-8 text.

Keys are `bytes`, not `str`: a byte-level or byte-fallback token may hold part of a multi-byte
character (b"\\xe2"), which has no `str` of its own, and it must still meet the same bytes from the
other tokenizers. Special tokens never become text keys: every model's EOS ids map to the one union
EOS (`UnionVocab.eos_id`, which has no key), and the other special tokens (BOS, PAD, UNK, MASK, ...)
and tokens that stand for no bytes are left out of the union: the probability a model puts on them
is dropped and the rest renormalised (see `UnionVocab.to_union`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

import torch

from token_objectives.tables.errors import InputError

__all__ = [
    "TokenConvention",
    "UnionVocab",
    "byte_level_char_to_byte",
    "detect_convention",
    "piece_to_bytes",
]

_BYTE_FALLBACK_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_METASPACE = "\u2581"


def byte_level_char_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode table: the character each byte is spelled as -> byte.

    Printable Latin-1 bytes spell themselves; the 68 others (controls, space, 0x7F-0xA0, 0xAD) are
    spelled chr(256), chr(257), ... in byte order, so that no token holds whitespace or controls.
    """
    spells_itself = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    char_to_byte = {}
    shifted = 0
    for byte in range(256):
        if byte in spells_itself:
            char_to_byte[chr(byte)] = byte
        else:
            char_to_byte[chr(256 + shifted)] = byte
            shifted += 1
    return char_to_byte


_BYTE_LEVEL = byte_level_char_to_byte()


@dataclass(frozen=True)
class TokenConvention:
    """How a tokenizer spells the bytes of its vocabulary entries.

    style: "byte_level" (GPT-2 table), "metaspace" (`replacement` is a space) or "plain" (UTF-8).
    byte_fallback: "<0xNN>" pieces stand for one raw byte.
    """

    style: Literal["byte_level", "metaspace", "plain"]
    byte_fallback: bool = False
    replacement: str = _METASPACE


def _component_specs(spec: object) -> list[dict]:
    """Every component dict (anything with a "type") inside a tokenizers JSON fragment."""
    found = []
    if isinstance(spec, dict):
        if "type" in spec:
            found.append(spec)
        for value in spec.values():
            found.extend(_component_specs(value))
    elif isinstance(spec, list):
        for value in spec:
            found.extend(_component_specs(value))
    return found


def detect_convention(tokenizer) -> TokenConvention:
    """Read the spelling convention off a fast (Rust-backed) Hugging Face tokenizer's pipeline."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InputError(
            f"{type(tokenizer).__name__} is a slow (Python) tokenizer; ensembling reads the "
            "token conventions and offsets of a fast one: load it with "
            "AutoTokenizer.from_pretrained(dir, use_fast=True) or save a tokenizer.json next to "
            "the model"
        )
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") == "WordPiece":
        raise InputError(
            "WordPiece tokenizers ('##' continuations) do not spell the text by concatenating "
            "tokens, which GaC ensembling needs; use models with sentencepiece or byte-level BPE "
            "tokenizers"
        )
    components = [
        c
        for part in ("normalizer", "pre_tokenizer", "decoder")
        for c in _component_specs(spec.get(part))
    ]
    types = {c["type"] for c in components}
    byte_fallback = bool(model.get("byte_fallback")) or "ByteFallback" in types
    if "ByteLevel" in types:
        return TokenConvention("byte_level", byte_fallback)
    for component in components:
        if component["type"] == "Metaspace":
            return TokenConvention(
                "metaspace", byte_fallback, component.get("replacement", _METASPACE)
            )
        pattern = component.get("pattern") or {}
        if component["type"] == "Replace" and pattern.get("String") == _METASPACE:
            return TokenConvention("metaspace", byte_fallback)
    return TokenConvention("plain", byte_fallback)


def piece_to_bytes(piece: str, convention: TokenConvention) -> bytes:
    """The bytes a vocabulary entry (not an added token) appends to the text."""
    if convention.byte_fallback:
        match = _BYTE_FALLBACK_PIECE.fullmatch(piece)
        if match:
            return bytes([int(match.group(1), 16)])
    if convention.style == "byte_level" and all(char in _BYTE_LEVEL for char in piece):
        return bytes(_BYTE_LEVEL[char] for char in piece)
    if convention.style == "metaspace":
        piece = piece.replace(convention.replacement, " ")
    return piece.encode("utf-8")


@dataclass(frozen=True)
class ModelVocab:
    """One tokenizer's side of the union.

    token_bytes: id -> the bytes it appends, None for special tokens and empty tokens.
    eos_ids: ids that end the text (mapped to the union EOS).
    byte_fallback_ids: ids of "<0xNN>" pieces (the tokenizer prefers any other spelling).
    """

    token_bytes: tuple[bytes | None, ...]
    eos_ids: tuple[int, ...]
    byte_fallback_ids: frozenset[int]

    @classmethod
    def from_tokenizer(cls, tokenizer, extra_eos_ids=(), name: str = "tokenizer") -> ModelVocab:
        convention = detect_convention(tokenizer)
        vocab = tokenizer.get_vocab()
        size = max(len(tokenizer), max(vocab.values(), default=-1) + 1)
        eos_ids = [i for i in (tokenizer.eos_token_id, *extra_eos_ids) if i is not None]
        if not eos_ids:
            raise InputError(
                f"{name} has no EOS token, so the ensemble could never stop on it: set "
                "tokenizer.eos_token (e.g. tokenizer.eos_token = '</s>', a token of its "
                "vocabulary) or generation_config.eos_token_id, then save_pretrained again"
            )
        added = tokenizer.added_tokens_decoder
        special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}
        token_bytes: list[bytes | None] = [None] * size
        byte_fallback_ids = set()
        for piece, token_id in vocab.items():
            if token_id in special:
                continue
            if token_id in added:  # added tokens are literal text, whatever the convention
                text = added[token_id].content.encode("utf-8")
            else:
                text = piece_to_bytes(piece, convention)
                if convention.byte_fallback and _BYTE_FALLBACK_PIECE.fullmatch(piece):
                    byte_fallback_ids.add(token_id)
            token_bytes[token_id] = text or None
        for token_id in eos_ids:
            token_bytes[token_id] = None
        return cls(tuple(token_bytes), tuple(dict.fromkeys(eos_ids)), frozenset(byte_fallback_ids))


class UnionVocab:
    """The union of N vocabularies: union id -> bytes, and per model the maps both ways.

    Union id 0 is the EOS; ids 1.. are the distinct text keys in order of first appearance
    (model 0's ids in order, then what model 1 adds, ...).

    to_union_ids[m]: LongTensor [V_m], model id -> union id, -1 for dropped special tokens.
    from_union_ids[m]: LongTensor [V_union], union id -> this model's id for that exact token,
    -1 where the model has no single token for it. Where two ids of a model spell the same bytes
    ("A" and "<0x41>"), their probabilities add up in the union, and the way back picks the id the
    tokenizer itself would produce (not the byte-fallback one; else the lowest id).
    """

    eos_id = 0

    def __init__(self, models: list[ModelVocab]):
        self.models = models
        self.token_bytes: list[bytes | None] = [None]
        self.index: dict[bytes, int] = {}
        to_union = []
        for model in models:
            ids = []
            for text in model.token_bytes:
                if text is None:
                    ids.append(-1)
                    continue
                if text not in self.index:
                    self.index[text] = len(self.token_bytes)
                    self.token_bytes.append(text)
                ids.append(self.index[text])
            for token_id in model.eos_ids:
                ids[token_id] = self.eos_id
            to_union.append(torch.tensor(ids, dtype=torch.long))
        self.to_union_ids = to_union
        self.from_union_ids = [self._way_back(m) for m in range(len(models))]
        self._mappings: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_tokenizers(cls, tokenizers, extra_eos_ids=None, names=None) -> UnionVocab:
        """Build the union of fast Hugging Face tokenizers.

        extra_eos_ids: per tokenizer, more ids that end the text (e.g. a model's
        generation_config.eos_token_id list); each tokenizer's own eos_token_id always counts.
        names: per tokenizer, how error messages call it (default "model <i>").
        """
        tokenizers = list(tokenizers)
        if not tokenizers:
            raise ValueError("an ensemble needs at least one tokenizer")
        names = names or [f"model {i}" for i in range(len(tokenizers))]
        extra_eos_ids = extra_eos_ids or [()] * len(tokenizers)
        models = [
            ModelVocab.from_tokenizer(tok, extra, name)
            for tok, extra, name in zip(tokenizers, extra_eos_ids, names, strict=True)
        ]
        union = cls(models)
        union._check_overlap(names)
        return union

    def _check_overlap(self, names: list[str]) -> None:
        keys = [set(ids[ids > self.eos_id].tolist()) for ids in self.to_union_ids]
        for m, own in enumerate(keys):
            others = set().union(*(k for j, k in enumerate(keys) if j != m))
            if len(keys) > 1 and not own & others:
                raise InputError(
                    f"the vocabulary of {names[m]} shares no token text with the other models, so "
                    "their distributions cannot be combined token by token; ensemble models whose "
                    "tokenizers cover the same text (same script and language, e.g. two "
                    "sentencepiece / byte-level BPE tokenizers of English models)"
                )

    def _way_back(self, m: int) -> torch.Tensor:
        model = self.models[m]
        back = torch.full((self.size,), -1, dtype=torch.long)
        for token_id, union_id in enumerate(self.to_union_ids[m].tolist()):
            if union_id <= self.eos_id:
                continue
            current = int(back[union_id])
            replaces_fallback = current in model.byte_fallback_ids and (
                token_id not in model.byte_fallback_ids
            )
            if current < 0 or replaces_fallback:
                back[union_id] = token_id
        back[self.eos_id] = model.eos_ids[0]
        return back

    @property
    def size(self) -> int:
        return len(self.token_bytes)

    @property
    def num_models(self) -> int:
        return len(self.models)

    def mapping(self, m: int, num_rows: int | None = None, device=None, dtype=torch.float32):
        """Sparse 0/1 matrix [num_rows, V_union] taking model m's probabilities to the union.

        num_rows: the model's logits width (default: its vocabulary size); rows past the
        vocabulary (embedding padding) are zero. Built once per (model, rows, device, dtype) and
        inference mode.
        """
        return self._mapping_pair(m, num_rows, device, dtype)[0]

    def _mapping_pair(self, m: int, num_rows, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.to_union_ids[m]
        num_rows = len(ids) if num_rows is None else num_rows
        if num_rows < len(ids):
            raise InputError(
                f"model {m} gives {num_rows} logits but its tokenizer has {len(ids)} ids; pair "
                "each model with the tokenizer it was trained with"
            )
        # A sparse tensor made outside inference mode cannot be used inside it: one copy per mode.
        key = (m, num_rows, str(device), dtype, torch.is_inference_mode_enabled())
        if key not in self._mappings:
            rows = torch.nonzero(ids >= 0).squeeze(1)
            indices = torch.stack([rows, ids[rows]])
            values = torch.ones(len(rows), dtype=dtype)
            matrix = torch.sparse_coo_tensor(
                indices, values, (num_rows, self.size), check_invariants=True
            ).coalesce()
            # sparse @ dense is the product every backend has: keep the transpose for to_union.
            self._mappings[key] = (matrix.to(device), matrix.t().coalesce().to(device))
        return self._mappings[key]

    def to_union(self, m: int, probs: torch.Tensor) -> torch.Tensor:
        """Model m's next-token probabilities [..., V_m] -> union probabilities [..., V_union].

        Computes probs @ mapping(m). Mass on dropped special tokens is removed and the rest
        renormalised to sum to 1, so each model gives a proper distribution over the union;
        tokens it lacks get 0.
        """
        flat = probs.reshape(-1, probs.shape[-1])
        transposed = self._mapping_pair(m, probs.shape[-1], probs.device, probs.dtype)[1]
        union = torch.sparse.mm(transposed, flat.t()).t()
        union = union / union.sum(dim=-1, keepdim=True)
        return union.reshape(*probs.shape[:-1], self.size)

    def union_id(self, m: int, token_id: int) -> int:
        """Union id of model m's token (-1 for a dropped special token)."""
        return int(self.to_union_ids[m][token_id])

    def model_id(self, m: int, union_id: int) -> int | None:
        """Model m's single token for a union token, or None where it has none."""
        token_id = int(self.from_union_ids[m][union_id])
        return None if token_id < 0 else token_id
