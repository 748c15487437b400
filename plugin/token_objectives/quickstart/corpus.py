"""A generated English corpus rich in numbers, for the quickstart run (no download).

Two kinds of documents, a few lines each: arithmetic worksheets ("Q: 37 + 45 = ? A: 82",
"What is 12 times 7? 84") and short stories mixing number facts (years, counts, prices,
temperatures, distances, times) with word problems ("... so Ana now has 19 pears."). Every answer
is computed, never sampled, so the arithmetic is always right.
"""

from __future__ import annotations

import random

__all__ = ["CORPUS_VERSION", "generate_corpus"]

# Bump whenever the text a seed produces changes, so cached builds are regenerated.
CORPUS_VERSION = 1

_NAMES = (
    "Alice", "Bob", "Carla", "Deepak", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas",
    "Kemal", "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq",
)  # fmt: skip
_CITIES = (
    "Paris", "Lagos", "Lima", "Oslo", "Pune", "Quito", "Seoul", "Tunis", "Vienna", "Kyoto",
    "Cairo", "Dublin", "Hanoi", "Madrid", "Nairobi", "Porto", "Riga", "Sydney", "Toronto", "Zurich",
)  # fmt: skip
# (singular, plural)
_ITEMS = (
    ("apple", "apples"), ("book", "books"), ("ticket", "tickets"), ("bottle", "bottles"),
    ("chair", "chairs"), ("lamp", "lamps"), ("coin", "coins"), ("pencil", "pencils"),
    ("orange", "oranges"), ("stamp", "stamps"), ("candle", "candles"), ("basket", "baskets"),
    ("notebook", "notebooks"), ("shirt", "shirts"), ("cup", "cups"), ("plant", "plants"),
)  # fmt: skip
_PLACES = ("garden", "library", "market", "school", "kitchen", "museum", "harbor", "station")
_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
_OPERATION_WORDS = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}


def _integer(rng: random.Random) -> int:
    """An integer of 1 to 3 digits, each length equally likely (small numbers stay common)."""
    digits = rng.randint(1, 3)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _money(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def _problem(rng: random.Random) -> tuple[int, str, int, int]:
    """(a, operator, b, answer) with a non-negative integer answer."""
    operator = rng.choice("+-*/")
    if operator == "+":
        a, b = _integer(rng), _integer(rng)
        return a, operator, b, a + b
    if operator == "-":
        a, b = sorted((_integer(rng), _integer(rng)), reverse=True)
        return a, operator, b, a - b
    if operator == "*":
        a, b = rng.randint(2, 20), rng.randint(2, 12)
        return a, operator, b, a * b
    quotient, divisor = rng.randint(2, 20), rng.randint(2, 12)
    return quotient * divisor, operator, divisor, quotient


def _worksheet_line(rng: random.Random) -> str:
    a, operator, b, answer = _problem(rng)
    if rng.random() < 0.5:
        return f"Q: {a} {operator} {b} = ? A: {answer}"
    return f"What is {a} {_OPERATION_WORDS[operator]} {b}? {answer}"


def _worksheet(rng: random.Random) -> list[str]:
    title = f"Practice set {rng.randint(1, 99)}, page {rng.randint(1, 30)}."
    return [title] + [_worksheet_line(rng) for _ in range(rng.randint(4, 7))]


def _count_problem(rng: random.Random, name: str, plural: str) -> str:
    have, change = _integer(rng), _integer(rng)
    if rng.random() < 0.5:
        action, total = f"buys {change} more", have + change
    else:
        have, change = max(have, change), min(have, change)
        action, total = f"gives away {change}", have - change
    return f"{name} has {have} {plural} and {action}, so {name} now has {total} {plural}."


def _price_problem(rng: random.Random, singular: str, plural: str) -> str:
    cents, count = rng.randint(5, 5000), rng.randint(2, 12)
    return (
        f"One {singular} costs ${_money(cents)}, so {count} {plural} cost ${_money(cents * count)}."
    )


def _fact(rng: random.Random, name: str, city: str, singular: str, plural: str) -> str:
    month, day = rng.choice(_MONTHS), rng.randint(1, 28)
    facts = (
        f"{city} was founded in {rng.randint(800, 1950)}.",
        f"In {rng.randint(1900, 2024)}, {city} had about {rng.randint(10_000, 9_999_999)} people.",
        f"The temperature in {city} was {rng.uniform(-15, 40):.1f} degrees on {month} {day}.",
        f"The distance from {city} to {rng.choice(_CITIES)} is {rng.randint(20, 9000)} km.",
        f"{name} counted {rng.randint(2, 500)} {plural} in the {rng.choice(_PLACES)}.",
        f"A {singular} costs ${_money(rng.randint(5, 9999))} at the market in {city}.",
        f"The train to {city} leaves at {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d} "
        f"from platform {rng.randint(1, 20)}.",
        f"{name} was born on {month} {day}, {rng.randint(1940, 2015)}.",
        f"The {rng.choice(_PLACES)} in {city} is {rng.uniform(1, 99):.1f} km from the center.",
    )
    return rng.choice(facts)


def _story(rng: random.Random) -> list[str]:
    name, city = rng.choice(_NAMES), rng.choice(_CITIES)
    singular, plural = rng.choice(_ITEMS)
    lines = [_fact(rng, name, city, singular, plural) for _ in range(rng.randint(2, 4))]
    lines.append(_count_problem(rng, name, plural))
    lines.append(_price_problem(rng, singular, plural))
    rng.shuffle(lines)
    return lines


def generate_corpus(num_documents: int, seed: int = 0) -> list[str]:
    """`num_documents` documents (lines joined by "\\n"), the same for the same seed."""
    if num_documents < 0:
        raise ValueError(f"num_documents must be >= 0, got {num_documents}")
    rng = random.Random(seed)
    documents = []
    for _ in range(num_documents):
        lines = _worksheet(rng) if rng.random() < 0.5 else _story(rng)
        documents.append("\n".join(lines))
    return documents
