"""The tables an ObjectiveConfig asks for: the NumberTable from a tokenizer, the PDL weights
from a `token-objectives count-frequencies` file, both over the model's padded vocab."""

from __future__ import annotations

import os

import torch

from token_objectives.objectives.config import NUMBER_TOKENS, ObjectiveConfig
from token_objectives.objectives.pdl import pdl_weights_for
from token_objectives.tables.frequencies import load_frequencies
from token_objectives.tables.numbers import NumberTable
from token_objectives.tables.tokenizers import TokenizerLike, as_tokenizer, tokenizer_identity


def objective_tables(
    config: ObjectiveConfig,
    tokenizer: TokenizerLike | None,
    frequencies: str | os.PathLike | None,
    vocab_size: int | None,
    number_tokens: str = "auto",
    numbers: NumberTable | None = None,
) -> tuple[NumberTable | None, torch.Tensor | None]:
    """(numbers, pdl_weights) for `config`: None where it needs none. The one place the tables
    of a config are made (Objective.build calls it).

    tokenizer: a local path or a tokenizer object (NumberTable.from_tokenizer), needed with NTL
        unless `numbers` is given (a table made already, over the model's padded vocab).
    frequencies: a count-frequencies file, needed with pdl_alpha > 0; it must hold vocab_size
        counts. vocab_size: the model's padded vocab V (default: the tokenizer's size).
    number_tokens: one of tables.numbers.NUMBER_TOKEN_MODES (NUMBER_TOKENS_HELP).
    """
    number_tokens = NUMBER_TOKENS.checked(number_tokens)
    if not config.uses_numbers:
        numbers = None
    elif numbers is not None:
        vocab_size = numbers.vocab_size
    else:
        if tokenizer is None:
            raise ValueError(f"{config.number_options()} needs a tokenizer (a local path or "
                             f"the tokenizer object) for its number tokens, or ntl=None and "
                             f"gaussian_sigma=0")
        numbers = NumberTable.from_tokenizer(tokenizer, vocab_size=vocab_size,
                                             number_tokens=number_tokens)
        vocab_size = numbers.vocab_size
    weights = None
    if config.pdl_alpha > 0:
        if frequencies is None:
            raise ValueError("pdl_alpha > 0 needs a frequencies file: the output of "
                             "`token-objectives count-frequencies --vocab-size <model vocab>`")
        # Counted with this tokenizer, or refused: another vocabulary of the same size would
        # weight every id by another token's count.
        identity = numbers.tokenizer_identity if numbers is not None else (
            tokenizer_identity(as_tokenizer(tokenizer)) if tokenizer is not None else None)
        weights = pdl_weights_for(config, load_frequencies(frequencies, vocab_size=vocab_size,
                                                           tokenizer_identity=identity))
    return numbers, weights


def stated_vocab(numbers: NumberTable | None, pdl_weights: torch.Tensor | None,
                 vocab_size: int | None = None, real_vocab_size: int | None = None
                 ) -> tuple[int | None, int | None]:
    """(V, real): the model's padded vocab and the tokenizer's size as the tables state them.
    V: vocab_size, else the NumberTable's, else the PDL table's length (None: unknown, plain
    CE); real: real_vocab_size, else the NumberTable's valid_vocab_size."""
    if vocab_size is None and numbers is not None:
        vocab_size = numbers.vocab_size
    if vocab_size is None and pdl_weights is not None:
        vocab_size = pdl_weights.numel()
    if real_vocab_size is None and numbers is not None:
        real_vocab_size = numbers.valid_vocab_size
    return vocab_size, real_vocab_size
