"""Tokenizers trained locally on a small English + numbers corpus (no network), as pytest fixtures.

Fixtures: `corpus_lines`, `corpus_path`, `sp_model_path` (sentencepiece unigram, split digits,
byte fallback), `bpe_tokenizer_path` (byte-level BPE tokenizer.json, digits split one by one) and
`hf_tokenizer` (a transformers fast tokenizer wrapping that BPE, with eos/unk/pad set).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import sentencepiece
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = [
    "BPE_SPECIAL_TOKENS",
    "bpe_tokenizer_path",
    "corpus_lines",
    "corpus_path",
    "gpt2_style_bpe_tokenizer",
    "hf_tokenizer",
    "make_corpus",
    "sp_model_path",
    "train_bpe_tokenizer",
    "train_sentencepiece",
    "word_level_tokenizer",
]

BPE_SPECIAL_TOKENS = ["<unk>", "<pad>", "<eos>"]

_ITEMS = ["apples", "books", "tickets", "shares", "bottles", "chairs", "lamps", "coins"]
_NAMES = ["Alice", "Bob", "Carla", "Deepak", "Emma", "Farid", "Grace", "Hiro"]
_CITIES = ["Paris", "Lagos", "Lima", "Oslo", "Pune", "Quito", "Seoul", "Tunis"]
_TEMPLATES = [
    "{name} bought {n} {item} for ${price} in {year}.",
    "The temperature in {city} was {dec} degrees on day {n}.",
    "In {year}, {city} had about {big} inhabitants.",
    "{name} scored {dec} out of 10 and finished {n} minutes early.",
    "A box of {n} {item} costs {price} dollars, which is {dec} per item.",
    "Between {year} and {year2} the price rose from {price} to {price2}.",
    "The train to {city} leaves at {hour}:{minute} from platform {n}.",
    "We counted {big} {item} and {n} more in the back room.",
]


def make_corpus(num_lines: int = 400, seed: int = 1234) -> list[str]:
    """Deterministic sentences with integers, decimals, years and prices."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        template = rng.choice(_TEMPLATES)
        lines.append(
            template.format(
                name=rng.choice(_NAMES),
                item=rng.choice(_ITEMS),
                city=rng.choice(_CITIES),
                n=rng.randint(0, 99),
                big=rng.randint(1000, 9_999_999),
                dec=f"{rng.uniform(0, 10):.1f}",
                price=f"{rng.uniform(1, 500):.2f}",
                price2=f"{rng.uniform(1, 500):.2f}",
                year=rng.randint(1900, 2030),
                year2=rng.randint(1900, 2030),
                hour=f"{rng.randint(0, 23):02d}",
                minute=f"{rng.randint(0, 59):02d}",
            )
        )
    return lines


def train_sentencepiece(lines: list[str], prefix: Path, vocab_size: int = 400) -> Path:
    """Unigram sentencepiece model with split digits and byte fallback; returns the .model path."""
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(prefix),
        model_type="unigram",
        vocab_size=vocab_size,
        split_digits=True,
        byte_fallback=True,
        hard_vocab_limit=False,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def train_bpe_tokenizer(lines: list[str], vocab_size: int = 400) -> Tokenizer:
    """Byte-level BPE whose pre-tokenizer isolates every digit (so digits are single tokens)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=BPE_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer=trainer)
    return tokenizer


def gpt2_style_bpe_tokenizer(lines: list[str], vocab_size: int = 300) -> Tokenizer:
    """Byte-level BPE as GPT-2 builds it: ByteLevel pre-tokenizer only (digits merge into
    multi-digit tokens), one special token <|endoftext|>."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer=trainer)
    return tokenizer


def word_level_tokenizer(tokens: list[str]) -> Tokenizer:
    """A WordLevel tokenizer whose vocabulary is "[UNK]" followed by exactly `tokens`."""
    vocab = {"[UNK]": 0}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))


@pytest.fixture(scope="session")
def corpus_lines() -> list[str]:
    return make_corpus()


@pytest.fixture(scope="session")
def corpus_path(tmp_path_factory, corpus_lines) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(corpus_lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory, corpus_lines) -> Path:
    return train_sentencepiece(corpus_lines, tmp_path_factory.mktemp("spm") / "numbers")


@pytest.fixture(scope="session")
def bpe_tokenizer_path(tmp_path_factory, corpus_lines) -> Path:
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    train_bpe_tokenizer(corpus_lines).save(str(path))
    return path


@pytest.fixture(scope="session")
def hf_tokenizer(bpe_tokenizer_path):
    """transformers fast tokenizer over the BPE; its special tokens already exist in the vocab."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(bpe_tokenizer_path),
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<eos>",
    )


def text_batch(tokenizer, lines: list[str], seed: int = 0):
    """Real text as labels [lines, longest] (-100 past each line's end) and random fp64 logits
    [lines, longest, len(tokenizer)]; returns (labels, logits, the generator, for more draws)."""
    import torch

    ids = [tokenizer(line)["input_ids"] for line in lines]
    labels = torch.full((len(ids), max(map(len, ids))), -100, dtype=torch.long)
    for row, seq in enumerate(ids):
        labels[row, : len(seq)] = torch.tensor(seq)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(*labels.shape, len(tokenizer), generator=gen, dtype=torch.float64) * 2
    return labels, logits, gen
