"""The evaluation report: a console table and a JSON file (metrics plus every generation)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

from token_objectives.evaluation.metrics import METRICS, number_metrics
from token_objectives.evaluation.numbers import last_number
from token_objectives.evaluation.problems import Problem

__all__ = ["build_report", "format_table", "write_report"]


def build_report(problems: Sequence[Problem], generations: Sequence[str],
                 source: dict | None = None) -> dict:
    """{"metrics": number_metrics(...), "source": ..., "generations": [per problem: line,
    prompt, answer, generation, parsed (None: no number), correct]}."""
    parsed = [last_number(text) for text in generations]
    rows = [{"line": p.line, "prompt": p.prompt, "answer": p.answer, "generation": text,
             "parsed": value, "correct": value is not None and value == p.answer}
            for p, text, value in zip(problems, generations, parsed, strict=True)]
    return {"metrics": number_metrics(parsed, [p.answer for p in problems]),
            "source": source or {}, "generations": rows}


def format_table(metrics: dict[str, float]) -> str:
    """The metrics as a two-column markdown table."""
    lines = ["| metric | value |", "| --- | ---: |"]
    for name in (*METRICS, "examples", "parsed"):
        value = metrics[name]
        text = str(value) if isinstance(value, int) else (
            "n/a" if math.isnan(value) else f"{value:.4f}")
        lines.append(f"| {name} | {text} |")
    return "\n".join(lines)


def _finite(value):
    """NaN (an undefined metric) as JSON null, which strict parsers read."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def write_report(path: str | os.PathLike, report: dict) -> None:
    """`report` as indented JSON at `path` (NaN written as null)."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(_finite(report), handle, indent=2)
        handle.write("\n")
