"""SRT and WebVTT cues, one per narration (Whisper's writers' conventions)."""

from __future__ import annotations

import math
import re
from typing import IO, AsyncIterator

from framecast.events import (Event, Narration, Status)
from framecast.runtime import Stage

from framecast.stages.outputs.files import open_for_writing

#: how long the last cue stays up when its narration has no pts_end (s)
DEFAULT_LAST_CUE_S = 2.0
MIN_CUE_S = 0.1


#: any run of dashes then '>' (also '--->', '---->'): what readers take for a timing line
_ARROW = re.compile(r"-{2,}>")
#: C0/C1 control characters other than tab (line breaks are handled before)
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")


def subtitle_time(seconds: float, *, decimal: str) -> str:
    """HH:MM:SS,mmm (SRT) or HH:MM:SS.mmm (WebVTT); hours always present. Negative and
    non-finite times (NaN, inf) are written as 0: a cue time must always parse."""
    if not math.isfinite(seconds):
        seconds = 0.0
    ms = max(0, int(round(seconds * 1000)))
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{decimal}{ms:03d}"


def cue_text(text: str, *, vtt: bool) -> str:
    """Narration text made safe as the text of one SRT/WebVTT cue: no sequence a reader takes
    for structure survives. Every kind of line break (\\n, \\r, \\r\\n, \\v, \\f, \\x1c-\\x1e,
    \\x85, U+2028, U+2029: `str.splitlines`) becomes \\n; lines are stripped and blank ones
    dropped (a blank line ends a cue); other control characters become spaces; any `-->`-like
    arrow (`--->` too) becomes `->`; WebVTT escapes `&`, `<`, `>`. Empty text becomes `...`."""
    lines = []
    for line in text.splitlines():
        line = _CONTROL.sub(" ", line).strip()
        line = _ARROW.sub("->", line)  # the match takes every dash before '>': none is left
        if line:
            lines.append(line)
    out = "\n".join(lines)
    if vtt:  # WebVTT cue text is markup: escape what would start an entity or a tag
        out = out.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return out or "..."


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
        self._last_start = 0.0  # cues go out in time order (WebVTT requires it)
        self._media_end: float | None = None  # from the eof status: the last cue lasts until then

    async def start(self) -> None:
        self._f = open_for_writing(self.path, self.fmt.upper(), self.handle)
        if self.fmt == "vtt":
            self._f.write("WEBVTT\n\n")
            self._f.flush()

    def _start_of(self, n: Narration) -> float:
        """Where a cue starts: its span's start, else its pts; a missing or non-finite time (or
        one before the previous cue) starts where the previous cue started."""
        for t in (n.pts_start, n.pts):
            if t is not None and math.isfinite(t):
                return max(t, self._last_start)
        return self._last_start

    def _write_cue(self, n: Narration, end: float) -> None:
        if self._f is None:
            return
        start = self._start_of(n)
        self._last_start = start
        end = max(end, start + MIN_CUE_S) if math.isfinite(end) else start + DEFAULT_LAST_CUE_S
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
        else:  # the last cue: until its span's end, and at least until the input ended
            ends = [t for t in (n.pts_end, self._media_end) if t is not None and math.isfinite(t) and t > start]
            end = max(ends) if ends else start + DEFAULT_LAST_CUE_S
        self._write_cue(n, end)

    async def process(self, item: Event) -> AsyncIterator[Event]:
        if isinstance(item, Status) and item.state == "eof" and item.pts is not None and math.isfinite(item.pts):
            self._media_end = item.pts  # the input ended here: the last cue covers up to it
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
