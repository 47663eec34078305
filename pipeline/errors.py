"""User-facing errors: each carries a one-line message naming the bad input and an exit code.

The CLI prints `framecast: <message>` on stderr and exits with `exit_code`; it never shows a
traceback for these (bugs still show one).
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (file, key, value, URL, model): one line, non-zero exit."""

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message.splitlines()[0] if message else message)
        if exit_code is not None:
            self.exit_code = exit_code


class FatalError(UserError):
    """Raised inside a running graph: the run cannot continue (outputs so far are kept)."""

    exit_code = 1


class ModelLoadError(UserError):
    """A model file or directory that cannot be loaded (names the file and tensor)."""

    exit_code = 2
