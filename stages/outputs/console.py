"""The live terminal view.

stdout is a terminal: a `rich` live panel (`panel.RichView`) with the newest narration, the
partial text, the last answer, stream state and, for recorded input, a progress bar with ETA;
event lines scroll above it. stdout is not a terminal (pipes, CI, files): plain lines, one per
event, exactly as before rich, and the progress bar (when on) is a plain line redrawn on stderr.
Scene-change lines show only with `verbose` (they stay in JSONL and on the bus).
"""

from __future__ import annotations

import io
import os
import sys
import time
from typing import IO, AsyncIterator

from framecast.events import (Answer, Chapter, Error, Event, Flush, Frame, Metrics, Narration,
                              NarrationDelta, SceneChange, Status, Summary, plural)
from framecast.runtime import Stage
from framecast.stages.outputs.state import StreamState, clock

__all__ = ["ConsoleOutput", "clock"]

#: the plain progress bar redraws at most this often (s)
PROGRESS_INTERVAL_S = 0.1
PROGRESS_WIDTH = 28


def _isatty(f: IO[str]) -> bool:
    try:
        return bool(f.isatty())
    except (AttributeError, ValueError):
        return False


def _own_terminal(f: IO[str]) -> bool:
    """A real terminal stream of this stage's own: several streams share stdout through
    labelled writers, and several live panels on one terminal would overwrite each other, so
    those get plain (labelled) lines."""
    return isinstance(f, io.TextIOBase) and _isatty(f)


class ConsoleOutput(Stage):
    """The live terminal view: narrations, answers, status (and scene changes with `verbose`)
    on stdout; a progress bar with ETA for recorded files. Errors are printed by the CLI itself.

    `rich_view`: None = a rich panel when `out` is a terminal and `lines` is on; True/False force it.
    """

    name = "console"

    def __init__(self, *, lines: bool = True, progress: bool = False, verbose: bool = False,
                 out: IO[str] | None = None, err: IO[str] | None = None, rich_view: bool | None = None,
                 width: int | None = None):
        super().__init__()
        self.lines, self.progress, self.verbose = lines, progress, verbose
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self._tty = _isatty(self.out)
        self.state = StreamState()
        self.view = None
        if (rich_view if rich_view is not None else (lines and _own_terminal(self.out))):
            from framecast.stages.outputs.panel import RichView

            self.view = RichView(self.state, self.out, progress=progress, width=width)
        self._partial = False  # plain view: a partial narration is on screen (terminal only)
        self._bar_shown = False
        self._last_draw = 0.0

    async def start(self) -> None:
        if self.view is not None:
            self.view.start()

    # -- what a line says (both views)

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
        return None  # frames, metrics, errors (the CLI prints those), and types unknown here

    # -- plain view: lines on stdout

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
            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, self.out.fileno())
            os.close(fd)
        except (OSError, ValueError, AttributeError):
            pass

    # -- plain view: progress bar on stderr

    def _clear_bar(self) -> None:
        if self._bar_shown:
            self.err.write("\r\033[K")
            self.err.flush()
            self._bar_shown = False

    def bar_text(self) -> str:
        s = self.state
        elapsed = time.monotonic() - s.started
        fps = s.frames / elapsed if elapsed > 0 else 0.0
        said = f" {plural(s.narrations, 'narration')}" if s.narrations else ""
        frac = s.fraction
        if frac is not None:
            eta = elapsed * (1 - frac) / frac if frac > 0 else None
            filled = int(frac * PROGRESS_WIDTH)
            return (f"[{'#' * filled}{'.' * (PROGRESS_WIDTH - filled)}] {frac * 100:3.0f}% "
                    f"{clock(s.pts)}/{clock(s.duration)} ETA {clock(eta)} {fps:.1f} fps {s.speed:.1f}x{said}")
        return f"{plural(s.frames, 'frame')} {clock(s.pts)} {fps:.1f} fps {s.speed:.1f}x{said}"

    def _draw_bar(self, *, force: bool = False) -> None:
        if not self.progress or self.view is not None or self.state.frames == 0:
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
        self.state.update(item)
        if isinstance(item, Frame):
            self.state.count_drops(self.handle)
            self._draw_bar()
        if self.view is not None:
            if not isinstance(item, (Frame, Metrics, Error, NarrationDelta)):
                text = self._format(item)
                if text is not None:
                    self.view.line(text, style="bold" if isinstance(item, Narration) else "")
        elif self.lines:
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
        finished = (self.handle.stopped_by if self.handle else "eos") == "eos"
        s = self.state
        if finished and s.duration is not None and s.frames:
            s.pts = max(s.pts or 0.0, s.duration)  # the last frame starts before the end
        if self.view is not None:
            self.view.refresh()
        elif self.progress and s.frames:
            self._draw_bar(force=True)
            self.err.write("\n")
            self.err.flush()
            self._bar_shown = False
        return
        yield  # pragma: no cover

    async def close(self) -> None:
        if self.view is not None:
            self.view.stop()
        if self._bar_shown:
            self.err.write("\n")
            self.err.flush()
            self._bar_shown = False
        try:
            self.out.flush()
        except (BrokenPipeError, ValueError):
            pass
