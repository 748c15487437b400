"""`InputError`, what a bad input file, path or flag raises: the `token-objectives` CLI prints its
message as one line and exits with 2. Any other exception is a bug and keeps its traceback."""

from __future__ import annotations


class InputError(ValueError):
    """A bad input file, path or flag. The message names the file (and line) and the fix."""
