"""What every file output shares: opening its file with a one-line error."""

from __future__ import annotations

from pathlib import Path
from typing import IO

from framecast.errors import FatalError


def open_for_writing(path: str, stage: str) -> IO[str]:
    try:
        p = Path(path)
        if p.parent and not p.parent.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
        return open(p, "w", encoding="utf-8", buffering=1, newline="\n")  # line buffered
    except OSError as e:
        raise FatalError(f"{path}: cannot write {stage} output: {e.strerror or e}", exit_code=2) from None


# ---------------------------------------------------------------- JSONL
