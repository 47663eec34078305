"""What the visual outputs show about a stream, gathered from the events that pass by.

The terminal panel, the preview window and the report all show the same few things: the newest
narration, the partial text being generated, the last answer, and a heads-up line (stream state,
fps, drops, first-token ms, cache tokens). `StreamState.update` reads any event (an unknown type
is ignored), so each output keeps one of these instead of its own bookkeeping.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass, field

from framecast.events import Answer, Event, Frame, Metrics, Narration, NarrationDelta, Status

#: frames over which the shown frame rate is averaged
FPS_WINDOW = 30


def clock(seconds: float | None) -> str:
    """Media time as M:SS, or H:MM:SS from one hour; `--:--` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "--:--"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


@dataclass
class StreamState:
    """The stream as the visual outputs show it. Times: `pts` in media seconds, `*_at` in
    `time.monotonic()` seconds (fading captions use them)."""

    stream_id: str = ""
    state: str = "starting"
    state_text: str = ""
    frames: int = 0
    first_pts: float | None = None
    pts: float | None = None
    duration: float | None = None  # media time where a recorded run ends (from Status)
    source_fps: float | None = None
    drops: int = 0
    narrations: int = 0
    narration: Narration | None = None
    narration_at: float = 0.0
    partial: str = ""
    partial_id: str = ""
    answer: Answer | None = None
    answer_at: float = 0.0
    first_token_ms: float | None = None
    cache_tokens: int | None = None
    started: float = field(default_factory=time.monotonic)
    _frame_times: collections.deque = field(default_factory=lambda: collections.deque(maxlen=FPS_WINDOW))

    def update(self, ev: Event) -> None:
        now = time.monotonic()
        self.stream_id = ev.stream_id or self.stream_id
        if isinstance(ev, Frame):
            self.frames += 1
            self._frame_times.append(now)
            if ev.pts is not None and math.isfinite(ev.pts):
                self.pts = ev.pts
                if self.first_pts is None:
                    self.first_pts = ev.pts
        elif isinstance(ev, NarrationDelta):
            if ev.narration_id != self.partial_id:
                self.partial, self.partial_id = "", ev.narration_id
            self.partial += ev.text
        elif isinstance(ev, Narration):
            self.narrations += 1
            self.narration, self.narration_at = ev, now
            self.partial, self.partial_id = "", ""
            self._timings(ev.first_token_ms, ev.cache_tokens)
        elif isinstance(ev, Answer):
            self.answer, self.answer_at = ev, now
            self._timings(None, ev.cache_tokens)
        elif isinstance(ev, Status):
            self.state, self.state_text = ev.state, ev.text
            if ev.duration is not None:
                self.duration = ev.duration
            if ev.fps is not None:
                self.source_fps = ev.fps
            if ev.drops is not None:
                self.drops = max(self.drops, ev.drops)
        elif isinstance(ev, Metrics):
            self.drops = max(self.drops, int(sum(m.get("drops", 0) for m in ev.stages.values())))

    def count_drops(self, handle: object) -> None:
        """Frames dropped so far on the run's edges (live input drops the oldest frame when a
        stage lags), from the stage's handle (None outside a run). Needs no `--metrics`."""
        if handle is not None:
            self.drops = max(self.drops, int(handle.frames_dropped()))

    def _timings(self, first_token_ms: float | None, cache_tokens: int | None) -> None:
        if first_token_ms is not None:
            self.first_token_ms = first_token_ms
        if cache_tokens is not None:
            self.cache_tokens = cache_tokens

    @property
    def fps(self) -> float:
        """Frames per second reaching this output, over the last `FPS_WINDOW` frames."""
        t = self._frame_times
        if len(t) >= 2 and t[-1] > t[0]:
            return (len(t) - 1) / (t[-1] - t[0])
        elapsed = time.monotonic() - self.started
        return self.frames / elapsed if elapsed > 0 and self.frames else 0.0

    @property
    def speed(self) -> float:
        """Media seconds per wall second so far (above 1 = faster than real time)."""
        elapsed = time.monotonic() - self.started
        if elapsed <= 0 or self.pts is None or self.first_pts is None:
            return 0.0
        return (self.pts - self.first_pts) / elapsed

    @property
    def fraction(self) -> float | None:
        """How far a recorded run is (0..1), or None when its length is unknown."""
        if not self.duration or self.pts is None or self.first_pts is None:
            return None
        total = max(self.duration - self.first_pts, 1e-9)
        return min(max((self.pts - self.first_pts) / total, 0.0), 1.0)

    def hud(self) -> str:
        """One heads-up line, e.g.
        `cam1: running | 0:12 | 9.8 fps | drops 0 | first token 85 ms | cache 1,204 tok`."""
        state = f"{self.stream_id}: {self.state}" if self.stream_id else self.state
        parts = [state, clock(self.pts), f"{self.fps:.1f} fps", f"drops {self.drops}"]
        if self.first_token_ms is not None:
            parts.append(f"first token {self.first_token_ms:.0f} ms")
        if self.cache_tokens is not None:
            parts.append(f"cache {self.cache_tokens:,} tok")
        return " | ".join(parts)
