"""SRT and WebVTT cues, one per narration (Whisper's writers' conventions)."""

from __future__ import annotations

import re
from typing import IO, AsyncIterator

from framecast.events import (Event, Narration)
from framecast.runtime import Stage

from framecast.stages.outputs.files import open_for_writing

#: how long the last cue stays up when its narration has no pts_end (s)
DEFAULT_LAST_CUE_S = 2.0
MIN_CUE_S = 0.1


def subtitle_time(seconds: float, *, decimal: str) -> str:
    """HH:MM:SS,mmm (SRT) or HH:MM:SS.mmm (WebVTT); hours always present."""
    ms = max(0, int(round(seconds * 1000)))
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{decimal}{ms:03d}"


def cue_text(text: str, *, vtt: bool) -> str:
    text = text.strip().replace("\r\n", "\n").replace("-->", "->")
    text = re.sub(r"\n\s*\n+", "\n", text)  # a blank line would end the cue early
    if vtt:  # WebVTT cue text is markup: escape what would start an entity or a tag
        text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text or "..."


class SubtitleOutput(Stage):
    """SRT or WebVTT from Narration events. A cue is written once its end is known."""

    def __init__(self, path: str, *, fmt: str):
        if fmt not in ("srt", "vtt"):
            raise ValueError(f"subtitle format {fmt!r}")
        super().__init__(name=fmt)
        self.path, self.fmt = path, fmt
        self._f: IO[str] | None = None
        self._pending: Narration | None = None
        self._index = 0

    async def start(self) -> None:
        self._f = open_for_writing(self.path, self.fmt.upper())
        if self.fmt == "vtt":
            self._f.write("WEBVTT\n\n")
            self._f.flush()

    @staticmethod
    def _start_of(n: Narration) -> float:
        for t in (n.pts_start, n.pts):
            if t is not None:
                return t
        return 0.0

    def _write_cue(self, n: Narration, end: float) -> None:
        if self._f is None:
            return
        start = self._start_of(n)
        end = max(end, start + MIN_CUE_S)
        self._index += 1
        sep = "," if self.fmt == "srt" else "."
        head = f"{self._index}\n" if self.fmt == "srt" else ""
        self._f.write(f"{head}{subtitle_time(start, decimal=sep)} --> {subtitle_time(end, decimal=sep)}\n"
                      f"{cue_text(n.text, vtt=self.fmt == 'vtt')}\n\n")
        self._f.flush()
        self.metrics.extra["cues"] = self._index

    def _finish_pending(self, next_start: float | None) -> None:
        n, self._pending = self._pending, None
        if n is None:
            return
        start = self._start_of(n)
        if next_start is not None and next_start > start:
            end = next_start
        elif n.pts_end is not None and n.pts_end > start:
            end = n.pts_end
        else:
            end = start + DEFAULT_LAST_CUE_S
        self._write_cue(n, end)

    async def process(self, item: Event) -> AsyncIterator[Event]:
        if isinstance(item, Narration) and item.text.strip():
            self._finish_pending(self._start_of(item))
            self._pending = item
        yield item

    async def on_end(self) -> AsyncIterator[Event]:
        self._finish_pending(None)
        return
        yield  # pragma: no cover

    async def close(self) -> None:
        self._finish_pending(None)  # cancelled runs still get their last cue
        if self._f is not None:
            self._f.close()
            self._f = None


# ---------------------------------------------------------------- terminal
