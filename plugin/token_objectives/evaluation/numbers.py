"""The last number of a generation: negatives, decimals and thousands separators.

A number is an optional minus sign, digits (either plain, `1234`, or grouped by commas in threes,
`1,234,567`) and an optional decimal part (`.5`, digits required after the point). The minus
counts only when it does not follow a word character or a digit ("5-3" holds 5 and 3, not -3;
"A: -8" holds -8). A comma that does not group exactly three digits separates numbers ("1,23"
holds 1 and 23; "3, 4" holds 3 and 4). A point not followed by a digit ends the number ("82."
is 82); a decimal needs a digit before its point ("0.5"; ".5" holds no number), and a second
point ends it ("1.2.3" holds 1.2).
"""

from __future__ import annotations

import re

__all__ = ["NUMBER", "last_number", "parse_number"]

NUMBER = re.compile(
    r"(?:(?<![\w.])-)?"  # a minus that is a sign, not a subtraction
    r"(?<![\d.])"  # never the tail of a longer number or a decimal part
    r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"  # grouped in threes, or plain
    r"(?:\.\d+)?"
)


def parse_number(text: str) -> float:
    """The value of one number as NUMBER matches it ("1,234.5" -> 1234.5)."""
    return float(text.replace(",", ""))


def last_number(text: str) -> float | None:
    """The value of the last number in `text`, or None when there is none."""
    found = NUMBER.findall(text)
    return parse_number(found[-1]) if found else None
