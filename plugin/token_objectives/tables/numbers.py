"""Number tokens of a vocabulary: the numeric value of each token id (NaN for non-numbers)."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field

import torch

from token_objectives.tables.files import InputError
from token_objectives.tables.tokenizers import (
    TokenizerLike,
    as_tokenizer,
    list_vocab,
    load_tokenizer,
    tokenizer_identity,
)

__all__ = ["NumberTable", "load_tokenizer", "number_value", "tokenizer_identity"]

# sentencepiece's "▁", byte-level BPE's "Ġ" (the byte 0x20 in its alphabet), or a plain space.
_WORD_BOUNDARY_MARKERS = ("\u2581", "\u0120", " ")
_DIGIT = re.compile(r"[0-9]")
# ASCII only on purpose: float() also takes "nan", "1e5", "1_000", "+3" and non-ASCII digits.
_INTEGER_OR_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]+)?")

_NO_NUMBERS_FIX = {
    True: (
        "train/extend the tokenizer so the digits 0-9 are single tokens (sentencepiece: "
        "--split_digits=true), or use multi-digit mode (digit_level=False / --number-tokens "
        "multi), or turn NTL off (ntl=None)"
    ),
    False: (
        "use a tokenizer whose vocabulary holds number tokens such as '7', '42' or '3.5', or "
        "turn NTL off (ntl=None)"
    ),
}


def number_value(token: str, digit_level: bool = True) -> float | None:
    """Numeric value of a token string, or None when it is not a number token.

    One leading word-boundary marker ("▁", "Ġ" or a space) is ignored. Digit-level: exactly one
    ASCII digit. Multi-digit: an ASCII integer or decimal such as "42" or "3.5".
    """
    if token[:1] in _WORD_BOUNDARY_MARKERS:
        token = token[1:]
    pattern = _DIGIT if digit_level else _INTEGER_OR_DECIMAL
    if pattern.fullmatch(token) is None:
        return None
    value = float(token)
    # An absurdly long digit run would become inf in the float32 table.
    return value if value <= torch.finfo(torch.float32).max else None


@dataclass(frozen=True)
class NumberTable:
    """Value per token id for the Number Token Loss.

    values: float32 [V], V = the model's padded vocab size; NaN for non-number ids.
    valid_vocab_size: the tokenizer's own size; ids >= it are vocab padding, never numbers.
    dot_id: id of the token that is exactly "." (NumberLevelLoss float mode), else None.
    digit_level: number tokens are single digits (else integers / decimals).
    tokenizer_identity: see `tokenizer_identity`.
    number_token_texts: token string of each id in `number_ids` order (for display; may be empty).
    word_start: bool [V], True for number tokens that begin with a word-boundary marker ("▁7",
        "Ġ7", " 7"): such a token starts a new number, so "▁1 2 ▁3 4" reads as 12 and 34.
    """

    values: torch.Tensor
    valid_vocab_size: int
    dot_id: int | None
    digit_level: bool
    tokenizer_identity: str
    number_token_texts: tuple[str, ...] = field(default=(), repr=False)
    word_start: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_tokenizer(
        cls, tokenizer: TokenizerLike, vocab_size: int | None = None, digit_level: bool = True
    ) -> NumberTable:
        """Scan a tokenizer's vocabulary (never modifying it).

        tokenizer: tokenizers.Tokenizer, transformers tokenizer, SentencePieceProcessor, or path.
        vocab_size: the model's padded vocab size V (>= the tokenizer's size); default its size.
        """
        tokenizer = as_tokenizer(tokenizer)
        listing = list_vocab(tokenizer)
        identity = tokenizer_identity(tokenizer)
        vocab_size = listing.size if vocab_size is None else vocab_size
        if vocab_size < listing.size:
            raise InputError(
                f"vocab_size {vocab_size} is smaller than the tokenizer's {listing.size} ids "
                f"({identity}); pass the model's padded vocab size (>= {listing.size})"
            )
        values = torch.full((vocab_size,), math.nan, dtype=torch.float32)
        word_start = torch.zeros(vocab_size, dtype=torch.bool)
        texts: dict[int, str] = {}
        dot_id = None
        for token_id, token in listing.pieces.items():
            if token_id in listing.special_ids:
                continue
            if token == ".":
                dot_id = token_id
            value = number_value(token, digit_level)
            if value is not None:
                values[token_id] = value
                texts[token_id] = token
                word_start[token_id] = token[:1] in _WORD_BOUNDARY_MARKERS
        table = cls.from_values(
            values,
            valid_vocab_size=listing.size,
            dot_id=dot_id,
            digit_level=digit_level,
            tokenizer_identity=identity,
            number_token_texts=tuple(texts[i] for i in sorted(texts)),
            word_start=word_start,
        )
        if digit_level:
            _warn_missing_digits(table)
        return table

    @classmethod
    def from_values(
        cls,
        values,
        valid_vocab_size: int | None = None,
        dot_id: int | None = None,
        digit_level: bool = True,
        tokenizer_identity: str = "values",
        number_token_texts: tuple[str, ...] = (),
        word_start=None,
    ) -> NumberTable:
        """Build from an explicit value table (tests, custom vocabularies).

        values: [V] numbers, NaN for non-number ids; ids >= valid_vocab_size (default V) must be
        NaN. word_start: bool [V] or the ids of number tokens that start a word (default none).
        Raises ValueError when no id is a number.
        """
        values = torch.as_tensor(values, dtype=torch.float32).detach().cpu().clone()
        if values.dim() != 1 or values.numel() == 0:
            raise ValueError(f"values must be a non-empty 1-D table, got {tuple(values.shape)}")
        vocab_size = values.numel()
        valid_vocab_size = vocab_size if valid_vocab_size is None else int(valid_vocab_size)
        if not 0 < valid_vocab_size <= vocab_size:
            raise ValueError(
                f"valid_vocab_size {valid_vocab_size} must lie in [1, {vocab_size}] (table size)"
            )
        if torch.isinf(values).any():
            raise ValueError("number values must be finite (NaN marks non-number ids)")
        if not torch.isnan(values[valid_vocab_size:]).all():
            raise ValueError(
                f"ids >= valid_vocab_size {valid_vocab_size} are vocab padding and must be NaN"
            )
        if torch.isnan(values).all():
            raise InputError(
                f"no number tokens found in tokenizer {tokenizer_identity} "
                f"({'digit-level' if digit_level else 'multi-digit'} mode): "
                f"{_NO_NUMBERS_FIX[bool(digit_level)]}"
            )
        if dot_id is not None:
            dot_id = int(dot_id)
            if not 0 <= dot_id < valid_vocab_size or not math.isnan(values[dot_id].item()):
                raise ValueError(f"dot_id {dot_id} must be a non-number id < {valid_vocab_size}")
        starts = torch.zeros(vocab_size, dtype=torch.bool)
        if word_start is not None:
            given = torch.as_tensor(word_start).detach().cpu()
            if given.dtype == torch.bool:
                if given.shape != (vocab_size,):
                    raise ValueError(f"word_start must be bool [{vocab_size}], got "
                                     f"{tuple(given.shape)}")
                starts = given.clone()
            else:
                starts[given.long()] = True
            if (starts & torch.isnan(values)).any():
                raise ValueError("word_start marks ids that are not number tokens")
        number_count = int((~torch.isnan(values)).sum())
        if number_token_texts and len(number_token_texts) != number_count:
            raise ValueError(
                f"{len(number_token_texts)} number_token_texts for {number_count} number tokens"
            )
        return cls(
            values=values,
            valid_vocab_size=valid_vocab_size,
            dot_id=dot_id,
            digit_level=bool(digit_level),
            tokenizer_identity=tokenizer_identity,
            number_token_texts=tuple(number_token_texts),
            word_start=starts,
        )

    @property
    def vocab_size(self) -> int:
        """V, the padded vocab size of the table."""
        return self.values.numel()

    @property
    def is_number(self) -> torch.Tensor:
        """bool [V]: True where the id is a number token."""
        return ~torch.isnan(self.values)

    @property
    def number_ids(self) -> torch.Tensor:
        """long [N]: ids of the number tokens, ascending."""
        return torch.nonzero(self.is_number).flatten()

    def describe(self) -> str:
        """Human-readable listing of the number tokens (`token-objectives inspect-vocab`)."""
        ids = self.number_ids.tolist()
        mode = "digit-level" if self.digit_level else "multi-digit"
        lines = [
            f"tokenizer: {self.tokenizer_identity}",
            f"{len(ids)} number tokens ({mode}) among {self.valid_vocab_size} token ids "
            f"(table size {self.vocab_size}, {self.vocab_size - self.valid_vocab_size} padding)",
            f"dot token id: {self.dot_id}",
        ]
        texts = self.number_token_texts or ("",) * len(ids)
        for token_id, text in zip(ids, texts, strict=True):
            token = repr(text) if text else ""
            lines.append(f"  {token_id:>8} {token:>12} -> {self.values[token_id].item():.10g}")
        return "\n".join(lines)


def _warn_missing_digits(table: NumberTable) -> None:
    found = {int(v) for v in table.values[table.is_number].tolist()}
    missing = sorted(set(range(10)) - found)
    if missing:
        warnings.warn(
            f"digit-level number tokens of {table.tokenizer_identity} lack the digits {missing}; "
            "NTL can never predict them. Train/extend the tokenizer so 0-9 are single tokens.",
            stacklevel=3,
        )
