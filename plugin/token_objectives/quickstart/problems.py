"""Held-out arithmetic problems for the quickstart corpus's experiments: drawn like its worksheet
lines ("Q: 37 + 45 = ? A: 82"), none of whose (a, operator, b) occurs in the training split.

The prompt is a worksheet title and the question; the answer is what follows "A:" on that line.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

__all__ = ["OPERATORS", "Problem", "draw_problem", "held_out_problems", "training_problems"]

OPERATORS = "+-*/"
_Q_LINE = re.compile(r"Q: (\d+) ([-+*/]) (\d+) = \? A: \d+")
_WORDS = {"plus": "+", "minus": "-", "times": "*", "divided by": "/"}
_WORD_LINE = re.compile(r"What is (\d+) (plus|minus|times|divided by) (\d+)\? \d+")


@dataclass(frozen=True)
class Problem:
    a: int
    operator: str
    b: int

    @property
    def answer(self) -> int:
        a, b = self.a, self.b
        return {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[self.operator]

    def prompt(self, rng: random.Random) -> str:
        title = f"Practice set {rng.randint(1, 99)}, page {rng.randint(1, 30)}."
        return f"{title}\nQ: {self.a} {self.operator} {self.b} = ? A:"


def _integer(rng: random.Random) -> int:
    digits = rng.randint(1, 3)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def draw_problem(rng: random.Random) -> Problem:
    """The corpus's distribution of worksheet problems (quickstart.corpus)."""
    operator = rng.choice(OPERATORS)
    if operator == "+":
        return Problem(_integer(rng), "+", _integer(rng))
    if operator == "-":
        a, b = sorted((_integer(rng), _integer(rng)), reverse=True)
        return Problem(a, "-", b)
    if operator == "*":
        return Problem(rng.randint(2, 20), "*", rng.randint(2, 12))
    quotient, divisor = rng.randint(2, 20), rng.randint(2, 12)
    return Problem(quotient * divisor, "/", divisor)


def training_problems(num_documents: int, seed: int) -> set[Problem]:
    """Every (a, operator, b) the training split asks, in either phrasing."""
    from token_objectives.quickstart.build_data import split_train_valid
    from token_objectives.quickstart.corpus import generate_corpus

    train, _ = split_train_valid(generate_corpus(num_documents, seed=seed))
    seen = set()
    for document in train:
        for a, operator, b in _Q_LINE.findall(document):
            seen.add(Problem(int(a), operator, int(b)))
        for a, word, b in _WORD_LINE.findall(document):
            seen.add(Problem(int(a), _WORDS[word], int(b)))
    return seen


def held_out_problems(count: int, seen: set[Problem], seed: int) -> list[Problem]:
    """`count` distinct problems drawn as the corpus draws them, none of them in `seen`."""
    rng, chosen = random.Random(seed), {}
    while len(chosen) < count:
        problem = draw_problem(rng)
        if problem not in seen:
            chosen[problem] = None
    return list(chosen)
