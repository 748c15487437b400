"""The arithmetic task: a + b with a, b in [0, 999] and a * b with a in [0, 99], b in [0, 9],
written "123+456=579" and ended by the end-of-document token; the loss counts the answer and
its end only (the operands are the prompt).

The held-out problems are drawn once (a fixed seed), half of each operator; the training
batches of a seed are drawn from the same distribution with every held-out (a, op, b) left out,
so no test problem is ever trained on and every arm of a seed sees the same batches.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

# operator -> (a < this, b < this)
OPERAND_LIMITS = {"+": (1000, 1000), "*": (100, 10)}
HELD_OUT_SEED = 4242


@dataclass(frozen=True, order=True)
class Problem:
    """One problem, `a op b`."""

    a: int
    op: str
    b: int

    @property
    def prompt(self) -> str:
        """"123+456=": what the model is given."""
        return f"{self.a}{self.op}{self.b}="

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a * self.b


def draw(rng: random.Random, op: str | None = None) -> Problem:
    """A problem of `op` (default: either, with equal chance), operands uniform in its limits."""
    op = op or rng.choice(sorted(OPERAND_LIMITS))
    a_limit, b_limit = OPERAND_LIMITS[op]
    return Problem(rng.randrange(a_limit), op, rng.randrange(b_limit))


def held_out(per_operator: int) -> list[Problem]:
    """`per_operator` distinct problems of each operator, sorted; the same for every seed."""
    rng = random.Random(HELD_OUT_SEED)
    chosen: set[Problem] = set()
    for op in sorted(OPERAND_LIMITS):
        a_limit, b_limit = OPERAND_LIMITS[op]
        if per_operator > a_limit * b_limit // 2:
            raise ValueError(f"{per_operator} held-out {op!r} problems would leave too few of "
                             f"its {a_limit * b_limit} for training; ask for fewer")
        mine: set[Problem] = set()
        while len(mine) < per_operator:
            mine.add(draw(rng, op))
        chosen |= mine
    return sorted(chosen)


def training_batches(seed: int, batch_size: int, excluded: set[Problem]) -> Iterator[list[Problem]]:
    """Endless batches of training problems for `seed`, none of them in `excluded`."""
    rng = random.Random(seed)
    while True:
        batch: list[Problem] = []
        while len(batch) < batch_size:
            problem = draw(rng)
            if problem not in excluded:
                batch.append(problem)
        yield batch
