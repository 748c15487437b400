"""metrics.jsonl and TensorBoard scalars of a run, written by the logging rank only.

One JSON line per step (`loop.StepRecord.row`), appended and flushed per step so that a kill
loses at most a torn last line. A resume drops the lines after the resumed step (they are done
again), skipping a torn line, and purges those steps from TensorBoard where the writer can.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

Scalar = tuple[str, float]  # (tag, value)


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl, each as `current_row` reads it; a torn last line is
    skipped."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(current_row(json.loads(line)))
        except ValueError:
            continue
    return rows


def current_row(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics.jsonl row under today's names (objectives.components): a row written before
    "number tokens" became a count held the share under that name, and no "number token
    share"; it is moved there (the count is unknown)."""
    if "number tokens" in row and "number token share" not in row:
        row = dict(row)
        row["number token share"] = row.pop("number tokens")
    return row


class StepRecord(Protocol):
    """What the writer reads of a step's record (training.loop.StepRecord)."""

    step: int

    @property
    def row(self) -> dict[str, Any]: ...


class ScalarSink(Protocol):
    """Where the TensorBoard scalars go."""

    def write(self, scalars: list[Scalar], step: int) -> None: ...

    def forget_after(self, step: int) -> None: ...

    def close(self) -> None: ...


class SummaryWriterSink:
    """torch's SummaryWriter on one run directory for the whole job: a resumed run appends to it,
    purging the steps after the resumed one."""

    def __init__(self, log_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, scalars: list[Scalar], step: int) -> None:
        for tag, value in scalars:
            self.writer.add_scalar(tag, value, step)

    def forget_after(self, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer.close()
        self.writer = SummaryWriter(log_dir=self.writer.log_dir, purge_step=step + 1)

    def close(self) -> None:
        self.writer.close()


class MonitorSink:
    """DeepSpeed's monitor (its ds_config "tensorboard" / "csv_monitor" sections), which has no
    purge: a resumed run's repeated steps are TensorBoard's to resolve, as before."""

    def __init__(self, monitor) -> None:
        self.monitor = monitor

    def write(self, scalars: list[Scalar], step: int) -> None:
        self.monitor.write_events([(tag, value, step) for tag, value in scalars])

    def forget_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsWriter:
    """metrics.jsonl at `path` and, with a sink, TensorBoard scalars named by `tags`.

    enabled: whether this rank logs (one rank per run); elsewhere every method does nothing.
    No collectives.
    """

    def __init__(self, path: str | Path, enabled: bool, sink: ScalarSink | None = None,
                 tags: Callable[[StepRecord], list[Scalar]] | None = None) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.sink = sink if enabled else None
        self.tags = tags

    def write(self, record: StepRecord) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record.row) + "\n")
        if self.sink is not None and self.tags is not None:
            self.sink.write(self.tags(record), record.step)

    def forget_after(self, step: int) -> None:
        """Drop the lines of the steps after `step` (0: all), and a torn line cut short by a
        kill; the sink forgets those steps too."""
        if not self.enabled:
            return
        if self.path.exists():
            kept = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        if self.sink is not None:
            self.sink.forget_after(step)

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
