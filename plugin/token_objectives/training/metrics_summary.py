"""Print how each logged loss component moved over a run, from its metrics.jsonl."""

from __future__ import annotations

import sys
from pathlib import Path

from token_objectives.training.metrics import read_rows

# The loss components (objectives.components; docs/metrics.md), in the order printed.
COMPONENTS = ("lm loss", "ce", "ce part", "ntl part", "ntl")


def summarize(path: str | Path, window: int = 10) -> str:
    """Mean of the first and of the last `window` steps, per component."""
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"{path} holds no logged steps")
    window = max(1, min(window, len(rows) // 2 or 1))
    lines = [f"steps {rows[0]['step']}..{rows[-1]['step']}: mean of the first and last "
             f"{window} steps"]
    for name in COMPONENTS:
        if name not in rows[0]:
            continue
        first = sum(r[name] for r in rows[:window]) / window
        last = sum(r[name] for r in rows[-window:]) / window
        arrow = "down" if last < first else "UP"
        lines.append(f"  {name:<22} {first:8.4f} -> {last:8.4f}  ({arrow})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m token_objectives.training.metrics_summary RUN_DIR/metrics.jsonl",
              file=sys.stderr)
        return 2
    print(summarize(args[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
