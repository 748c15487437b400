"""results.json -> the paired differences and the markdown table the docs show.

    results = assemble(rows, settings=..., command=..., seconds=...)   # what results.json holds
    text = markdown(results)                                          # the table, made from it
    replace_block(page, text)                                         # into a docs page

The docs page keeps the table between RESULTS_BEGIN and RESULTS_END; a test checks that it is
markdown(results.json) as committed.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from token_objectives.experiments.run import BASELINE
from token_objectives.experiments.statistics import INTERVAL, paired_difference, verdict

# metric -> (label, lower is better); each is compared with CE.
COMPARED = {
    "exact_accuracy": ("exact accuracy", False),
    "mae": ("MAE", True),
    "digit_error": ("digit error", True),
    "valid_ce": ("answer CE", True),
}
VOCABULARY_LABELS = {"digits": "digit-level", "llama3": "Llama-3"}
RESULTS_BEGIN = "<!-- results: begin (made by launch/objectives_experiment.py) -->"
RESULTS_END = "<!-- results: end -->"


def metric_of(row: dict, metric: str) -> float:
    return row["valid_ce"] if metric == "valid_ce" else row["metrics"][metric]


def arms_of(rows: list[dict]) -> list[tuple[str, str]]:
    """(vocabulary, arm) in the order first run."""
    return list(dict.fromkeys((row["vocabulary"], row["arm"]) for row in rows))


def differences(rows: list[dict]) -> list[dict]:
    """For each vocabulary's arm other than CE and each COMPARED metric, the paired difference
    to CE of the same vocabulary (statistics.paired_difference), with its verdict."""
    result = []
    for vocabulary, arm in arms_of(rows):
        if arm == BASELINE:
            continue
        for metric, (_, lower_is_better) in COMPARED.items():
            values = {r["seed"]: metric_of(r, metric) for r in rows
                      if r["vocabulary"] == vocabulary and r["arm"] == arm}
            base = {r["seed"]: metric_of(r, metric) for r in rows
                    if r["vocabulary"] == vocabulary and r["arm"] == BASELINE}
            difference = paired_difference(values, base)
            result.append({"vocabulary": vocabulary, "arm": arm, "baseline": BASELINE,
                           "metric": metric, **difference,
                           "verdict": verdict(difference, lower_is_better)})
    return result


def assemble(rows: list[dict], **about) -> dict:
    """What results.json holds: `about` (command, seconds, settings, ...), the interval's
    method, every run's row and the paired differences."""
    return {**about, "interval": INTERVAL, "runs": rows, "differences": differences(rows)}


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def _number(value: float, metric: str) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.3f}" if metric != "mae" else f"{value:.1f}"


def _difference_cell(difference: dict | None, metric: str) -> str:
    if difference is None:
        return "—"
    if not math.isfinite(difference["mean"]):
        return "n/a"
    mean = _number(abs(difference["mean"]), metric)
    signed = "±" if float(mean) == 0 else "+" if difference["mean"] > 0 else "−"
    low, high = (_number(difference[k], metric).replace("-", "−") for k in ("low", "high"))
    mark = {"better": " ✓", "worse": " ✗", "unclear": ""}[difference["verdict"]]
    return f"{signed}{mean} [{low}, {high}]{mark}"


def markdown(results: dict) -> str:
    """The table: per vocabulary and arm, each metric's mean over seeds and its paired
    difference to CE with the 95% interval (✓: the interval is on the better side of 0, ✗:
    on the worse side)."""
    rows, found = results["runs"], {}
    for d in results["differences"]:
        found[(d["vocabulary"], d["arm"], d["metric"])] = d
    seeds = sorted({row["seed"] for row in rows})
    header = ["vocabulary", "arm"]
    for label, _ in COMPARED.values():
        header += [label, f"Δ {label} vs CE [95% CI]"]
    lines = [f"Seeds {seeds}; {rows[0]['metrics']['examples']} held-out problems; mean over "
             f"seeds, and the paired difference to CE ({results['interval']}). MAE and digit "
             f"error are over the answers that hold a number; answer CE is per token of each "
             f"vocabulary (not comparable across the two).", "",
             "| " + " | ".join(header) + " |", "| --- | --- |" + " ---: |" * (len(header) - 2)]
    for vocabulary, arm in arms_of(rows):
        mine = [r for r in rows if r["vocabulary"] == vocabulary and r["arm"] == arm]
        cells = [VOCABULARY_LABELS.get(vocabulary, vocabulary), arm]
        for metric in COMPARED:
            cells.append(_number(_mean([metric_of(r, metric) for r in mine]), metric))
            cells.append(_difference_cell(found.get((vocabulary, arm, metric)), metric))
        lines.append("| " + " | ".join(cells) + " |")
    members = results.get("decile_members", {}).get("digits")
    if members:
        lines += ["", "Answer CE (teacher-forced, nats per token) per target-frequency decile "
                  "of the digit-level vocabulary (1: the rarest tenth of the token types, by "
                  "their count in the training data; the types of each decile in brackets; "
                  "n/a: never an answer token):", "",
                  "| arm | " + " | ".join(
                      f"{d} ({' '.join(f'`{token}`' for token in members[str(d)])})"
                      for d in range(1, 11)) + " |",
                  "| --- |" + " ---: |" * 10]
        for vocabulary, arm in arms_of(rows):
            if vocabulary != "digits":
                continue
            mine = [r for r in rows if r["vocabulary"] == vocabulary and r["arm"] == arm]
            cells = [_number(_mean([r["valid_ce_per_decile"][str(d)] for r in mine]), "ce")
                     for d in range(1, 11)]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replace_block(page: str | Path, text: str) -> None:
    """Put `text` between RESULTS_BEGIN and RESULTS_END in the docs page `page`."""
    page = Path(page)
    content = page.read_text(encoding="utf-8")
    if RESULTS_BEGIN not in content or RESULTS_END not in content:
        raise ValueError(f"{page} has no results block: add the lines {RESULTS_BEGIN!r} and "
                         f"{RESULTS_END!r} where the table goes")
    head, rest = content.split(RESULTS_BEGIN, 1)
    _, tail = rest.split(RESULTS_END, 1)
    page.write_text(f"{head}{RESULTS_BEGIN}\n{text}\n{RESULTS_END}{tail}", encoding="utf-8")


def block_of(page: str | Path) -> str:
    """The text between RESULTS_BEGIN and RESULTS_END of a docs page."""
    content = Path(page).read_text(encoding="utf-8")
    return content.split(RESULTS_BEGIN, 1)[1].split(RESULTS_END, 1)[0].strip("\n")
