"""Paired differences between arms, with 95% intervals.

Every arm of a seed starts from the same weights and sees the same batches, so the comparison
is paired: for each seed, d = metric(arm) - metric(CE), and the interval is Student's t over
the seeds, mean(d) +- t(0.975, n - 1) * sd(d) / sqrt(n). It assumes the per-seed differences
are roughly normal; with 5 seeds the interval is wide (t = 2.78) and says so.
"""

from __future__ import annotations

import math
import statistics

CONFIDENCE = 0.95
INTERVAL = "Student's t over the paired per-seed differences, 95%"


def paired_difference(values: dict[int, float], baseline: dict[int, float]) -> dict:
    """seed -> metric of an arm and of the baseline -> the paired difference: mean, its 95%
    interval [low, high], sd, n and the per-seed differences. Seeds missing from either side,
    and NaN values, are left out; n < 2 gives an infinite interval."""
    from scipy.stats import t as student_t

    seeds = sorted(seed for seed in values if seed in baseline
                   and math.isfinite(values[seed]) and math.isfinite(baseline[seed]))
    differences = [values[seed] - baseline[seed] for seed in seeds]
    n = len(differences)
    if n == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "sd": math.nan, "n": 0,
                "per_seed": {}}
    mean = statistics.fmean(differences)
    sd = statistics.stdev(differences) if n > 1 else math.nan
    half = (student_t.ppf((1 + CONFIDENCE) / 2, n - 1) * sd / math.sqrt(n)) if n > 1 else math.inf
    return {"mean": mean, "low": mean - half, "high": mean + half, "sd": sd, "n": n,
            "per_seed": {str(seed): d for seed, d in zip(seeds, differences, strict=True)}}


def verdict(difference: dict, lower_is_better: bool) -> str:
    """"better" / "worse" when the interval excludes 0, else "unclear"."""
    if not (difference["n"] > 1 and math.isfinite(difference["low"])):
        return "unclear"
    if difference["low"] > 0:
        return "worse" if lower_is_better else "better"
    if difference["high"] < 0:
        return "better" if lower_is_better else "worse"
    return "unclear"
