"""Start a training loop again and again without importing it again each time; its workers
may be SIGKILLed at a write point of a save.

One torchrun per start would import torch in its agent, and torch with megatron-core or
DeepSpeed again in every worker (~6 s of CPU each here); this server imports them once, then
forks the ranks of each start as torchrun starts them: RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set, each rank in its own session, the launch script run as
__main__, with TOKEN_OBJECTIVES_KILL_AT set when a kill is asked for
(`checkpointing.kill_point`). When a rank is killed the others are SIGKILLed with their process
groups (DCP's writer processes too), as when a node dies; when one fails, after FAILED_GRACE_S.
The metrics writer's appends are split in two around the write point "metrics.jsonl", so a kill
there tears the line.

Protocol: one JSON request per line on stdin, {"script", "argv", "nproc", "kill_at", "log"};
one JSON reply per line on stdout, {"exits": [per rank: exit code, or -signal], "timed_out"}.
`Launcher` is the tests' side.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import runpy
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from torchrun_helpers import WORKER_ENV, free_port

START_TIMEOUT_S = 180
# What launch/pretrain_megatron.py imports (megatron-core's pieces lazily, in Trainer).
MEGATRON_PRELOAD = [
    "token_objectives.training.megatron", "token_objectives.training.config",
    "megatron.core.dist_checkpointing", "megatron.core.distributed",
    "megatron.core.distributed.finalize_model_grads", "megatron.core.models.gpt",
    "megatron.core.optimizer", "megatron.core.optimizer_param_scheduler",
    "megatron.core.pipeline_parallel", "torch.distributed.checkpoint",
]
# What launch/pretrain_deepspeed.py imports.
DEEPSPEED_PRELOAD = ["token_objectives.training.deepspeed", "token_objectives.training.config",
                     "deepspeed", "transformers", "transformers.models.llama.modeling_llama",
                     "torch.distributed.checkpoint"]
FAILED_GRACE_S = 10  # after a rank failed (not killed), for the others to exit by themselves


class Launcher:
    """The server in a child process; `start` runs one start of the loop and waits for it."""

    def __init__(self, preload: list[str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, *preload], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env=dict(WORKER_ENV, PYTHONUNBUFFERED="1"))  # a kill loses no line

    def start(self, script: Path, argv: list[str], log: Path, nproc: int = 2,
              kill_at: str | None = None) -> list[int]:
        """The exit code of each rank (-9: SIGKILLed); their output is in `log`.rank<r>."""
        log.parent.mkdir(parents=True, exist_ok=True)
        request = {"script": str(script), "argv": argv, "nproc": nproc, "kill_at": kill_at,
                   "log": str(log)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        reply = self.process.stdout.readline()
        if not reply:
            raise AssertionError(f"the launcher died (exit {self.process.wait()})")
        reply = json.loads(reply)
        assert not reply["timed_out"], f"start timed out after {START_TIMEOUT_S} s: {log}.rank*"
        return reply["exits"]

    def run(self, script: Path, argv: list[str], log: Path,
            nproc: int = 2) -> subprocess.CompletedProcess:
        """One start, as `subprocess.run(torchrun ...)` reports it: returncode 0 when every rank
        exited 0, else the first other exit code; stdout and stderr both hold every rank's
        output, rank by rank."""
        exits = self.start(script, argv, log, nproc)
        output = "".join(path.read_text(errors="replace")
                         for path in sorted(log.parent.glob(f"{log.name}.rank*")))
        failed = [code for code in exits if code != 0]
        return subprocess.CompletedProcess([str(script), *argv], failed[0] if failed else 0,
                                           stdout=output, stderr=output)

    def close(self) -> None:
        """Between starts the server holds nothing to finish: it is killed, not asked to exit
        (DeepSpeed's and megatron-core's exit handlers take seconds)."""
        self.process.kill()
        self.process.wait()
        self.process.stdin.close()
        self.process.stdout.close()


def next_log(out: Path) -> Path:
    """A new log name for a start writing to `out`, in the folder `out`.logs beside it."""
    logs = out.parent / f"{out.name}.logs"
    return logs / f"start{len(list(logs.glob('start*.rank0')))}"


class _TornAppend:
    """An append-mode file whose write is split in two around the "metrics.jsonl" point."""

    def __init__(self, handle) -> None:
        self.handle = handle

    def __enter__(self) -> _TornAppend:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()

    def write(self, text: str) -> int:
        from token_objectives.training.checkpointing import kill_point

        half = len(text) // 2
        self.handle.write(text[:half])
        self.handle.flush()
        kill_point("metrics.jsonl")
        return half + self.handle.write(text[half:])


def _tear_metrics_appends() -> None:
    from token_objectives.training import metrics

    def torn_open(file, mode="r", *args, **kwargs):
        handle = open(file, mode, *args, **kwargs)  # noqa: SIM115 (closed by _TornAppend)
        return _TornAppend(handle) if mode.startswith("a") else handle

    metrics.open = torn_open  # metrics.py's own name `open` only


def _worker(script: str, argv: list[str], rank: int, nproc: int, port: int,
            kill_at: str | None, log: str) -> None:
    """A forked rank: never returns."""
    code = 1
    try:
        os.setsid()
        output = os.open(f"{log}.rank{rank}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                          LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        os.environ.pop("TOKEN_OBJECTIVES_KILL_AT", None)
        if kill_at:
            os.environ["TOKEN_OBJECTIVES_KILL_AT"] = kill_at
        sys.argv = [script, *argv]
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    except BaseException:  # noqa: BLE001 (reported in the log, then the exit code)
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _kill_groups(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def _start(script: str, argv: list[str], nproc: int, kill_at: str | None, log: str) -> dict:
    port = free_port()
    sys.stdout.flush()
    pids = []
    for rank in range(nproc):
        pid = os.fork()
        if pid == 0:
            _worker(script, argv, rank, nproc, port, kill_at, log)
        pids.append(pid)
    exits: dict[int, int] = {}
    deadline = time.monotonic() + START_TIMEOUT_S
    grace_end = None
    timed_out = False
    while len(exits) < nproc:
        for pid in pids:
            if pid not in exits:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    exits[pid] = os.waitstatus_to_exitcode(status)
                    if exits[pid] > 0 and grace_end is None:  # the others may report it too
                        grace_end = time.monotonic() + FAILED_GRACE_S
        now = time.monotonic()
        timed_out = now > deadline
        if timed_out or any(code < 0 for code in exits.values()) or (
                grace_end is not None and now > grace_end):
            _kill_groups(pids)
        time.sleep(0.02)
    _kill_groups(pids)  # a killed rank's writer processes
    return {"exits": [exits[pid] for pid in pids], "timed_out": timed_out}


def serve(preload: list[str]) -> None:
    # The replies get stdout to themselves: what the imports print goes to stderr.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for name in preload:
        importlib.import_module(name)
    _tear_metrics_appends()
    for line in sys.stdin:
        request = json.loads(line)
        replies.write(json.dumps(_start(**request)) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve(sys.argv[1:])
