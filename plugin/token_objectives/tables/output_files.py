"""The files the commands write: the check of an output path before any work, and their
permission bits (--mode), the same whatever the umask."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from token_objectives.tables.errors import InputError

# Group- and world-readable, as a shared cluster's data directories need; --mode overrides it.
DEFAULT_MODE = 0o644


def check_output_path(path: str | os.PathLike, flag: str) -> Path:
    """Before any work: the directory `path` is written into exists and is writable, and
    `path` is not a directory. Returns `path` as a Path; raises InputError."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise InputError(
            f"{flag} {path}: the directory {parent} does not exist; create it "
            f"(mkdir -p {parent}) or pass a path in an existing directory"
        )
    if path.is_dir():
        raise InputError(f"{flag} {path} is a directory; pass a file path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: the directory {parent} is not writable; pass a path "
                         f"in a directory you can write")
    return path


def add_mode_argument(parser: argparse.ArgumentParser) -> None:
    """--mode: the permission bits of the files a command writes, whatever the umask."""
    parser.add_argument("--mode", type=parse_mode, default=DEFAULT_MODE,
                        help="octal permission bits of the files written (default: 644, "
                        "readable by the group whatever the umask)")


def parse_mode(text: str) -> int:
    """An octal file mode such as 644 or 0o640 (argparse type of the --mode flags)."""
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal file mode such as 644 or 640")
    return mode


def set_mode(path: int | str | os.PathLike, mode: int = DEFAULT_MODE) -> None:
    """Give a written file (path or open descriptor) `mode` whatever the umask, so the group
    can read it by default."""
    os.chmod(path, mode)
