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

Before torchrun starts, the counts it takes are checked (`check_counts`): --nproc-per-node 0 or
--nnodes 0 would stop it with a bare AssertionError, a static --node-rank outside --nnodes would
wait 15 minutes for nodes that never come. Each is one line naming the flag and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
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


def report_failed_stop(step: int, error: BaseException) -> None:
    """Worker side, after a signal: this worker's save of `step` failed with `error`; the
    launcher's verdict names it. Does nothing unless the launcher above started the run."""
    directory = os.environ.get(STOP_DIR_ENV)
    if not directory or not Path(directory).is_dir():
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cause = " ".join(f"{type(error).__name__}: {error}".split())[:500]
    final = Path(directory) / f"{local_rank}.failed"
    partial = final.with_suffix(".partial")
    partial.write_text(json.dumps({"step": step, "local_rank": local_rank, "cause": cause}))
    partial.replace(final)


def read_failed_stops(directory: Path) -> list[dict]:
    """The failed saves this node's workers reported, by local rank."""
    return [json.loads(path.read_text()) for path in sorted(directory.glob("*.failed"))]


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
    failed = read_failed_stops(directory)
    if failed:
        first = failed[0]
        ranks = sorted(marker["local_rank"] for marker in failed)
        return 128 + signum, (
            f"{PREFIX}: {name}: the checkpoint save of step {first['step']} failed on local "
            f"workers {ranks}: {first['cause']}. Not a timeout; the newest complete checkpoint "
            f"is kept: resume from it. Exit status {128 + signum}")
    if local_workers is None:
        who = "no local worker reported a saved checkpoint"
    else:
        absent = sorted(set(range(local_workers)) - reported)
        who = f"local workers {absent} of {local_workers} reported no saved checkpoint"
    return 128 + signum, (
        f"{PREFIX}: {name}: {who} before torchrun stopped them (it kills them after "
        f"--shutdown-timeout seconds, default 30: raise it, and SLURM's KillWait, above the "
        f"save time); resume from the newest complete checkpoint. Exit status {128 + signum}")


def check_counts(args: argparse.Namespace) -> None:
    """Refuse the counts of torchrun's parsed `args` that torchrun stops on with a bare
    AssertionError or ValueError, or waits on until its rendezvous times out (a static
    --node-rank outside --nnodes). Raises InputError naming the flag, the value and what it
    accepts."""
    import torch

    from token_objectives.tables.errors import InputError

    nproc = args.nproc_per_node
    named = ("auto", "cpu", "gpu", "xpu", torch._C._get_privateuse1_backend_name())
    if nproc not in named and _integer(nproc) < 1:
        raise InputError(f"--nproc-per-node {nproc}: pass an integer >= 1 (the workers of this "
                         f"node, e.g. its GPUs) or one of {', '.join(named[:4])}")
    bounds = [_integer(part) for part in args.nnodes.split(":")]
    low, high = bounds[0], bounds[-1]
    if len(bounds) > 2 or not 1 <= low <= high:
        raise InputError(f"--nnodes {args.nnodes}: pass N or MIN:MAX with 1 <= MIN <= MAX (the "
                         f"nodes of the job, e.g. --nnodes 2)")
    if args.max_restarts < 0:
        raise InputError(f"--max-restarts {args.max_restarts}: pass 0 or more (the restarts of "
                         f"the worker group before the job fails; default 0)")
    if not (math.isfinite(args.monitor_interval) and args.monitor_interval > 0):
        raise InputError(f"--monitor-interval {args.monitor_interval}: pass a positive number of "
                         f"seconds (default 0.1)")
    if args.shutdown_timeout is not None and args.shutdown_timeout < 0:
        raise InputError(f"--shutdown-timeout {args.shutdown_timeout}: pass 0 or more seconds "
                         f"(default 30)")
    # Only the static rendezvous reads --node-rank; its world is --nnodes's MAX nodes.
    static = args.rdzv_backend == "static" and not args.standalone
    if args.node_rank < 0 or (static and args.node_rank >= high):
        raise InputError(f"--node-rank {args.node_rank}: pass 0 to --nnodes - 1 (here "
                         f"{high - 1}), this node's rank, e.g. $SLURM_NODEID")


def _integer(text: str) -> int:
    """`text` as an integer; 0, which no count accepts, when it is none."""
    try:
        return int(text)
    except ValueError:
        return 0


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main
    from torch.distributed.run import parse_args

    from token_objectives.tables.errors import InputError

    argv = sys.argv[1:] if argv is None else argv
    try:
        check_counts(parse_args(argv))
    except InputError as error:
        print(f"{PREFIX}: error: {error}", file=sys.stderr, flush=True)
        return 2
    directory = Path(tempfile.mkdtemp(prefix="token-objectives-stop-"))
    os.environ[STOP_DIR_ENV] = str(directory)  # the workers inherit it
    try:
        torchrun_main(argv)
        return 0
    except SignalException as stopped:
        status, line = stop_status(directory, int(stopped.sigval))
        print(line, file=sys.stderr, flush=True)
        return status
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
