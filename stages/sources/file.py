"""Recorded files through PyAV, decoded in a thread.

- Sampling by PTS: at a target fps the first frame of every 1/fps slot is kept, whatever the
  source rate (variable frame rate included); no frame is ever duplicated.
- `start`/`end` offsets in media seconds (seek, then skip to the first frame at/after start).
- Rotation metadata (the display matrix) is applied, so portrait phone videos come out upright.
- Corrupt data: packets the decoder rejects and frames it flags corrupt are skipped and counted
  (`bad_frames`); the run continues. Only a file that cannot be opened or has no video stops it.
- pts are seconds from the start of the video stream (its own start_time is subtracted).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Iterator

import av
import numpy as np

from framecast.config import SourceConfig
from framecast.errors import FatalError
from framecast.events import Error, Event
from framecast.stages.sources.base import PTS_EPS, CaptureSource, FpsGate, ThreadReader

#: consecutive demux errors after which a file is treated as unreadable from there on
MAX_CONSECUTIVE_ERRORS = 64
#: frames may end this much before the container's announced duration before we call it truncated
TRUNCATION_SLACK_S = 1.0


@dataclass
class _Info:
    duration: float | None
    fps: float | None
    width: int
    height: int
    rotation: int
    codec: str


@dataclass
class _Decoded:
    pixels: np.ndarray  # [H, W, 3] RGB uint8, upright
    pts: float


@dataclass
class _Bad:
    pts: float | None
    reason: str


def _ffmpeg_reason(e: Exception) -> str:
    msg = getattr(e, "strerror", None) or str(e)
    return str(msg).splitlines()[0] if msg else type(e).__name__


def mp4_problem(path: str) -> str | None:
    """Why an ISO-BMFF file (MP4/MOV) that FFmpeg rejected is broken, from its top-level boxes:
    cut short inside a box, or missing its `moov` index. None when the layout looks sound."""
    import os
    import struct

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 8 or head[4:8] != b"ftyp":
                return None
            pos, boxes = 0, []
            while pos + 8 <= size:
                f.seek(pos)
                n, kind = struct.unpack(">I4s", f.read(8))
                if n == 1:  # 64-bit size follows
                    n = struct.unpack(">Q", f.read(8))[0]
                elif n == 0:  # box runs to the end of the file
                    n = size - pos
                if n < 8:
                    return "corrupt box structure"
                boxes.append(kind)
                if pos + n > size:
                    name = kind.decode("latin-1")
                    return f"truncated: the file ends inside its '{name}' box ({size - pos} of {n} bytes)"
                pos += n
    except OSError:
        return None
    if b"moov" not in boxes:
        return "no 'moov' index (truncated, or still being recorded)"
    return None


def upright(pixels: np.ndarray, rotation: float) -> np.ndarray:
    """Apply a display-matrix rotation (degrees counter-clockwise, multiples of 90)."""
    k = int(round(rotation / 90)) % 4
    return np.ascontiguousarray(np.rot90(pixels, k)) if k else pixels


class FileSource(CaptureSource):
    name = "file"

    def __init__(self, cfg: SourceConfig, path: str, *, remote: bool = False):
        super().__init__(cfg, name="file")
        self.path = path
        # A recorded file behind http(s)://: same semantics, but the network can stall, so
        # opening and reading get the live sources' timeouts.
        self.remote = remote
        self.live = bool(cfg.realtime)  # a paced replay behaves like a live stream
        self.info: _Info | None = None
        self._last_pts: float | None = None  # last frame emitted
        self._last_seen_pts: float | None = None  # last frame decoded (written by the reader thread)

    def _decode(self, stop: threading.Event) -> Iterator[object]:
        """Runs in the reader thread: open, then yield _Info, _Decoded and _Bad items."""
        try:
            timeout = (self.cfg.open_timeout_s, self.cfg.watchdog_s) if self.remote else None
            container = av.open(self.path, mode="r", timeout=timeout)
        except av.error.FFmpegError as e:
            why = (None if self.remote else mp4_problem(self.path)) or _ffmpeg_reason(e)
            raise FatalError(f"{self.path}: cannot open as video: {why}", exit_code=2) from None
        with container:
            if not container.streams.video:
                what = " (audio only)" if container.streams.audio else ""
                raise FatalError(f"{self.path}: no video stream{what}", exit_code=2)
            vs = container.streams.video[0]
            vs.thread_type = "AUTO"
            tb = float(vs.time_base) if vs.time_base else 1e-6
            t0 = float(vs.start_time * tb) if vs.start_time is not None else None
            if vs.duration:
                duration = float(vs.duration * tb)
            elif container.duration:
                duration = container.duration / 1e6
            else:
                duration = None
            rate = float(vs.average_rate) if vs.average_rate else None
            rot = 0
            first_frame = True
            fps, start, end = self.cfg.fps, self.cfg.start, self.cfg.end
            if start > 0:
                # Seek to the keyframe before `start` (in the stream's time base); decoding from
                # there to `start` is what the skip below is for.
                container.seek(int(((t0 or 0.0) + start) / tb), stream=vs, backward=True)
            gate = FpsGate(fps, origin=start)
            demux = container.demux(vs)
            errors_in_row = 0
            while not stop.is_set():
                try:
                    packet = next(demux)
                    errors_in_row = 0
                except StopIteration:
                    return
                except av.error.FFmpegError as e:
                    errors_in_row += 1
                    if errors_in_row > MAX_CONSECUTIVE_ERRORS:
                        yield _Bad(None, f"unreadable from here on: {_ffmpeg_reason(e)}")
                        return
                    yield _Bad(None, _ffmpeg_reason(e))
                    demux = container.demux(vs)
                    continue
                try:
                    frames = packet.decode()
                except av.error.FFmpegError as e:
                    pts = float(packet.pts * tb) - (t0 or 0.0) if packet.pts is not None else None
                    yield _Bad(pts, _ffmpeg_reason(e))
                    continue
                for frame in frames:
                    if frame.pts is None:
                        continue
                    if t0 is None:
                        t0 = float(frame.pts * tb)
                    t = float(frame.pts * tb) - t0
                    self._last_seen_pts = t
                    if frame.is_corrupt:
                        yield _Bad(t, "corrupt frame")
                        continue
                    if first_frame:
                        rot = frame.rotation or 0
                        w, h = (frame.height, frame.width) if rot % 180 else (frame.width, frame.height)
                        yield _Info(duration, rate, w, h, rot, vs.codec_context.name)
                        first_frame = False
                    if t + PTS_EPS < start:
                        continue
                    if end is not None and t >= end - PTS_EPS:
                        return
                    if not gate.accept(t):
                        yield "skipped"
                        continue
                    yield _Decoded(upright(frame.to_ndarray(format="rgb24"), rot), t)

    async def capture(self) -> AsyncIterator[Event]:
        reader = ThreadReader(self._decode, live=False, name=f"pyav:{self.path}").start()
        bad_reasons: list[str] = []
        try:
            while not self.stopping.is_set():
                wait = self.cfg.open_timeout_s + self.cfg.watchdog_s if self.remote else None
                try:
                    item = await reader.get(timeout=wait, stop=self.stopping)
                except EOFError:
                    break
                except TimeoutError:
                    raise FatalError(f"{self.path}: no data for {wait:g} s", exit_code=1) from None
                if isinstance(item, _Decoded):
                    if self.cfg.realtime:
                        await self.pace(item.pts)
                    self._last_pts = item.pts
                    yield self.make_frame(item.pixels, item.pts)
                elif item == "skipped":
                    self.count("skipped_by_fps")
                elif isinstance(item, _Bad):
                    self.count("bad_frames")
                    if len(bad_reasons) < 3 and item.reason not in bad_reasons:
                        bad_reasons.append(item.reason)
                elif isinstance(item, _Info):
                    self.info = item
                    rot = f", rotated {item.rotation}°" if item.rotation else ""
                    dur = f"{item.duration:.2f} s" if item.duration else "unknown length"
                    # `duration` = media time where this run will end (progress bars use it)
                    until = min(item.duration, self.cfg.end or math.inf) if item.duration else self.cfg.end
                    yield self.make_status("running", f"{self.path}: {item.codec} {item.width}x{item.height}, "
                                           f"{dur}{rot}", fps=item.fps, duration=until)
        finally:
            reader.stop()
        for ev in self._warnings(bad_reasons):
            yield ev

    def _warnings(self, bad_reasons: list[str]) -> list[Event]:
        """Non-fatal problems, reported once at the end (the run continued past them)."""
        out: list[Event] = []
        bad = int(self.metrics.extra.get("bad_frames", 0))
        if bad:
            out.append(Error(text=f"{self.path}: skipped {bad} bad packets/frames ({'; '.join(bad_reasons)})",
                             stage=self.name, stream_id=self.stream_id, pts=self._last_pts))
        info = self.info
        if info is None and not self.stopping.is_set():
            why = f" ({'; '.join(bad_reasons)})" if bad_reasons else ""
            raise FatalError(f"{self.path}: no decodable video frames{why}", exit_code=2)
        # Only reached when decoding ended by itself (max_frames closes this generator first).
        last = self._last_seen_pts
        expected = min(info.duration, self.cfg.end or math.inf) if info and info.duration else None
        if (expected is not None and not self.stopping.is_set() and last is not None
                and last + TRUNCATION_SLACK_S < expected):
            # The run reached the end of what there is, but a recording that stops early is
            # an error for whoever relies on it: exit non-zero (everything decoded is kept).
            out.append(Error(text=f"{self.path}: truncated: video ends at {last:.2f} s of "
                             f"{info.duration:.2f} s", stage=self.name, stream_id=self.stream_id, pts=last,
                             fatal=True))
        for err in out:
            if self.runtime is not None:
                self.runtime.report(err)
        return out
