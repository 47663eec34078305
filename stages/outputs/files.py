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


def open_for_writing(path: str, stage: str) -> IO[str]:
    """Open (truncate) an output file, line buffered. A missing directory is not created."""
    try:
        return open(Path(path), "w", encoding="utf-8", buffering=1, newline="\n")  # line buffered
    except OSError as e:
        raise FatalError(f"{path}: cannot write {stage} output: {e.strerror or e}", exit_code=2) from None
