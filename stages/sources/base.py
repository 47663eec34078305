"""What every capture source shares: frame/status numbering, max_frames, pacing, and a thread
bridge so blocking libraries (PyAV, OpenCV) never block the event loop.

A capture source implements `capture()`, an async generator of Frame/Status events;
`CaptureSource.frames()` wraps it with the start/end Status events, `max_frames` and the
`stopping` flag, and counts what the source saw in `metrics.extra` (frames, bad_frames,
reconnects, skipped_by_fps, discontinuities, made_up_pts, ...), which `--metrics` prints.
`MediaClock` turns a container's timestamps (missing, repeated, jumping back) into media time
that only ever goes forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import queue
import threading
import time
from typing import Any, AsyncIterator, Callable, Iterator

import numpy as np

from framecast.config import SourceConfig
from framecast.events import Event, Frame, Status, plural
from framecast.redact import redact_url
from framecast.runtime import Source

#: how often a blocked reader thread re-checks its stop flag (s)
THREAD_POLL_S = 0.1
#: items a reader thread may run ahead of the event loop
DEFAULT_BRIDGE_SIZE = 4
#: how often a source waiting on its reader thread looks at its stop flag (s)
STOP_POLL_S = 0.1
#: timestamps closer than this are equal (container time bases round)
PTS_EPS = 1e-6
#: frame rate assumed for a stream that states none (FFmpeg's own default for raw streams)
FALLBACK_FPS = 25.0


class _End:
    """Marks the end of a reader thread's items (carries its exception, if any)."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


class ThreadReader:
    """Runs a blocking iterator in a daemon thread and hands its items to the event loop.

    `live=False`: the thread blocks when the loop is behind (backpressure, nothing lost).
    `live=True`: the thread never blocks; the oldest queued item is dropped instead (counted in
    `drops`) so a slow consumer cannot make a network/camera buffer overflow.
    `stop()` only sets a flag: a thread stuck inside a library is abandoned, never joined
    (daemon), so shutdown and reconnects never hang on it.
    """

    def __init__(self, make_iter: Callable[[threading.Event], Iterator[Any]], *, live: bool,
                 maxsize: int = DEFAULT_BRIDGE_SIZE, name: str = "reader"):
        self._make_iter = make_iter
        self._live = live
        self._q: queue.Queue = queue.Queue(maxsize=maxsize)
        self._stop = threading.Event()
        self.drops = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "ThreadReader":
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._thread.start()
        return self

    def _notify(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop may be gone at shutdown
            self._loop.call_soon_threadsafe(self._ready.set)

    def stop(self) -> None:
        self._stop.set()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=THREAD_POLL_S)
                self._notify()
                return True
            except queue.Full:
                if self._live and not isinstance(item, _End):
                    with contextlib.suppress(queue.Empty):
                        self._q.get_nowait()
                        self.drops += 1
        return False

    def _run(self) -> None:
        try:
            for item in self._make_iter(self._stop):
                if self._stop.is_set() or not self._put(item):
                    return
        except BaseException as e:  # handed to the loop, which decides what it means
            self._put(_End(e))
            return
        self._put(_End())

    async def get(self, timeout: float | None = None, *, stop: asyncio.Event | None = None) -> Any:
        """The next item. Raises `EOFError` at the end (or as soon as `stop` is set: a source
        blocked on a hung library still stops promptly), re-raises the thread's exception, and
        `TimeoutError` when nothing came within `timeout` seconds (the watchdog's signal)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                if stop is not None and stop.is_set():
                    raise EOFError from None
                self._ready.clear()
                if not self._q.empty():  # an item landed between the two checks
                    continue
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError from None
                # Wake up for a new item, the deadline, or (every STOP_POLL_S) to look at `stop`.
                wait = STOP_POLL_S if remaining is None else min(remaining, STOP_POLL_S)
                try:
                    await asyncio.wait_for(self._ready.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                continue
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                raise EOFError
            return item


class FpsGate:
    """Sampling by timestamp: keeps the first frame of every 1/fps slot counted from `origin`,
    so variable frame rates sample evenly and no frame is ever duplicated. fps None = all."""

    def __init__(self, fps: float | None, *, origin: float = 0.0):
        self.fps, self.origin = fps, origin
        self.next_slot = -math.inf

    def accept(self, t: float) -> bool:
        if not self.fps:
            return True
        if t + PTS_EPS < self.next_slot:
            return False
        self.next_slot = self.origin + (math.floor((t - self.origin) * self.fps + PTS_EPS) + 1) / self.fps
        return True


class MediaClock:
    """Media time (s) from a stream's raw timestamps, never going backwards.

    `time(raw)` maps a frame's raw pts (seconds in the stream's own clock, or None) to media
    time counted from `origin`:
    - a frame without a pts is one frame duration (`step`) after the previous one, so a raw
      H.264/HEVC elementary stream gets `n * step` from frame order;
    - a repeated pts (equal to the previous one) is moved one `step` on;
    - a pts that goes back (a pts reset, `cat`-joined MPEG-TS files, a wrapped counter) is a
      *discontinuity*: media time carries on one `step` after the previous frame and the
      offset is kept, so the frames after the jump keep their spacing.
    Counters: `made_up` (missing or repeated pts), `discontinuities` (jumps back), and
    `last_jump` = (raw pts before, raw pts after) of the latest jump.
    """

    def __init__(self, step: float, *, origin: float = 0.0):
        self.step = step if step > 0 else 1.0 / FALLBACK_FPS
        self.origin = origin
        self.offset = 0.0  # added to raw - origin; grows at every discontinuity
        self.last: float | None = None  # media time of the previous frame
        self.last_raw: float | None = None
        self.made_up = 0
        self.discontinuities = 0
        self.last_jump: tuple[float, float] | None = None

    def time(self, raw: float | None) -> float:
        if self.last is None:  # the first frame
            t = 0.0 if raw is None else raw - self.origin + self.offset
            if raw is None:
                self.made_up += 1
        elif raw is None:
            t = self.last + self.step
            self.made_up += 1
        else:
            t = raw - self.origin + self.offset
            if t <= self.last + PTS_EPS:
                if self.last_raw is not None and raw < self.last_raw - PTS_EPS:
                    self.discontinuities += 1
                    self.last_jump = (self.last_raw, raw)
                else:  # repeated (or behind made-up times): not a jump of the source's clock
                    self.made_up += 1
                t = self.last + self.step
                self.offset = t - (raw - self.origin)
        self.last = t
        if raw is not None:
            self.last_raw = raw
        return t


class CaptureSource(Source):
    """Base of the capture stages. Subclasses implement `capture()`."""

    kind = "capture"

    def __init__(self, cfg: SourceConfig, *, name: str = "source"):
        super().__init__(name=name)
        self.cfg = cfg
        self.uri = redact_url(cfg.uri)  # for messages; the real URI stays in cfg.uri
        self.stream_id = cfg.stream_id
        self._frame_seq = 0
        self._status_seq = 0
        self._pace_origin: tuple[float, float] | None = None  # (wall, pts) of the first paced frame

    @property
    def endless(self) -> bool:
        """Whether the input may never end by itself (a camera, a stream): such a source is a
        stream, not a job. A paced replay of a file (`live`) still ends with the file."""
        return bool(getattr(self, "live", False))

    # ---- helpers for subclasses

    def count(self, key: str, n: int = 1) -> None:
        self.metrics.extra[key] = self.metrics.extra.get(key, 0) + n

    def make_frame(self, pixels: np.ndarray, pts: float, *, wall_time: float | None = None) -> Frame:
        f = Frame(pixels=pixels, pts=round(float(pts), 6), stream_id=self.stream_id, seq=self._frame_seq,
                  wall_time=wall_time or time.time())
        self._frame_seq += 1
        return f

    def make_status(self, state: str, text: str = "", **kw: Any) -> Status:
        s = Status(state=state, text=text, stream_id=self.stream_id, seq=self._status_seq, **kw)
        self._status_seq += 1
        return s

    async def pace(self, pts: float) -> None:
        """Sleep until `pts` is due in wall time (realtime playback of recorded/synthetic media)."""
        now = time.monotonic()
        if self._pace_origin is None:
            self._pace_origin = (now, pts)
            return
        due = self._pace_origin[0] + (pts - self._pace_origin[1]) - now
        if due > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=due)

    # ---- the Source API

    async def capture(self) -> AsyncIterator[Event]:
        return
        yield  # pragma: no cover

    async def frames(self) -> AsyncIterator[Event]:
        limit = self.cfg.max_frames
        n = 0
        last: list[float] = []  # the last two frame pts (for a limit the source cannot place)
        gen = self.capture()
        async with contextlib.aclosing(gen):
            async for ev in gen:
                if isinstance(ev, Frame):
                    if limit is not None and n >= limit:
                        break
                    n += 1
                    self.count("frames")
                    if ev.pts is not None:
                        last = [*last[-1:], ev.pts]
                yield ev
                if self.stopping.is_set() or (limit is not None and n >= limit):
                    break
        state = "stopped" if self.stopping.is_set() else "eof"
        # An eof status carries, as its pts, the media time where the input ended (the end of
        # its last frame) when the source knows it: closing narrations and subtitles use it.
        by_limit = limit is not None and n >= limit
        end = self.end_pts(by_limit=by_limit) if state == "eof" else None
        if end is None and by_limit and last:  # reading stopped here, whatever the media's length
            end = round(last[-1] + (last[-1] - last[0] if len(last) == 2 else 0.0), 6)
        yield self.make_status(state, f"{self.uri}: {state} after {plural(n, 'frame')}", pts=end,
                               **self._final_counts())

    def end_pts(self, *, by_limit: bool) -> float | None:
        """Media time where the input ended (s), or None when unknown. `by_limit`: max_frames."""
        return None

    def _final_counts(self) -> dict[str, Any]:
        e = self.metrics.extra
        out: dict[str, Any] = {}
        if "reconnects" in e:
            out["reconnects"] = int(e["reconnects"])
        if "bad_frames" in e:
            out["bad_frames"] = int(e["bad_frames"])
        if "drops" in e or getattr(self, "live", False):
            # live input: the frames this source's reader dropped plus those dropped on the
            # graph's edges (a slow stage), 0 when none was (the final status always says)
            edges = self.handle.frames_dropped() if getattr(self, "handle", None) is not None else 0
            out["drops"] = int(e.get("drops", 0)) + int(edges)
        if "discontinuities" in e:
            out["discontinuities"] = int(e["discontinuities"])
        return out
