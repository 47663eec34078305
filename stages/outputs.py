"""Outputs: the live terminal view (lines + progress bar), JSONL, SRT and WebVTT.

Every output passes every event through unchanged (an MQTT stage may come after them) and
writes as it goes, flushing per event, so a crash or a kill loses nothing already produced.

Subtitle conventions follow Whisper's writers: SRT cues numbered from 1 with
`HH:MM:SS,mmm` times (hours always, comma decimals); WebVTT with a `WEBVTT` header and
`HH:MM:SS.mmm` times; `-->` inside text becomes `->` so a cue can never be misparsed. A cue
runs from its narration's start until the next narration starts (the last one until its own
`pts_end`), because a narration describes the scene until something new is said.
"""

from __future__ import annotations

import math
import re
import sys
import time
from pathlib import Path
from typing import IO, AsyncIterator

from pipeline.config import OutputsConfig
from pipeline.errors import FatalError
from pipeline.events import (Answer, EndOfStream, Error, Event, Flush, Frame, Metrics, Narration,
                             NarrationDelta, Question, SceneChange, Status)
from pipeline.runtime import Stage

#: how long the last cue stays up when its narration has no pts_end (s)
DEFAULT_LAST_CUE_S = 2.0
MIN_CUE_S = 0.1
#: the progress bar redraws at most this often (s)
PROGRESS_INTERVAL_S = 0.1
PROGRESS_WIDTH = 28


def _open_for_writing(path: str, stage: str) -> IO[str]:
    try:
        p = Path(path)
        if p.parent and not p.parent.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
        return open(p, "w", encoding="utf-8", buffering=1, newline="\n")  # line buffered
    except OSError as e:
        raise FatalError(f"{path}: cannot write {stage} output: {e.strerror or e}", exit_code=2) from None


# ---------------------------------------------------------------- JSONL


class JsonlOutput(Stage):
    """One event envelope per line (see README), flushed per line. Frames carry no pixels."""

    name = "jsonl"

    def __init__(self, path: str, *, frames: bool = False, partials: bool = False):
        super().__init__()
        self.path, self.frames, self.partials = path, frames, partials
        self._f: IO[str] | None = None

    async def start(self) -> None:
        self._f = _open_for_writing(self.path, "JSONL")

    def write(self, ev: Event) -> None:
        if self._f is None:
            return
        if isinstance(ev, Frame) and not self.frames:
            return
        if isinstance(ev, NarrationDelta) and not self.partials:
            return
        self._f.write(ev.to_json() + "\n")
        self._f.flush()
        self.metrics.extra["lines"] = self.metrics.extra.get("lines", 0) + 1

    async def process(self, item: Event) -> AsyncIterator[Event]:
        self.write(item)
        yield item

    async def on_control(self, msg: Event) -> AsyncIterator[Event]:
        if isinstance(msg, Question):  # the record shows what was asked, next to the answer
            self.write(msg)
        yield msg

    async def on_end(self) -> AsyncIterator[Event]:
        self.write(EndOfStream(stream_id=getattr(self.runtime, "stream_id", "default"),
                               text=getattr(self.runtime, "stopped_by", "eos")))
        return
        yield  # pragma: no cover

    async def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


# ---------------------------------------------------------------- subtitles


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
        self._f = _open_for_writing(self.path, self.fmt.upper())
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


def clock(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "--:--"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class ConsoleOutput(Stage):
    """The live terminal view: narrations, answers, changes and status as lines (stdout), and a
    progress bar with ETA for recorded files (stderr). Errors are printed by the CLI itself."""

    name = "console"

    def __init__(self, *, lines: bool = True, progress: bool = False, out: IO[str] | None = None,
                 err: IO[str] | None = None):
        super().__init__()
        self.lines, self.progress = lines, progress
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self._partial = False  # a partial narration is on screen (TTY only)
        self._bar_shown = False
        self._duration: float | None = None
        self._first_pts: float | None = None
        self._pts: float | None = None
        self._frames = 0
        self._t0 = time.monotonic()
        self._last_draw = 0.0
        self._tty = bool(getattr(self.out, "isatty", lambda: False)())

    # -- lines

    def _line(self, text: str) -> None:
        self._clear_bar()
        try:
            if self._partial:
                self.out.write("\r\033[K")
                self._partial = False
            self.out.write(text + "\n")
            self.out.flush()
        except BrokenPipeError:  # `framecast run | head`: the reader left; the run goes on
            self._stdout_gone()
        self._draw_bar(force=True)

    def _stdout_gone(self) -> None:
        self.lines = False
        try:  # point the fd at /dev/null so the interpreter's final flush cannot fail either
            import os

            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, self.out.fileno())
            os.close(fd)
        except (OSError, ValueError, AttributeError):
            pass

    def _format(self, ev: Event) -> str | None:
        at = f"[{clock(ev.pts)}] " if ev.pts is not None else ""
        if isinstance(ev, Narration):
            return f"{at}{ev.text}"
        if isinstance(ev, Answer):
            a = f"error: {ev.error}" if ev.error else ev.text
            return f"Q: {ev.question}\nA: {a}" if ev.question else f"A: {a}"
        if isinstance(ev, SceneChange):
            return f"{at}{ev.text}"
        if isinstance(ev, Status):
            return f"-- {ev.state}" + (f": {ev.text}" if ev.text else "")
        return None

    # -- progress bar

    def _clear_bar(self) -> None:
        if self._bar_shown:
            self.err.write("\r\033[K")
            self.err.flush()
            self._bar_shown = False

    def bar_text(self) -> str:
        elapsed = time.monotonic() - self._t0
        fps = self._frames / elapsed if elapsed > 0 else 0.0
        if self._duration and self._pts is not None and self._first_pts is not None:
            total = max(self._duration - self._first_pts, 1e-9)
            frac = min(max((self._pts - self._first_pts) / total, 0.0), 1.0)
            eta = elapsed * (1 - frac) / frac if frac > 0 else None
            filled = int(frac * PROGRESS_WIDTH)
            return (f"[{'#' * filled}{'.' * (PROGRESS_WIDTH - filled)}] {frac * 100:3.0f}% "
                    f"{clock(self._pts)}/{clock(self._duration)} ETA {clock(eta)} {fps:.1f} fps")
        return f"{self._frames} frames {clock(self._pts)} {fps:.1f} fps"

    def _draw_bar(self, *, force: bool = False) -> None:
        if not self.progress or self._frames == 0:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < PROGRESS_INTERVAL_S:
            return
        self._last_draw = now
        self.err.write("\r\033[K" + self.bar_text())
        self.err.flush()
        self._bar_shown = True

    # -- stage

    async def process(self, item: Event) -> AsyncIterator[Event]:
        if isinstance(item, Frame):
            self._frames += 1
            self._pts = item.pts
            if self._first_pts is None:
                self._first_pts = item.pts
            self._draw_bar()
        elif isinstance(item, Status) and item.duration is not None:
            self._duration = item.duration
        if self.lines:
            if isinstance(item, NarrationDelta) and self._tty:
                self._clear_bar()
                try:
                    self.out.write(item.text)
                    self.out.flush()
                    self._partial = True
                except BrokenPipeError:
                    self._stdout_gone()
            elif not isinstance(item, (Frame, Metrics, Error, NarrationDelta)):
                text = self._format(item)
                if text is not None:
                    self._line(text)
        yield item

    async def on_control(self, msg: Event) -> AsyncIterator[Event]:
        if isinstance(msg, Flush):
            self.out.flush()
        yield msg

    async def on_end(self) -> AsyncIterator[Event]:
        if self.progress and self._frames:
            finished = getattr(self.runtime, "stopped_by", "eos") == "eos"
            if finished and self._duration is not None:
                self._pts = max(self._pts or 0.0, self._duration)  # the last frame starts before the end
            self._draw_bar(force=True)
            self.err.write("\n")
            self.err.flush()
            self._bar_shown = False
        return
        yield  # pragma: no cover

    async def close(self) -> None:
        if self._bar_shown:
            self.err.write("\n")
            self.err.flush()
            self._bar_shown = False
        self.out.flush()


def make_outputs(cfg: OutputsConfig, *, live: bool, out: IO[str] | None = None,
                 err: IO[str] | None = None) -> list[Stage]:
    """The output stages for a run. The progress bar defaults to on for recorded input when
    stderr is a terminal; `progress = true` forces it (e.g. when stderr is piped to a log)."""
    stages: list[Stage] = []
    if cfg.jsonl:
        stages.append(JsonlOutput(cfg.jsonl, frames=cfg.jsonl_frames, partials=cfg.jsonl_partials))
    if cfg.srt:
        stages.append(SubtitleOutput(cfg.srt, fmt="srt"))
    if cfg.vtt:
        stages.append(SubtitleOutput(cfg.vtt, fmt="vtt"))
    err_stream = err or sys.stderr
    progress = cfg.progress if cfg.progress is not None else (not live and err_stream.isatty())
    if cfg.console or progress:
        stages.append(ConsoleOutput(lines=cfg.console, progress=progress, out=out, err=err_stream))
    return stages
