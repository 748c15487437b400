"""Scores of parsed answers against the true ones.

Over all n examples:
    exact_accuracy   the share whose parsed number equals the answer (no number: wrong)
    no_number_rate   the share whose generation holds no number
Over the k examples with a parsed number p (answer y); NaN when k = 0:
    mae              mean |p - y|
    median_ae        median |p - y| (the mean of the two middle values when k is even)
    r2               1 - sum (y - p)^2 / sum (y - mean y)^2, mean over those k answers; NaN
                     when k < 2 or the k answers are all equal
    digit_error      per example, the integer parts of |p| and |y| (truncated toward zero) as
                     decimal digits, right-aligned (units under units), the shorter padded with
                     leading zeros: the share of those positions whose digits differ; the mean
                     over the k examples. 82 vs 85: 1/2; 82 vs 182: 1/3; 7 vs 7.9: 0. The
                     sign and the decimals are left to exact_accuracy and the errors above.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["METRICS", "digit_error", "number_metrics"]

METRICS = ("exact_accuracy", "mae", "median_ae", "r2", "digit_error", "no_number_rate")


def digit_error(predicted: float, answer: float) -> float:
    """The share of right-aligned integer-part digit positions where `predicted` and `answer`
    differ (see the module docstring)."""
    a, b = str(int(abs(predicted))), str(int(abs(answer)))
    width = max(len(a), len(b))
    a, b = a.rjust(width, "0"), b.rjust(width, "0")
    return sum(x != y for x, y in zip(a, b, strict=True)) / width


def number_metrics(predicted: Sequence[float | None], answers: Sequence[float]) -> dict[str, float]:
    """METRICS (and the counts "examples", "parsed") of parsed numbers against the answers;
    None in `predicted` is a generation without a number."""
    if len(predicted) != len(answers):
        raise ValueError(f"{len(predicted)} predictions for {len(answers)} answers")
    n = len(answers)
    pairs = [(p, y) for p, y in zip(predicted, answers, strict=True) if p is not None]
    nan = math.nan
    errors = [abs(p - y) for p, y in pairs]
    result = {
        "exact_accuracy": sum(p == y for p, y in pairs) / n if n else nan,
        "mae": sum(errors) / len(errors) if errors else nan,
        "median_ae": statistics.median(errors) if errors else nan,
        "r2": nan,
        "digit_error": (sum(digit_error(p, y) for p, y in pairs) / len(pairs)) if pairs else nan,
        "no_number_rate": (n - len(pairs)) / n if n else nan,
        "examples": n,
        "parsed": len(pairs),
    }
    if len(pairs) >= 2:
        mean = sum(y for _, y in pairs) / len(pairs)
        total = sum((y - mean) ** 2 for _, y in pairs)
        if total > 0:
            result["r2"] = 1.0 - sum((y - p) ** 2 for p, y in pairs) / total
    return result
