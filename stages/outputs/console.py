"""The live terminal view: event lines and, for recorded input, a progress bar."""

from __future__ import annotations

import math
import sys
import time
from typing import IO, AsyncIterator

from framecast.events import (Answer, Chapter, Error, Event, Flush, Frame, Metrics, Narration,
                             NarrationDelta, SceneChange, Status, Summary)
from framecast.runtime import Stage


#: the progress bar redraws at most this often (s)
PROGRESS_INTERVAL_S = 0.1
PROGRESS_WIDTH = 28


def clock(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "--:--"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class ConsoleOutput(Stage):
    """The live terminal view: narrations, answers and status as lines (stdout), scene changes
    too when `verbose` (several a second on a busy scene would drown the narrations), and a
    progress bar with ETA for recorded files (stderr). Errors are printed by the CLI itself."""

    name = "console"

    def __init__(self, *, lines: bool = True, progress: bool = False, verbose: bool = False,
                 out: IO[str] | None = None, err: IO[str] | None = None):
        super().__init__()
        self.lines, self.progress, self.verbose = lines, progress, verbose
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self._partial = False  # a partial narration is on screen (TTY only)
        self._bar_shown = False
        self._duration: float | None = None
        self._first_pts: float | None = None
        self._pts: float | None = None
        self._frames = 0
        self._narrations = 0
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
            return f"{at}{ev.text}" if self.verbose else None
        if isinstance(ev, Chapter):
            return f"== chapter {ev.index} [{clock(ev.pts_start)}-{clock(ev.pts_end)}] {ev.text}"
        if isinstance(ev, Summary):
            return f"== summary: {ev.text}"
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
        # media seconds per wall second: above 1 = faster than real time
        speed = ((self._pts - self._first_pts) / elapsed if elapsed > 0 and self._pts is not None
                 and self._first_pts is not None else 0.0)
        said = f" {self._narrations} narrations" if self._narrations else ""
        if self._duration and self._pts is not None and self._first_pts is not None:
            total = max(self._duration - self._first_pts, 1e-9)
            frac = min(max((self._pts - self._first_pts) / total, 0.0), 1.0)
            eta = elapsed * (1 - frac) / frac if frac > 0 else None
            filled = int(frac * PROGRESS_WIDTH)
            return (f"[{'#' * filled}{'.' * (PROGRESS_WIDTH - filled)}] {frac * 100:3.0f}% "
                    f"{clock(self._pts)}/{clock(self._duration)} ETA {clock(eta)} {fps:.1f} fps "
                    f"{speed:.1f}x{said}")
        return f"{self._frames} frames {clock(self._pts)} {fps:.1f} fps {speed:.1f}x{said}"

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
        elif isinstance(item, Narration):
            self._narrations += 1
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
            finished = (self.handle.stopped_by if self.handle else "eos") == "eos"
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
