"""What every file output shares: checking its path up front, opening it with a one-line error."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

from framecast.errors import FatalError, UserError


def check_output_path(path: str, what: str) -> None:
    """Refuse, before anything is written, an output path that cannot be created: its parent
    directory is missing (never created silently: a typo would scatter files) or is not a
    directory, the path is a directory, or it is not writable. Raises UserError (exit 2) with
    one line naming the path."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise UserError(f"{path}: cannot write {what} output: is a directory")
    if not parent.exists():
        raise UserError(f"{path}: cannot write {what} output: no such directory '{parent}'")
    if not parent.is_dir():
        raise UserError(f"{path}: cannot write {what} output: '{parent}' is not a directory")
    if not os.access(p if p.exists() else parent, os.W_OK):
        raise UserError(f"{path}: cannot write {what} output: permission denied")


class OutputFile:
    """A text output file whose first failed write (disk full, I/O error, a device that refuses
    data) raises one `FatalError` naming the file (the run stops: an output that can no longer
    write is fatal) and makes every later write, flush and close a quiet no-op, so the failure is
    reported once and closing the other outputs goes on."""

    def __init__(self, f: IO[str], path: str, stage: str):
        self._f, self.path, self.stage = f, path, stage
        self.failed = False

    def _fail(self, e: OSError) -> FatalError:
        self.failed = True
        try:
            self._f.close()
        except OSError:
            pass  # the buffered rest cannot be written either; the failure is already reported
        return FatalError(f"{self.path}: cannot write {self.stage} output: {e.strerror or e}")

    def write(self, text: str) -> int:
        if self.failed:
            return 0
        try:
            return self._f.write(text)
        except OSError as e:
            raise self._fail(e) from None

    def flush(self) -> None:
        if self.failed:
            return
        try:
            self._f.flush()
        except OSError as e:
            raise self._fail(e) from None

    def close(self) -> None:
        if self.failed:
            return
        try:
            self._f.close()
        except OSError as e:
            raise self._fail(e) from None

    @property
    def closed(self) -> bool:
        return self.failed or self._f.closed


def open_for_writing(path: str, stage: str) -> OutputFile:
    """Open (truncate) an output file, line buffered. A missing directory is not created.
    Writes that fail raise `FatalError` once (see `OutputFile`)."""
    try:
        f = open(Path(path), "w", encoding="utf-8", buffering=1, newline="\n")  # line buffered
    except OSError as e:
        raise FatalError(f"{path}: cannot write {stage} output: {e.strerror or e}", exit_code=2) from None
    return OutputFile(f, path, stage)
