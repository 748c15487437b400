"""Checkpoints that are either complete or ignored, and a preemption flag for SLURM signals.

Layout under the run's checkpoint root:
    step_0000010/          a complete checkpoint (megatron-core dist_checkpointing + COMPLETE)
    step_0000020.partial/  being written, or interrupted: never loaded, removed on the next save
    step_0000030.corrupt/  failed its manifest check on a resume: kept for inspection, not loaded
A save writes into `<name>.partial`, waits for every rank, writes MANIFEST.json (size and sha256
of every file), then the COMPLETE marker last, then renames the directory; the marker and the
rename are needed for a checkpoint to count, and a resume loads it only when every file matches
the manifest. The DeepSpeed loop writes and checks the same manifest in each tag directory.

The manifest covers every file of its directory: a file it does not list (other than the manifest,
the marker and the leftovers of an interrupted write, `LEFTOVERS`) or a listed file that is missing
makes the checkpoint corrupt, as a changed byte does. Leftovers are never listed, and writing a
manifest removes them.

`kill_point` is a fault-injection hook for tests: each write of a save calls it with the write's
name, and it SIGKILLs the process where TOKEN_OBJECTIVES_KILL_AT names that write.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

COMPLETE_MARKER = "COMPLETE"
MANIFEST = "MANIFEST.json"
CORRUPT_POLICIES = ("fallback", "stop")
STEP_DIR = re.compile(r"step_(\d{7})")
_CHUNK = 1 << 22
# What an interrupted write leaves: `write_atomically`'s <name>.partial, DCP's .metadata.tmp.
LEFTOVERS = ("*.partial", "*.metadata.tmp")
KILL_AT = "TOKEN_OBJECTIVES_KILL_AT"
_PROBE_BYTES = 1 << 20
_reached: dict[str, int] = {}


class CorruptCheckpointError(ValueError):
    """A checkpoint that is marked complete but whose files do not match its manifest."""


class CheckpointSaveError(OSError):
    """A save that failed while writing; the previous checkpoint is kept."""


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def latest_complete_step(root: str | Path, below: int | None = None) -> int | None:
    """The newest step (< `below` if given) whose checkpoint is complete (marker present, not
    partial), or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    steps = []
    for entry in root.iterdir():
        match = STEP_DIR.fullmatch(entry.name)
        if match and (entry / COMPLETE_MARKER).is_file():
            steps.append(int(match.group(1)))
    return max((s for s in steps if below is None or s < below), default=None)


def save(sharded_state_dict: dict, root: str | Path, step: int, keep: int = 0,
         extra_files: dict[str, str] | None = None) -> Path:
    """Collective: every rank calls it. Returns the complete checkpoint's directory.

    extra_files: {name: text} that rank 0 writes beside the shards before the manifest, so that
    the manifest covers them (the run's `run_stamp` as run.json).

    keep > 0 removes all but the newest `keep` complete checkpoints once this one is complete.
    A write that fails on any rank (a full disk, ...) removes the partial directory, keeps every
    earlier checkpoint and raises CheckpointSaveError on every rank.
    """
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    root = Path(root)
    final = step_dir(root, step)
    partial = final.with_name(final.name + ".partial")
    rank = dist.get_rank()
    error: BaseException | None = None
    if rank == 0:
        try:
            for stale in root.glob("step_*.partial"):
                shutil.rmtree(stale, ignore_errors=True)
            partial.mkdir(parents=True)
        except OSError as caught:
            error = caught
    if not any_rank_failed(error):
        try:
            dist_checkpointing.save(sharded_state_dict, str(partial))
            # DCP's forked writer processes wrote this rank's files: a kill inside them leaves
            # the same directory, without its marker, as a kill here.
            kill_point("shards")
        # CheckpointException derives from BaseException, not Exception.
        except (Exception, CheckpointException) as caught:
            error = disk_cause(caught, partial)
    if not any_rank_failed(error):
        try:
            if rank == 0:
                for name, text in (extra_files or {}).items():
                    write_atomically(partial / name, text)
            write_manifest(partial)  # collective: every rank hashes a share
        except OSError as caught:
            error = caught
    if not any_rank_failed(error) and rank == 0:
        try:
            write_atomically(partial / COMPLETE_MARKER, json.dumps({"step": step}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
        except OSError as caught:
            error = caught
    if any_rank_failed(error):
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        previous = latest_complete_step(root)
        kept = step_dir(root, previous) if previous is not None else None
        raise CheckpointSaveError(save_failure(final, error, kept)) from error
    if rank == 0 and keep > 0:
        _remove_old(root, keep)
    dist.barrier()
    return final


def any_rank_failed(error: BaseException | None, device: torch.device | str = "cpu") -> bool:
    """Collective: True on every rank when any rank caught an error (a tensor on `device`: gloo
    carries CPU tensors, NCCL CUDA ones)."""
    flag = torch.tensor([0 if error is None else 1], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def save_failure(path: Path, error: BaseException | None, kept: Path | None) -> str:
    """The message of a failed save to `path`: the cause (ENOSPC: with the free space of the
    mount) and the checkpoint that is kept."""
    found = _os_error(error)
    if found is not None and found.errno == errno.ENOSPC:
        mount = mount_point(path)
        cause = (f"no space left on device ({shutil.disk_usage(mount).free} bytes free on "
                 f"{mount})")
    elif error is None:
        cause = "it failed on another rank"
    else:
        cause = f"{type(error).__name__}: {error}"
    previous = (f"the previous checkpoint {kept} is kept" if kept is not None
                else "there is no earlier checkpoint")
    return (f"checkpoint save to {path} failed: {cause}; its partial directory is removed and "
            f"{previous}")


def _os_error(error: BaseException | None) -> OSError | None:
    """The first OSError in `error`, its causes and (DCP's CheckpointException) its failures."""
    seen = set()
    pending = [error]
    while pending:
        item = pending.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, OSError) and item.errno is not None:
            return item
        pending += [item.__cause__, item.__context__]
        # DCP's CheckpointException: `failures` maps a rank to (exception, traceback).
        for failure in getattr(item, "failures", {}).values():
            pending += list(failure) if isinstance(failure, tuple) else [failure]
    if error is not None and "No space left on device" in str(error):
        return OSError(errno.ENOSPC, "No space left on device")
    return None


def disk_cause(error: BaseException, directory: Path) -> BaseException:
    """`error`, or, when it carries no errno, the full disk (ENOSPC) or quota (EDQUOT) that a
    write of our own into `directory` (1 MiB, synced, then removed) runs into: that OSError,
    with `error` as its cause.

    NOTE: a shard that DCP's forked writer fails to write on a full disk comes back as the
    text "[enforce fail at inline_container.cc:672] . unexpected pos": the ENOSPC behind it
    stayed in that process. The disk is still full when it is probed, before the cleanup.
    """
    if _os_error(error) is not None:
        return error
    probe = Path(directory) / ".disk-probe.partial"
    try:
        with open(probe, "wb") as handle:
            handle.write(bytes(_PROBE_BYTES))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as found:
        if found.errno not in (errno.ENOSPC, errno.EDQUOT):
            return error
        found.__cause__ = error
        return found
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return error


def mount_point(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


# ------------------------------------------------------------------ the manifest


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_leftover(name: str) -> bool:
    """Whether a file named `name` is what an interrupted write leaves (`LEFTOVERS`)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in LEFTOVERS)


def _manifest_files(directory: Path) -> list[str]:
    """The files a manifest covers: every file below `directory` (relative POSIX paths, sorted)
    except the manifest itself, the COMPLETE marker and the leftovers of interrupted writes."""
    return [path.relative_to(directory).as_posix() for path in sorted(directory.rglob("*"))
            if path.is_file() and not is_leftover(path.name)
            and path.relative_to(directory).as_posix() not in (MANIFEST, COMPLETE_MARKER)]


def _remove_leftovers(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file() and is_leftover(path.name):
            path.unlink()


def _share(sizes: dict[str, int], rank: int, world: int) -> list[str]:
    """This rank's files to hash: largest first, each to the rank with the fewest bytes so far,
    so that a 3B checkpoint's shards spread evenly (the same split on every rank)."""
    loads = [0] * world
    mine = []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        owner = loads.index(min(loads))
        loads[owner] += sizes[name]
        if owner == rank:
            mine.append(name)
    return mine


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _everyone(value):
    """Collective: every rank's `value`, in rank order ([value] without a process group)."""
    if not _distributed():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _from_rank0(value):
    """Collective: rank 0's `value` on every rank."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def write_manifest(directory: str | Path) -> None:
    """Collective when a process group is up: write MANIFEST.json in `directory` with the size and
    sha256 of every file below it (relative POSIX paths), except the manifest itself and the
    COMPLETE marker. Rank 0 removes the leftovers of interrupted writes (`LEFTOVERS`: a
    MANIFEST.json.partial of a killed save of the same tag) and lists the files; every rank
    hashes its share of the bytes
    (sha256 runs at ~1.8 GB/s a core, so one rank alone would spend ~25 s on a 45 GB 3B
    checkpoint); rank 0 writes the manifest. Raises OSError on every rank when any rank failed
    to read a file, or rank 0 to write the manifest."""
    directory = Path(directory)
    rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    sizes = None
    if rank == 0:
        try:
            _remove_leftovers(directory)
            sizes = {name: (directory / name).stat().st_size
                     for name in _manifest_files(directory)}
        except OSError as error:
            sizes = f"{type(error).__name__}: {error}"
    sizes = _from_rank0(sizes)
    if isinstance(sizes, str):
        raise OSError(f"cannot list {directory} for its manifest: {sizes}")
    digests, failure = {}, None
    try:
        digests = {name: _digest(directory / name) for name in _share(sizes, rank, world)}
    except OSError as error:
        failure = f"{type(error).__name__}: {error}"
    gathered = _everyone((digests, failure))
    failures = [failure for _, failure in gathered if failure is not None]
    if failures:
        raise OSError(f"cannot hash {directory} for its manifest: {failures[0]}")
    written = None
    if rank == 0:
        every = {name: digest for part, _ in gathered for name, digest in part.items()}
        files = {name: {"size": sizes[name], "sha256": every[name]} for name in sizes}
        try:
            write_atomically(directory / MANIFEST, json.dumps(
                {"format": 1, "algorithm": "sha256", "files": files}, indent=1))
        except OSError as error:
            written = error
    failed = _from_rank0(None if written is None else str(written))
    if failed is not None:
        if written is not None:
            raise written
        raise OSError(f"cannot write {directory / MANIFEST}: {failed}")


def _problem_of(directory: Path, relative: str, expected: dict, hash_it: bool) -> str | None:
    path = directory / relative
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != expected["size"]:
        return f"{path} has {size} bytes, the manifest {expected['size']}"
    if hash_it and _digest(path) != expected["sha256"]:
        return f"{path} does not match its sha256 in {MANIFEST}"
    return None


def _read_manifest(directory: Path) -> tuple[dict | None, str | None]:
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError(f"files is a {type(files).__name__}")
        return files, None
    except FileNotFoundError:
        return None, f"it has no {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return None, f"its {MANIFEST} cannot be read ({type(error).__name__}: {error})"


def manifest_problem(directory: str | Path, share: tuple[int, int] = (0, 1)) -> str | None:
    """None when every file of `directory`'s manifest is there with its size and sha256 and
    every file there is in the manifest (other than itself, the marker and `LEFTOVERS`), else
    what is wrong, naming the file (a listed one first, in the manifest's order). An entry
    naming a leftover (listed by older versions) is skipped. share=(rank, world): hash only
    that rank's share of the bytes (sizes are checked for every file)."""
    directory = Path(directory)
    files, problem = _read_manifest(directory)
    if problem is not None:
        return problem
    try:
        files = {name: entry for name, entry in files.items()
                 if not is_leftover(name.rpartition("/")[2])}
        sizes = {name: int(entry["size"]) for name, entry in files.items()}
        mine = set(_share(sizes, *share))
        for relative, expected in files.items():
            problem = _problem_of(directory, relative, expected, relative in mine)
            if problem is not None:
                return problem
        unlisted = [name for name in _manifest_files(directory) if name not in files]
        if unlisted:
            return (f"{directory / unlisted[0]} is not listed in its {MANIFEST}, so its bytes "
                    f"cannot be checked")
    except OSError as error:
        return f"it cannot be read ({type(error).__name__}: {error})"
    except (KeyError, TypeError, ValueError) as error:
        return f"its {MANIFEST} cannot be read ({type(error).__name__}: {error})"
    return None


def agreed_problem(directory: str | Path) -> str | None:
    """Collective: every rank checks its share of `directory`'s files against the manifest (each
    file's bytes are hashed once, over all ranks); every rank gets the same result, the
    lowest rank's problem when several find one."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    problems = _everyone(manifest_problem(directory, (rank, world)))
    return next((problem for problem in problems if problem is not None), None)


def check_policy(policy: str) -> None:
    if policy not in CORRUPT_POLICIES:
        raise ValueError(f"on_corrupt_checkpoint must be one of {list(CORRUPT_POLICIES)}, got "
                         f"{policy!r}")


def handle_corrupt(directory: Path, problem: str, policy: str, fallback: Path | None,
                   stop_fix: str, report: Callable[[str], object] | None = None) -> Path:
    """A corrupt checkpoint `directory`: raise CorruptCheckpointError (policy "stop"), or report
    it, move it to `<name>.corrupt` (rank 0; kept for inspection, never counted again) and return
    where it went (policy "fallback"; the caller resumes from `fallback`, None: from scratch).
    Collective under "fallback"."""
    check_policy(policy)
    head = f"checkpoint {directory} is corrupt: {problem}"
    if policy == "stop":
        raise CorruptCheckpointError(f"{head}. {stop_fix}")
    moved = directory.with_name(directory.name + ".corrupt")
    # An earlier corrupt copy of the same step is kept too: nothing is deleted here.
    suffix = 1
    while moved.exists():
        moved = directory.with_name(f"{directory.name}.corrupt.{suffix}")
        suffix += 1
    then = (f"resuming from the previous complete checkpoint {fallback}" if fallback is not None
            else "no earlier complete checkpoint: training from scratch")
    if dist.get_rank() == 0:
        os.replace(directory, moved)
        message = f"{head}; moved to {moved}; {then}"
        (report or _warn)(message)
    dist.barrier()
    return moved


def _warn(message: str) -> None:
    # stderr, not warnings.warn: launchers often run with PYTHONWARNINGS=ignore.
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def write_atomically(path: str | Path, text: str) -> None:
    """`path` holds `text` whole or keeps what it held: written to `<path>.partial`, synced to
    disk, then renamed over `path`. A kill before the rename leaves `<path>.partial` (a leftover
    that manifests skip); its write point for `kill_point` is the name of `path`."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    kill_point(path.name)
    os.replace(partial, path)


def kill_point(name: str) -> None:
    """Fault injection for tests: SIGKILL this process the n-th time it reaches the write point
    `name` when the environment has TOKEN_OBJECTIVES_KILL_AT=name:n (n = 1 without ":n").

    The points: "shards" (this rank's dist_checkpointing files are written), each
    `write_atomically` by its file name ("MANIFEST.json", "COMPLETE", "latest", ...) and each
    DeepSpeed shard by its file name, half written (checkpoint_writes). A no-op otherwise.
    """
    wanted = os.environ.get(KILL_AT)
    if not wanted:
        return
    point, _, nth = wanted.rpartition(":") if ":" in wanted else (wanted, "", "1")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)


def _remove_old(root: Path, keep: int) -> None:
    complete = sorted(
        int(m.group(1)) for e in root.iterdir()
        if (m := STEP_DIR.fullmatch(e.name)) and (e / COMPLETE_MARKER).is_file()
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
