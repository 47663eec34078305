"""Chapters: scene segments merged into chapters of a sensible length, titled by the model.

The change detector marks frames where the picture changed. Many of those are not new scenes
(a shape drifting across a cell, a camera pan), so a scene change ends the current chapter only
when it is also a *cut* and the chapter is old enough: the frame's colour histogram differs from
the previous frame's by at least `chapters.cut_threshold` (the share of pixels whose coarse
colour changed: motion moves pixels but keeps the histogram, a cut replaces it; classic shot
boundary detection), and the chapter is at least `chapters.min_s` seconds old (10 s by default,
YouTube's minimum chapter length). A chapter that reaches `chapters.max_s` ends at the next frame
even without a change. At the end of the input, a last piece shorter than `min_s` joins the chapter before it
(unless that would make it longer than `max_s`).

A closed chapter is held until its successor is `min_s` long (only then is it sure that the tail
will not be merged into it, and by then the narrations of its last seconds have arrived), then
titled and emitted as a `Chapter` event. The title is a text-only turn of the same model in a
fresh context (`framecast.engine.text_turns`) on `CHAPTER_TITLE_PROMPT`, from the narrations whose
midpoint lies in the chapter; a chapter nobody narrated is called "Chapter N". Without a model
(capture-only runs) every chapter is "Chapter N": scene segmentation still works, nothing is
made up.

Events in: `Frame` (pts, `changed`), `Narration`, `Status` (duration); all pass through.
Events out: `Chapter` (after the frame that made it final, and at the end of the input).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import cv2
import numpy as np

from framecast.config import ChaptersConfig
from framecast.engine.prompts import CHAPTER_TITLE_PROMPT
from framecast.engine.text_turns import LogLine, TextTurns, dedupe, narration_lines, thin
from framecast.events import Chapter, Event, Frame, Narration, Status
from framecast.stages.media_end import MediaEnd
from framecast.runtime import Stage

#: scene changes this close to `min_s` still count (frame times are rounded by the container)
EPS_S = 1e-3
HIST_SIZE = 64  # frames are shrunk to this side before their histogram is taken
HIST_BINS = 4  # per channel: coarse, so noise and compression do not move pixels between bins


def colour_histogram(pixels: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> float32 [HIST_BINS ** 3], summing to 1."""
    small = cv2.resize(pixels, (HIST_SIZE, HIST_SIZE), interpolation=cv2.INTER_AREA)
    h = cv2.calcHist([small], [0, 1, 2], None, [HIST_BINS] * 3, [0, 256] * 3).ravel()
    return h / max(float(h.sum()), 1.0)


def histogram_change(a: np.ndarray, b: np.ndarray) -> float:
    """The share of pixels (0..1) whose coarse colour differs between two histograms."""
    return 0.5 * float(np.abs(a - b).sum())


TITLE_MAX_CHARS = 80


def midpoint(n: Narration) -> float:
    """The media time a narration stands for: the middle of the span it describes."""
    start = n.pts_start if n.pts_start is not None else n.pts
    end = n.pts_end if n.pts_end is not None else n.pts
    if start is None or end is None:
        return start if start is not None else (end if end is not None else 0.0)
    return (start + end) / 2


def belongs(t: float, start: float, end: float, *, first: bool = False, last: bool = False) -> bool:
    """Whether media time `t` falls in chapter [start, end); the first chapter also takes what
    came before it and the last what came after it (nothing is left out of the log)."""
    return start <= t < end or (last and t >= end) or (first and t < start)


def clean_title(text: str) -> str:
    """First line of the reply, no quotes or final period, at most TITLE_MAX_CHARS."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = line.strip(" \"'`*#").removeprefix("Title:").strip().rstrip(".")
    if len(line) > TITLE_MAX_CHARS:
        line = line[:TITLE_MAX_CHARS].rsplit(" ", 1)[0]
    return line


@dataclass
class _Span:
    start: float
    end: float | None = None
    changes: int = 0
    narrations: list[LogLine] = field(default_factory=list)


class ChapterStage(Stage):
    name = "chapters"

    def __init__(self, cfg: ChaptersConfig | None = None, turns: TextTurns | None = None, *,
                 stream_id: str = "default"):
        super().__init__()
        self.cfg = cfg or ChaptersConfig()
        self.turns = turns
        self.stream_id = stream_id
        self._open: _Span | None = None
        self._held: list[_Span] = []
        self._end = MediaEnd()
        self._hist: np.ndarray | None = None  # colour histogram of the previous frame
        self.chapters: list[Chapter] = []
        self.title_s = 0.0

    def resume_from(self, archive) -> None:
        """Continue a saved session: its chapters come first (numbering goes on from them)."""
        self.chapters = list(archive.chapters)

    # -- segmentation -------------------------------------------------------------------------

    def _boundary(self, frame: Frame, pts: float, cut: float) -> bool:
        age = pts - self._open.start
        if self.cfg.max_s is not None and age >= self.cfg.max_s - EPS_S:
            return True
        return bool(frame.changed) and age >= self.cfg.min_s - EPS_S and cut >= self.cfg.cut_threshold

    def _on_frame(self, frame: Frame) -> None:
        pts = frame.pts
        if pts is None:
            return
        cut = 1.0  # without pixels (or with the gate off) every scene change may be a cut
        if self.cfg.cut_threshold > 0 and getattr(frame, "pixels", None) is not None and frame.pixels.ndim == 3:
            hist = colour_histogram(frame.pixels)
            cut = histogram_change(hist, self._hist) if self._hist is not None else 1.0
            self._hist = hist
        if self._open is None:
            self._open = _Span(pts)
            return
        if self._boundary(frame, pts, cut):
            self._open.end = pts
            self._held.append(self._open)
            self._open = _Span(pts)
        elif frame.changed:
            self._open.changes += 1

    def _span_of(self, t: float) -> _Span | None:
        for s in [*self._held, self._open]:
            if s is not None and s.start - EPS_S <= t and (s.end is None or t < s.end - EPS_S):
                return s
        return None

    def _on_narration(self, n: Narration) -> None:
        if not n.text.strip():
            return
        line = LogLine(n.pts_start if n.pts_start is not None else (n.pts or 0.0), n.text)
        span = self._span_of(midpoint(n))
        if span is not None:  # else: its chapter is already titled (the summary still sees it)
            span.narrations.append(line)

    # -- titles -------------------------------------------------------------------------------

    async def _title(self, span: _Span, index: int) -> str:
        lines = dedupe(span.narrations)
        if self.turns is None or not lines:
            return f"Chapter {index}"
        budget = self.cfg.prompt_tokens

        def fits(pick) -> bool:
            return self.turns.count(CHAPTER_TITLE_PROMPT.format(narrations=narration_lines(pick))) <= budget

        prompt = CHAPTER_TITLE_PROMPT.format(narrations=narration_lines(thin(lines, fits)))
        t0 = time.perf_counter()
        try:
            done = await self.turns.run(prompt, max_tokens=self.cfg.title_max_tokens)
        except Exception:  # a title is not worth losing the chapter for: counted, named plainly
            self.metrics.errors += 1
            return f"Chapter {index}"
        finally:
            self.title_s += time.perf_counter() - t0
        return clean_title(done.text) or f"Chapter {index}"

    async def _emit(self, span: _Span) -> Chapter:
        index = len(self.chapters) + 1
        title = await self._title(span, index)
        ch = Chapter(text=title, index=index, pts=span.start, pts_start=span.start, pts_end=span.end,
                     narrations=len(span.narrations), stream_id=self.stream_id, seq=index)
        self.chapters.append(ch)
        self.metrics.extra["chapters"] = len(self.chapters)
        return ch

    # -- stage --------------------------------------------------------------------------------

    async def process(self, item: Event) -> AsyncIterator[Event]:
        yield item
        if isinstance(item, Frame):
            self._on_frame(item)
            # A held chapter is final once its successor is min_s long: the tail can no longer
            # be merged into it, and its own narrations (which lag by one interval) are in.
            while self._held and self._open is not None and item.pts is not None \
                    and item.pts - self._open.start >= self.cfg.min_s - EPS_S:
                yield await self._emit(self._held.pop(0))
        elif isinstance(item, Narration):
            self._on_narration(item)
        if isinstance(item, (Frame, Status)):
            self._end.see(item)

    def end_time(self) -> float | None:
        """Where the last chapter ends: the file's end when it was read to the end, else one
        frame interval after the last frame."""
        return self._end.end(getattr(self.handle, "stopped_by", "eos"))

    async def on_end(self) -> AsyncIterator[Event]:
        if self._open is None:
            return
        end = self.end_time()
        tail, self._open = self._open, None
        tail.end = max(end, tail.start) if end is not None else tail.start
        short = tail.end - tail.start < self.cfg.min_s - EPS_S
        if short and self._held and (self.cfg.max_s is None
                                     or tail.end - self._held[-1].start <= self.cfg.max_s + EPS_S):
            last = self._held[-1]  # a short last piece joins the chapter before it
            last.end, last.changes = tail.end, last.changes + tail.changes + 1
            last.narrations.extend(tail.narrations)
        else:
            self._held.append(tail)
        while self._held:
            yield await self._emit(self._held.pop(0))
