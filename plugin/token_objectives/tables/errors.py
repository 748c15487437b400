"""What the `token-objectives` CLI reports in one line: `InputError`, what a bad input file, path
or flag raises (printed as `token-objectives COMMAND: error: ...`, exit code 2; any other
exception is a bug and keeps its traceback), and `TokenObjectivesWarning`, what concerns the user
of a run that goes on (printed as `token-objectives COMMAND: warning: ...`; a library user sees it
as a Python warning)."""

from __future__ import annotations


class InputError(ValueError):
    """A bad input file, path or flag. The message names the file (and line) and the fix."""


class TokenObjectivesWarning(UserWarning):
    """Something the user should change, that does not stop the run (a vocabulary NTL cannot fully
    use, an unsupported release). The message names the fix."""
