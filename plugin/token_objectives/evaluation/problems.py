"""The evaluation set: a JSONL file of {"prompt": str, "answer": number or numeric string}."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from token_objectives.evaluation.numbers import NUMBER, parse_number
from token_objectives.tables.errors import InputError
from token_objectives.tables.jsonl import json_object_line

__all__ = ["Problem", "read_problems"]


@dataclass(frozen=True)
class Problem:
    """One line of the set: its 1-based line number, the prompt, the answer's value."""

    line: int
    prompt: str
    answer: float


def read_problems(path: str | os.PathLike) -> list[Problem]:
    """Every line of `path` as a Problem; raises InputError naming the file, the first bad line
    and the fix (blank lines are bad too: nothing is dropped silently)."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file; pass a JSONL file of "
                         f'{{"prompt": ..., "answer": ...}} lines')
    problems = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            problem, reason = _parse_line(number, raw)
            if problem is None:
                raise InputError(f'{path}:{number}: {reason}; each line must be one JSON object '
                                 f'{{"prompt": "...", "answer": 42}} (the answer a number or a '
                                 f'numeric string such as "-1,234.5")')
            problems.append(problem)
    if not problems:
        raise InputError(f"{path} holds no problems; add JSONL lines of "
                         f'{{"prompt": ..., "answer": ...}}')
    return problems


def _parse_line(number: int, raw: bytes) -> tuple[Problem | None, str]:
    record, reason = json_object_line(raw, ("prompt", "answer"))
    if record is None:
        return None, reason
    prompt, answer = record["prompt"], record["answer"]
    if not isinstance(prompt, str) or not prompt:
        return None, '"prompt" must be a non-empty string'
    if isinstance(answer, bool) or not isinstance(answer, (int, float, str)):
        return None, f'"answer" is a {type(answer).__name__}, not a number'
    if isinstance(answer, str):
        if NUMBER.fullmatch(answer.strip()) is None:
            return None, f'"answer" {answer!r} is not one number'
        value = parse_number(answer.strip())
    else:
        try:
            value = float(answer)
        except OverflowError:  # an integer past a float's range
            value = math.inf
    # JSON's NaN and Infinity parse, and so do numbers past a float's range: the metrics and
    # the report cannot hold them.
    if not math.isfinite(value):
        return None, f'"answer" {json.dumps(answer)} is not a finite number'
    return Problem(number, prompt, value), ""
