"""Checkpoints that are either complete or ignored, and a preemption flag for SLURM signals.

Layout under the run's checkpoint root:
    step_0000010/          a complete checkpoint (megatron-core dist_checkpointing + COMPLETE)
    step_0000020.partial/  being written, or interrupted: never loaded, removed on the next save
A save writes into `<name>.partial`, waits for every rank, writes the COMPLETE marker last, then
renames the directory; both the marker and the rename are needed for a checkpoint to count.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import torch
import torch.distributed as dist

COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"step_(\d{7})")


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def latest_complete_step(root: str | Path) -> int | None:
    """The newest step whose checkpoint is complete (marker present, not partial), or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    steps = []
    for entry in root.iterdir():
        match = _STEP_DIR.fullmatch(entry.name)
        if match and (entry / COMPLETE_MARKER).is_file():
            steps.append(int(match.group(1)))
    return max(steps, default=None)


def save(sharded_state_dict: dict, root: str | Path, step: int, keep: int = 0) -> Path:
    """Collective: every rank calls it. Returns the complete checkpoint's directory.

    keep > 0 removes all but the newest `keep` complete checkpoints once this one is complete.
    """
    from megatron.core import dist_checkpointing

    final = step_dir(root, step)
    partial = final.with_name(final.name + ".partial")
    rank = dist.get_rank()
    if rank == 0:
        for stale in Path(root).glob("step_*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            shutil.rmtree(final)
        partial.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(sharded_state_dict, str(partial))
    dist.barrier()
    if rank == 0:
        write_atomically(partial / COMPLETE_MARKER, json.dumps({"step": step}))
        os.replace(partial, final)
        if keep > 0:
            _remove_old(Path(root), keep)
    dist.barrier()
    return final


def write_atomically(path: str | Path, text: str) -> None:
    """`path` holds `text` whole or keeps what it held: written to `<path>.partial`, synced to
    disk, then renamed over `path`."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def _remove_old(root: Path, keep: int) -> None:
    complete = sorted(
        int(m.group(1)) for e in root.iterdir()
        if (m := _STEP_DIR.fullmatch(e.name)) and (e / COMPLETE_MARKER).is_file()
    )
    for old in complete[:-keep]:
        shutil.rmtree(step_dir(root, old), ignore_errors=True)


def load(sharded_state_dict: dict, root: str | Path, step: int) -> dict:
    """Collective: load a complete checkpoint into the layout of `sharded_state_dict`."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    directory = step_dir(root, step)
    if not (directory / COMPLETE_MARKER).is_file():
        raise ValueError(
            f"{directory} is not a complete checkpoint (no {COMPLETE_MARKER} marker); delete it "
            f"or resume from an earlier step"
        )
    try:
        return dist_checkpointing.load(sharded_state_dict, str(directory))
    # CheckpointException derives from BaseException, not Exception.
    except (Exception, CheckpointException) as error:
        raise ValueError(
            f"checkpoint {directory} could not be read ({type(error).__name__}: {error}); it may "
            f"be corrupt: delete it to resume from the previous complete checkpoint"
        ) from error


class PreemptionFlag:
    """Set by SIGUSR1 / SIGTERM (SLURM's warning before preemption or the time limit)."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}

    def install(self) -> PreemptionFlag:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def any_rank_received(self) -> bool:
        """Collective: True on every rank when any rank got a signal."""
        flag = torch.tensor([0 if self.received is None else 1])  # gloo carries CPU tensors
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
