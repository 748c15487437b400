"""DeepSpeed's `save_checkpoint` with file writes that fail without breaking the collectives.

`engine.save_checkpoint` writes each rank's files and then waits in a `dist.barrier()`. A rank
whose write raises (a full disk) leaves that barrier and the other ranks wait in it for ever,
while it waits in the next collective of its own. Inside `deferred_write_errors` a failing write
is recorded instead of raised, so every rank runs through DeepSpeed's collectives; the caller
then agrees over the process group that the save failed (`checkpointing.any_rank_failed`).

Writes go through a Python file object, so a full disk is `OSError(ENOSPC)` with its errno:
`torch.save` to a path reports it as "[enforce fail at inline_container.cc] unexpected pos".
A failure without an errno is probed (`checkpointing.disk_cause`) so a full disk is still named.
Each file is a write point of `checkpointing.kill_point` (by its name): a kill there leaves the
file cut short, its buffered tail not yet written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from token_objectives.training.checkpointing import disk_cause, kill_point


@contextlib.contextmanager
def deferred_write_errors(engine) -> Iterator[list[BaseException]]:
    """Yields the list the failed writes of this rank are appended to, first one first.

    Covers the checkpoint engine's `save` (model states, ZeRO shards) and rank 0's copy of the
    recovery scripts; after the first failure, later writes are skipped.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    errors: list[BaseException] = []
    checkpoint_engine = engine.checkpoint_engine
    original_save = checkpoint_engine.save
    original_copy = engine._copy_recovery_script

    def save(state_dict, path: str) -> None:
        if errors:
            return
        try:
            if isinstance(checkpoint_engine, TorchCheckpointEngine):
                with open(path, "wb") as handle:
                    torch.save(state_dict, handle, _use_new_zipfile_serialization=getattr(
                        checkpoint_engine, "zipfile_serialization", True))
                    kill_point(Path(path).name)
            else:
                original_save(state_dict, path)
        except Exception as caught:  # noqa: BLE001 (re-raised by the caller on every rank)
            errors.append(disk_cause(caught, Path(path).parent))

    def copy_recovery_script(save_path: str) -> None:
        if errors:
            return
        try:
            original_copy(save_path)
        except OSError as caught:
            errors.append(caught)

    checkpoint_engine.save = save
    engine._copy_recovery_script = copy_recovery_script
    try:
        yield errors
    finally:
        del checkpoint_engine.save
        del engine._copy_recovery_script
