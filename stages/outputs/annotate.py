"""Annotated video (`--annotate out.mp4`): the frames re-encoded (PyAV, H.264) with the narrations
burned in at their times, and a WebVTT file beside it (`out.vtt`) with the same cues.

Cue times follow the subtitle outputs: a narration is shown from its `pts_start` until the next
narration starts (the last one until its `pts_end`), i.e. over the span of video it describes.
That span is only known once the next narration arrives, so frames wait in memory for their
caption, at most `max_pending_mb`; past that, the oldest waiting frame is written with the
newest caption known (the caption runs a little late instead of the memory growing).
The WebVTT is written from what was actually burned in, so the two always agree.

The frames are the ones the pipeline saw: every frame of a file by default, one per slot with
`--fps`; timestamps are the frames' `pts` (variable frame rate is kept). Encoding runs on one
long-lived writer thread, so the event loop stays free; it needs no display.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import concurrent.futures
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, AsyncIterator

import numpy as np

from framecast.errors import FatalError
from framecast.events import Event, Frame, Narration, Status
from framecast.runtime import Stage
from framecast.stages.outputs.files import open_for_writing
from framecast.stages.outputs.overlay import draw_caption, even_size
from framecast.stages.outputs.subtitles import DEFAULT_LAST_CUE_S, cue_text, subtitle_time

DEFAULT_MAX_PENDING_MB = 256
#: frames handed to the writer thread and not yet encoded, at most (then the stage waits for it)
MAX_IN_FLIGHT = 8
DEFAULT_CRF = 23
DEFAULT_PRESET = "veryfast"
#: frame rate assumed for the last frame's length when the source says nothing (fps)
FALLBACK_FPS = 25.0
CONTAINERS = (".mp4", ".mov", ".mkv", ".m4v")


def vtt_beside(path: str) -> str:
    return str(Path(path).with_suffix(".vtt"))


@dataclass
class _Cue:
    start: float
    end_hint: float  # where the cue ends if no narration follows (pts_end, or start + default)
    text: str


class AnnotateOutput(Stage):
    """Writes `path` (H.264 in MP4/MOV/MKV) and `vtt_path` (default: `path` with `.vtt`)."""

    name = "annotate"

    def __init__(self, path: str, *, vtt_path: str | None = None, max_pending_mb: float = DEFAULT_MAX_PENDING_MB,
                 crf: int = DEFAULT_CRF, preset: str = DEFAULT_PRESET):
        super().__init__()
        self.path, self.vtt_path = path, vtt_path or vtt_beside(path)
        self.max_pending_bytes = int(max_pending_mb * 1024 * 1024)
        self.crf, self.preset = crf, preset
        self.frames_written = 0
        self._cues: list[_Cue] = []
        self._starts: list[float] = []
        self._pending: collections.deque[tuple[float, np.ndarray]] = collections.deque()
        self._pending_bytes = 0
        self._t0_wall: float | None = None
        self._rate: float | None = None
        self._container = None
        self._stream = None
        self._size: tuple[int, int] | None = None
        self._last_ms = -1
        self._last_t: float | None = None
        self._gap = 1.0 / FALLBACK_FPS
        self._vtt: IO[str] | None = None
        self._run: tuple[float, str] | None = None  # the caption now burned in, since when
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._in_flight: collections.deque[asyncio.Future] = collections.deque()
        self._finished = False
        self._media_end: float | None = None

    async def start(self) -> None:
        if Path(self.path).suffix.lower() not in CONTAINERS:
            raise FatalError(f"{self.path}: the annotated video must be one of {', '.join(CONTAINERS)}",
                             exit_code=2)
        self._vtt = open_for_writing(self.vtt_path, "WebVTT", self.handle)
        self._vtt.write("WEBVTT\n\n")
        self._vtt.flush()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="annotate")

    # -- captions

    def caption_at(self, t: float, *, final: bool) -> str | None:
        """The caption for media time `t` ('' = none), or None while a narration still to come
        may decide it (`final`: no more narrations will come). The last cue lasts until its
        span's end, and at least until the input ended (as the subtitle outputs do)."""
        i = bisect.bisect_right(self._starts, t) - 1
        if i + 1 < len(self._cues):  # a later cue exists: the one at or before `t` is settled
            return self._cues[i].text if i >= 0 else ""
        if not final:
            return None
        if i < 0:
            return ""
        cue = self._cues[i]
        end = max(cue.end_hint, self._media_end) if self._media_end is not None else cue.end_hint
        return cue.text if t < end else ""

    # -- events

    async def process(self, item: Event) -> AsyncIterator[Event]:
        if isinstance(item, Status):
            if item.fps:
                self._rate = item.fps
            if item.state == "eof" and item.pts is not None and math.isfinite(item.pts):
                self._media_end = item.pts  # where the input ended: the last cue lasts until then
        elif isinstance(item, Narration) and item.text.strip():
            # a missing or non-finite time, or one before the previous cue, starts where it started
            start = next((t for t in (item.pts_start, item.pts) if t is not None and math.isfinite(t)),
                         self._starts[-1] if self._starts else 0.0)
            if self._starts and start < self._starts[-1]:
                start = self._starts[-1]  # cues never go back in time
            end = (item.pts_end if item.pts_end is not None and math.isfinite(item.pts_end) and item.pts_end > start
                   else start + DEFAULT_LAST_CUE_S)
            self._cues.append(_Cue(start, end, item.text.strip()))
            self._starts.append(start)
            await self._flush(final=False)
        elif isinstance(item, Frame):
            t = item.pts
            if t is None or not math.isfinite(t):  # no media time: wall time since the first frame
                self._t0_wall = self._t0_wall if self._t0_wall is not None else item.wall_time
                t = item.wall_time - self._t0_wall
            self._pending.append((t, item.pixels))
            self._pending_bytes += item.pixels.nbytes
            await self._flush(final=False)
        yield item

    async def _flush(self, *, final: bool) -> None:
        while self._pending:
            t, pixels = self._pending[0]
            caption = self.caption_at(t, final=final)
            if caption is None:
                if self._pending_bytes <= self.max_pending_bytes:
                    return
                # over the memory bound: the newest caption, if it has started
                caption = self._cues[-1].text if self._cues and t >= self._starts[-1] else ""
            self._pending.popleft()
            self._pending_bytes -= pixels.nbytes
            # One writer thread keeps the order; the stage goes on while it encodes, and waits
            # only when MAX_IN_FLIGHT frames are queued there (backpressure, nothing dropped).
            loop = asyncio.get_running_loop()
            self._in_flight.append(loop.run_in_executor(self._pool, self._write, t, pixels, caption))
            while len(self._in_flight) > MAX_IN_FLIGHT:
                await self._in_flight.popleft()

    async def _drain(self) -> None:
        while self._in_flight:
            await self._in_flight.popleft()

    # -- the writer thread

    def _open(self, pixels: np.ndarray) -> None:
        import av

        h, w = pixels.shape[:2]
        self._size = even_size(max(w, 2), max(h, 2))
        opts = {"movflags": "+faststart"} if Path(self.path).suffix.lower() in (".mp4", ".mov", ".m4v") else {}
        try:  # its folder was checked at start, when the WebVTT beside it was opened
            self._container = av.open(self.path, "w", options=opts)
        except (OSError, av.error.FFmpegError) as e:
            raise FatalError(f"{self.path}: cannot write the annotated video: {e}", exit_code=2) from None
        rate = Fraction(self._rate or FALLBACK_FPS).limit_denominator(1001)
        s = self._container.add_stream("libx264", rate=rate)
        s.width, s.height = self._size
        s.pix_fmt = "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)  # pts in ms: variable frame rate is kept
        s.codec_context.options = {"crf": str(self.crf), "preset": self.preset}
        self._stream = s

    def _write(self, t: float, pixels: np.ndarray, caption: str) -> None:
        import av
        import cv2

        if self._container is None:
            self._open(pixels)
        ms = int(round(t * 1000))
        if ms <= self._last_ms:  # two frames in one millisecond: the later one waits a tick
            ms = self._last_ms + 1
        if self._last_t is not None and t > self._last_t:
            self._gap = t - self._last_t
        self._last_ms, self._last_t = ms, t
        w, h = self._size
        ph, pw = pixels.shape[:2]
        if 0 <= ph - h <= 1 and 0 <= pw - w <= 1:
            img = pixels[:h, :w]  # an odd side loses its last row/column
        else:  # a source that changed size mid-run: scaled to the first frame's size
            img = cv2.resize(pixels, (w, h), interpolation=cv2.INTER_AREA)
        img = np.ascontiguousarray(img[:, :, :3]) if img.ndim == 3 else np.repeat(img[:, :, None], 3, axis=2)
        if caption:
            img = img.copy()  # the frame object belongs to every stage: never draw on it
            draw_caption(img, caption)
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts, frame.time_base = ms, Fraction(1, 1000)
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames_written += 1
        self.metrics.extra["frames_written"] = self.frames_written
        self._track(t, caption)

    def _track(self, t: float, caption: str) -> None:
        """Turn runs of frames with the same caption into WebVTT cues."""
        if self._run is not None and self._run[1] == caption:
            return
        self._end_run(t)
        self._run = (t, caption)

    def _end_run(self, t: float) -> None:
        if self._run is not None and self._run[1] and self._vtt is not None:
            start, text = self._run
            end = max(t, start + 0.001)
            self._vtt.write(f"{subtitle_time(start, decimal='.')} --> {subtitle_time(end, decimal='.')}\n"
                            f"{cue_text(text, vtt=True)}\n\n")
            self._vtt.flush()
        self._run = None

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._last_t is not None:
            self._end_run(self._last_t + self._gap)
        if self._container is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            self._container = None
        if self._vtt is not None:
            self._vtt.close()
            self._vtt = None

    async def on_end(self) -> AsyncIterator[Event]:
        await self._flush(final=True)
        await self._drain()
        return
        yield  # pragma: no cover

    async def close(self) -> None:
        if self._pool is None:
            return
        loop = asyncio.get_running_loop()
        try:  # a cancelled run still writes what it has, captions as far as they are known
            await self._flush(final=True)
            await self._drain()
        finally:
            await loop.run_in_executor(self._pool, self._finish)
            self._pool.shutdown(wait=True)
            self._pool = None
