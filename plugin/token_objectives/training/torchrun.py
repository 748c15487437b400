"""`torchrun` whose exit status tells a clean stop on a signal from a failure.

    python3 -m token_objectives.training.torchrun [torchrun options] SCRIPT [script args]

takes torchrun's own options and runs torchrun itself (`torch.distributed.run.main`). The only
difference is the end of a run stopped by SIGTERM (scancel, a preemption, the time limit): the
torchrun agent forwards the signal to its workers and waits `--shutdown-timeout` seconds (default
30) for them, then raises a SignalException and torchrun exits 1, so the job looks FAILED even
when every worker saved. Here each worker that saved and stopped after a signal writes a marker
into a directory this launcher made for its own node (`report_clean_stop`, from the shared run
loop); when every local worker did, the launcher exits 0 and says so. A worker that did not (it
was still saving when the agent killed it) gives exit status 128 + the signal, naming the
worker and the option to raise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

STOP_DIR_ENV = "TOKEN_OBJECTIVES_STOP_DIR"
PREFIX = "token_objectives.training.torchrun"


def report_clean_stop(step: int, checkpoint: str | None = None) -> None:
    """Worker side, after a signal: this worker's checkpoint of `step` is saved and it stops.
    Does nothing unless the launcher above started the run."""
    directory = os.environ.get(STOP_DIR_ENV)
    if not directory or not Path(directory).is_dir():
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    marker = {"step": step, "rank": int(os.environ.get("RANK", "0")), "local_rank": local_rank,
              "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
              "checkpoint": checkpoint}
    final = Path(directory) / f"{local_rank}.json"
    partial = final.with_suffix(".partial")
    partial.write_text(json.dumps(marker))
    partial.replace(final)  # the launcher never reads half a marker


def read_clean_stops(directory: Path) -> tuple[list[dict], int | None]:
    """The markers of this node's workers, and how many workers the node runs (None: none
    reported)."""
    markers = [json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))]
    sizes = {marker["local_world_size"] for marker in markers}
    return markers, (max(sizes) if sizes else None)


def stop_status(directory: Path, signum: int) -> tuple[int, str]:
    """The exit status and the line to print after the agent got `signum`."""
    name = signal.Signals(signum).name
    markers, local_workers = read_clean_stops(directory)
    reported = {marker["local_rank"] for marker in markers}
    if local_workers is not None and reported == set(range(local_workers)):
        steps = sorted({marker["step"] for marker in markers})
        return 0, (f"{PREFIX}: {name}: all {local_workers} workers of this node saved a "
                   f"checkpoint at step {steps[-1]} and stopped: a clean stop, exit status 0")
    if local_workers is None:
        who = "no local worker reported a saved checkpoint"
    else:
        absent = sorted(set(range(local_workers)) - reported)
        who = f"local workers {absent} of {local_workers} reported no saved checkpoint"
    return 128 + signum, (
        f"{PREFIX}: {name}: {who} before torchrun stopped them (it kills them after "
        f"--shutdown-timeout seconds, default 30: raise it, and SLURM's KillWait, above the "
        f"save time); resume from the newest complete checkpoint. Exit status {128 + signum}")


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    directory = Path(tempfile.mkdtemp(prefix="token-objectives-stop-"))
    os.environ[STOP_DIR_ENV] = str(directory)  # the workers inherit it
    try:
        torchrun_main(sys.argv[1:] if argv is None else argv)
        return 0
    except SignalException as stopped:
        status, line = stop_status(directory, int(stopped.sigval))
        print(line, file=sys.stderr, flush=True)
        return status
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
