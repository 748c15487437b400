"""Number tokens of a vocabulary: the numeric value of each token id (NaN for non-numbers)."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field

import torch

from token_objectives.tables.errors import InputError, TokenObjectivesWarning
from token_objectives.tables.number_modes import NUMBER_TOKEN_MODES, NUMBER_TOKENS_HELP
from token_objectives.tables.tokenizers import (
    TokenizerLike,
    as_tokenizer,
    encode_batch,
    list_vocab,
    load_tokenizer,
    tokenizer_identity,
)

__all__ = [
    "NUMBER_TOKENS_HELP",
    "NUMBER_TOKEN_MODES",
    "NumberTable",
    "digit_share",
    "load_tokenizer",
    "number_value",
    "resolve_number_tokens",
    "tokenizer_identity",
]

# sentencepiece's "▁", byte-level BPE's "Ġ" (the byte 0x20 in its alphabet), or a plain space.
_WORD_BOUNDARY_MARKERS = ("\u2581", "\u0120", " ")
# What each mode takes as a number token, after one word-boundary marker. ASCII only on purpose:
# float() also takes "nan", "1e5", "1_000", "+3" and non-ASCII digits.
_PATTERNS = {
    "digit": re.compile(r"[0-9]"),
    "groups": re.compile(r"[0-9]+"),
    "multi": re.compile(r"[0-9]+(?:\.[0-9]+)?"),
}
_MODE_WORDS = {
    "digit": "digit-level",
    "groups": "digit groups, each compared within its digit count",
    "multi": "multi-digit, all compared by value",
}

_NO_NUMBERS_FIX = {
    True: (
        "train/extend the tokenizer so the digits 0-9 are single tokens (sentencepiece: "
        "--split_digits=true), or use multi-digit mode (number_tokens='auto' / --number-tokens "
        "auto), or turn NTL off (ntl=None)"
    ),
    False: (
        "use a tokenizer whose vocabulary holds number tokens such as '7', '42' or '3.5', or "
        "turn NTL off (ntl=None)"
    ),
}
# Tables whose left-out number tokens were already reported (one warning per vocab and mode).
_WARNED: set[tuple[str, str]] = set()


def _strip_marker(token: str) -> str:
    return token[1:] if token[:1] in _WORD_BOUNDARY_MARKERS else token


def number_value(token: str, digit_level: bool = True, mode: str | None = None) -> float | None:
    """Numeric value of a token string, or None when it is not a number token.

    One leading word-boundary marker ("▁", "Ġ" or a space) is ignored. mode (default: "digit"
    when digit_level, else "multi"): "digit" exactly one ASCII digit; "groups" a run of ASCII
    digits ("007" is 7); "multi" an ASCII integer or decimal such as "42" or "3.5".
    """
    mode = mode or ("digit" if digit_level else "multi")
    token = _strip_marker(token)
    if _PATTERNS[mode].fullmatch(token) is None:
        return None
    value = float(token)
    # An absurdly long digit run would become inf in the float32 table.
    return value if value <= torch.finfo(torch.float32).max else None


def _digit_count(token: str) -> int:
    return sum(ch in "0123456789" for ch in token)


def resolve_number_tokens(mode: str, pieces) -> str:
    """"auto" -> "digit" when every number token of the vocabulary (a run of ASCII digits, after
    one word-boundary marker) is a single digit, else "groups"; other modes are returned as
    they are. pieces: the token strings of the vocabulary (special tokens left out)."""
    if mode not in NUMBER_TOKEN_MODES:
        raise ValueError(
            f"number_tokens must be one of {', '.join(NUMBER_TOKEN_MODES)}, got {mode!r}"
        )
    if mode != "auto":
        return mode
    groups = _PATTERNS["groups"]
    multi_digit = any(
        len(stripped) > 1 and groups.fullmatch(stripped)
        for stripped in map(_strip_marker, pieces)
    )
    return "groups" if multi_digit else "digit"


def digit_share(lines: list[str], tokenizer: TokenizerLike, mode: str) -> float:
    """The share of the ASCII digits of `lines` that NTL reaches under `mode` ("digit" |
    "groups" | "multi"): the digits that the tokenizer puts into number tokens of that mode.
    1.0 for text without digits. Tokenizes without special tokens."""
    tokenizer = as_tokenizer(tokenizer)
    listing = list_vocab(tokenizer)
    total = sum(map(_digit_count, lines))
    reached = 0
    for ids in encode_batch(tokenizer, lines):
        for token_id in map(int, ids):
            token = listing.pieces.get(token_id, "")
            if token_id not in listing.special_ids and number_value(token, mode=mode) is not None:
                reached += _digit_count(token)
    return reached / total if total else 1.0


@dataclass(frozen=True)
class NumberTable:
    """Value per token id for the Number Token Loss.

    values: float32 [V], V = the model's padded vocab size; NaN for non-number ids.
    valid_vocab_size: the tokenizer's own size; ids >= it are vocab padding, never numbers.
    dot_id: id of the token that is exactly "." (NumberLevelLoss float mode), else None.
    digit_level: number tokens are single digits (mode "digit").
    tokenizer_identity: see `tokenizer_identity`.
    number_token_texts: token string of each id in `number_ids` order (for display; may be empty).
    word_start: bool [V], True for number tokens that begin with a word-boundary marker ("▁7",
        "Ġ7", " 7"): such a token starts a new number, so "▁1 2 ▁3 4" reads as 12 and 34.
    grouped: mode "groups": number tokens are runs of digits ("202", "4", "007") and NTL
        compares a target only with the number tokens of its own digit count, by value.
    digit_counts: int32 [V], the ASCII digits of each number token (0 for non-numbers); the
        groups of a grouped table, and the place value of a token in a whole number.
    """

    values: torch.Tensor
    valid_vocab_size: int
    dot_id: int | None
    digit_level: bool
    tokenizer_identity: str
    number_token_texts: tuple[str, ...] = field(default=(), repr=False)
    word_start: torch.Tensor | None = field(default=None, repr=False, compare=False)
    grouped: bool = False
    digit_counts: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def mode(self) -> str:
        """"digit", "groups" or "multi" (see NUMBER_TOKEN_MODES)."""
        return "digit" if self.digit_level else "groups" if self.grouped else "multi"

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: TokenizerLike,
        vocab_size: int | None = None,
        digit_level: bool | None = None,
        number_tokens: str = "auto",
    ) -> NumberTable:
        """Scan a tokenizer's vocabulary (never modifying it).

        tokenizer: tokenizers.Tokenizer, transformers tokenizer, SentencePieceProcessor, or path.
        vocab_size: the model's padded vocab size V (>= the tokenizer's size); default its size.
        number_tokens: "auto" (the default: "digit" when the vocabulary's number tokens are all
            single digits, else "groups"), "digit", "groups" or "multi" (ntloss's
            digit_level=False). digit_level: the former switch; True is "digit", False "multi".
        A mode that leaves number tokens of the vocabulary out warns once, with the share.
        """
        if digit_level is not None:
            number_tokens = "digit" if digit_level else "multi"
        tokenizer = as_tokenizer(tokenizer)
        listing = list_vocab(tokenizer)
        plain = {i: t for i, t in listing.pieces.items() if i not in listing.special_ids}
        mode = resolve_number_tokens(number_tokens, plain.values())
        digit_level = mode == "digit"
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
        left_out = 0
        dot_id = None
        for token_id, token in plain.items():
            if token == ".":
                dot_id = token_id
            value = number_value(token, mode=mode)
            if value is not None:
                values[token_id] = value
                texts[token_id] = token
                word_start[token_id] = token[:1] in _WORD_BOUNDARY_MARKERS
            elif number_value(token, mode="multi") is not None:
                left_out += 1
        table = cls.from_values(
            values,
            valid_vocab_size=listing.size,
            dot_id=dot_id,
            digit_level=digit_level,
            tokenizer_identity=identity,
            number_token_texts=tuple(texts[i] for i in sorted(texts)),
            word_start=word_start,
            grouped=mode == "groups",
        )
        if digit_level:
            _warn_missing_digits(table)
        if left_out:
            _warn_left_out(table, left_out, number_tokens)
        return table

    @classmethod
    def from_values(
        cls,
        values,
        valid_vocab_size: int | None = None,
        dot_id: int | None = None,
        digit_level: bool | None = None,
        tokenizer_identity: str = "values",
        number_token_texts: tuple[str, ...] = (),
        word_start=None,
        grouped: bool = False,
        digit_counts=None,
    ) -> NumberTable:
        """Build from an explicit value table (tests, custom vocabularies).

        values: [V] numbers, NaN for non-number ids; ids >= valid_vocab_size (default V) must be
        NaN. word_start: bool [V] or the ids of number tokens that start a word (default none).
        digit_level: default True, or False when grouped.
        grouped: mode "groups" (see the class). digit_counts: int [V] digits per number token
        (default: from number_token_texts when given, else the digits of the integer value, at
        least 1; "007" needs its text or an explicit count of 3).
        Raises ValueError when no id is a number.
        """
        digit_level = not grouped if digit_level is None else digit_level
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
        counts = _digit_counts(values, number_token_texts, digit_counts)
        if grouped and digit_level:
            raise ValueError("a table is digit-level or grouped, not both")
        return cls(
            values=values,
            valid_vocab_size=valid_vocab_size,
            dot_id=dot_id,
            digit_level=bool(digit_level),
            tokenizer_identity=tokenizer_identity,
            number_token_texts=tuple(number_token_texts),
            word_start=starts,
            grouped=bool(grouped),
            digit_counts=counts,
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

    def by_digit_count(self) -> dict[int, int]:
        """{digit count: how many number tokens have it}, ascending."""
        counts = self.digit_counts[self.is_number]
        found = torch.unique(counts, return_counts=True)
        return {int(k): int(n) for k, n in zip(*found, strict=True)}

    def describe(self) -> str:
        """Human-readable listing of the number tokens (`token-objectives inspect-vocab`)."""
        ids = self.number_ids.tolist()
        by_count = ", ".join(f"{n} of {k} digit{'s' if k != 1 else ''}"
                             for k, n in self.by_digit_count().items())
        lines = [
            f"tokenizer: {self.tokenizer_identity}",
            f"{len(ids)} number tokens ({self.mode}: {_MODE_WORDS[self.mode]}) among "
            f"{self.valid_vocab_size} token ids (table size {self.vocab_size}, "
            f"{self.vocab_size - self.valid_vocab_size} padding)",
            f"by digit count: {by_count}",
            f"dot token id: {self.dot_id}",
        ]
        texts = self.number_token_texts or ("",) * len(ids)
        for token_id, text in zip(ids, texts, strict=True):
            token = repr(text) if text else ""
            lines.append(f"  {token_id:>8} {token:>12} -> {self.values[token_id].item():.10g}")
        return "\n".join(lines)


def _digit_counts(values: torch.Tensor, texts, given) -> torch.Tensor:
    is_number = ~torch.isnan(values)
    if given is not None:
        counts = torch.as_tensor(given).detach().cpu().to(torch.int32).clone()
        if counts.shape != values.shape:
            raise ValueError(f"digit_counts must be [{values.numel()}], got {tuple(counts.shape)}")
        if (counts[is_number] < 1).any() or (counts[~is_number] != 0).any():
            raise ValueError("digit_counts must be >= 1 on number tokens and 0 elsewhere")
        return counts
    counts = torch.zeros(values.shape, dtype=torch.int32)
    if texts:
        counts[is_number] = torch.tensor([_digit_count(t) for t in texts], dtype=torch.int32)
    else:
        whole = values[is_number].double().abs().floor()
        counts[is_number] = (whole.clamp(min=1).log10().floor() + 1).to(torch.int32)
    return counts


def _warn_left_out(table: NumberTable, left_out: int, asked: str) -> None:
    key = (table.tokenizer_identity, table.mode)
    if key in _WARNED:
        return
    _WARNED.add(key)
    kept = int(table.is_number.sum())
    share = left_out / (left_out + kept)
    if table.mode == "digit":
        what, fix = "multi-digit", "Use number_tokens='auto' (--number-tokens auto)"
    else:  # groups: the decimals ("3.5") that "multi" would take
        what, fix = "decimal", ("number_tokens='multi' takes them too, but compares every "
                                "number token with every other by value")
    warnings.warn(
        f"number_tokens={asked!r} ({table.mode}) leaves {left_out} of {left_out + kept} number "
        f"tokens ({share:.1%}, {what}) of {table.tokenizer_identity} out of NTL: they train by "
        f"CE alone, and NTL's softmax over number tokens ignores them. {fix}; "
        f"`token-objectives inspect-vocab --text FILE` shows the share of a text's digits "
        f"each mode reaches",
        TokenObjectivesWarning,
        stacklevel=3,
    )


def _warn_missing_digits(table: NumberTable) -> None:
    found = {int(v) for v in table.values[table.is_number].tolist()}
    missing = sorted(set(range(10)) - found)
    if missing:
        warnings.warn(
            f"digit-level number tokens of {table.tokenizer_identity} lack the digits {missing}; "
            "NTL can never predict them. Train/extend the tokenizer so 0-9 are single tokens.",
            TokenObjectivesWarning,
            stacklevel=3,
        )
