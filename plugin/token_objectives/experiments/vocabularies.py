"""The two tokenizations of the arithmetic task, each with the model vocabulary it trains on.

- "digits": one token per character (0-9, "+", "*", "="), plus the end-of-document token; a
  `tokenizers.Tokenizer` made here, whose NumberTable comes from `NumberTable.from_tokenizer`
  (digit mode), as a user's digit-level tokenizer's would.
- "llama3": Meta's Llama-3 tokenizer (the llama-models package's tiktoken file; nothing is
  downloaded): numbers split left to right into groups of at most three digits ("4690" ->
  "469", "0"), every 1-3 digit string one token. The model's vocabulary is the Llama-3 tokens
  the task can use: all 1,110 number tokens, "+", "*", "=" and <|end_of_text|>, renumbered
  0..1113; their values and digit counts are the Llama-3 tokens' (number mode "groups": a target
  is compared only with the number tokens of its own digit count). A 128,256-row output layer
  would cost this tiny model most of its time for rows no problem ever uses.
"""

from __future__ import annotations

import functools
import math
import re

import torch

from token_objectives.experiments.arithmetic import Problem
from token_objectives.tables.numbers import NumberTable, number_value

VOCABULARIES = ("digits", "llama3")
END = "<eod>"


class Vocabulary:
    """A tokenization of the task. ids: the model's, 0..size-1; eod ends every problem."""

    name: str
    size: int
    eod: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def numbers(self) -> NumberTable:
        raise NotImplementedError

    def encode_problem(self, problem: Problem) -> tuple[list[int], int]:
        """(ids of prompt + answer + eod, the index of the answer's first id)."""
        prompt = self.encode(problem.prompt)
        return [*prompt, *self.encode(str(problem.answer)), self.eod], len(prompt)

    def counts(self, problems: list[Problem]) -> torch.Tensor:
        """int64 [size]: how often each id occurs in the problems' whole text (the corpus
        frequencies PDL weights by)."""
        ids = [i for problem in problems for i in self.encode_problem(problem)[0]]
        return torch.bincount(torch.tensor(ids), minlength=self.size)


class DigitVocabulary(Vocabulary):
    name = "digits"

    def __init__(self) -> None:
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

        pieces = [*"0123456789", "+", "*", "="]
        self.tokenizer = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)},
                                                    unk_token=None))
        self.tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
        self.tokenizer.decoder = decoders.Fuse()
        self.tokenizer.add_special_tokens([END])
        self.size = self.tokenizer.get_vocab_size()
        self.eod = self.tokenizer.token_to_id(END)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def numbers(self) -> NumberTable:
        return NumberTable.from_tokenizer(self.tokenizer, number_tokens="digit")


class Llama3Vocabulary(Vocabulary):
    name = "llama3"

    def __init__(self) -> None:
        from llama_models.llama3.tokenizer import Tokenizer

        self.tokenizer = Tokenizer.get_instance()
        encoding = self.tokenizer.model
        number_ids = []
        for token_id in range(encoding.n_vocab):
            try:
                text = encoding.decode_single_token_bytes(token_id).decode("utf-8")
            except (KeyError, UnicodeDecodeError):
                continue
            if re.fullmatch(r"[0-9]{1,3}", text):
                number_ids.append(token_id)
        others = [self._single(text) for text in "+*="] + [self.tokenizer.eos_id]
        self.llama_ids = [*number_ids, *others]
        self.model_id = {llama: i for i, llama in enumerate(self.llama_ids)}
        self.size = len(self.llama_ids)
        self.eod = self.model_id[self.tokenizer.eos_id]
        self.number_count = len(number_ids)

    def _single(self, text: str) -> int:
        (token_id,) = self.tokenizer.encode(text, bos=False, eos=False)
        return token_id

    def encode(self, text: str) -> list[int]:
        return [self.model_id[i] for i in self.tokenizer.encode(text, bos=False, eos=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([self.llama_ids[i] for i in ids])

    def numbers(self) -> NumberTable:
        texts = [self.tokenizer.decode([i]) for i in self.llama_ids[:self.number_count]]
        values = torch.full((self.size,), math.nan)
        values[:self.number_count] = torch.tensor([number_value(t, mode="groups") for t in texts])
        return NumberTable.from_values(values, grouped=True, number_token_texts=tuple(texts),
                                       tokenizer_identity=f"llama3-arithmetic-{self.size}")


@functools.cache
def vocabulary(name: str) -> Vocabulary:
    """The vocabulary called `name` (VOCABULARIES), made once per process."""
    if name == "digits":
        return DigitVocabulary()
    if name == "llama3":
        return Llama3Vocabulary()
    raise ValueError(f"unknown vocabulary {name!r}; choose among {VOCABULARIES}")
