"""Recorded files through PyAV, decoded in a thread.

- Media time: pts are seconds from the first frame of the video stream. Frames without a pts
  (raw H.264/HEVC elementary streams), repeated pts and pts that jump back (`cat`-joined
  MPEG-TS, a pts reset) go through `MediaClock`, so media time always moves forward: missing
  times are made up from the stream's frame rate (25 fps when it states none), a jump back is
  one warning line and a `discontinuities` count in the final status.
- Sampling by PTS: at a target fps the first frame of every 1/fps slot is kept, whatever the
  source rate (variable frame rate included); no frame is ever duplicated.
- `start`/`end` offsets in media seconds. Seeking is checked: containers without an index
  (MPEG-TS) land after the target, so a seek that lands late is retried further back (1, 2,
  4, ... s), and as a last resort the file is decoded from its start; raw streams, which have
  no timestamps to seek by, always are. Frames before `start` are decoded and skipped.
- Orientation (orientation.py): the whole display matrix is applied (rotation and mirror, all
  eight cases), the same way FFmpeg's command line autorotates, so phone videos come out upright.
- Corrupt data: packets the decoder rejects and frames it flags corrupt are skipped and counted
  (`bad_frames`); the run continues. Only a file that cannot be opened or has no video stops it.
- Truncation: a file whose frames stop more than `TRUNCATION_SLACK_S` before the *video
  stream's own* duration is reported truncated (exit 1). The container's duration is never
  used for that verdict: an audio track may be longer than the video.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass
from itertools import chain
from typing import AsyncIterator, Iterator

import av
import numpy as np

from framecast.config import SourceConfig
from framecast.errors import FatalError
from framecast.events import Error, Event
from framecast.redact import redact_url
from framecast.stages.sources.base import FALLBACK_FPS, PTS_EPS, CaptureSource, FpsGate, MediaClock, ThreadReader
from framecast.stages.sources.orientation import UPRIGHT, Orientation, frame_orientation

#: consecutive demux errors after which a file is treated as unreadable from there on
MAX_CONSECUTIVE_ERRORS = 64
#: frames may end this much before the video stream's duration before we call it truncated
TRUNCATION_SLACK_S = 1.0
#: how far before `start` a seek that landed late is retried first (s); doubles per retry
SEEK_RETRY_S = 1.0
#: seek retries before the file is decoded from its start instead
SEEK_MAX_RETRIES = 8


def _tag_seconds(text: str | None) -> float | None:
    """'HH:MM:SS.fffffffff' (Matroska's per-track DURATION tag) -> seconds."""
    m = re.fullmatch(r"\s*(\d+):(\d{1,2}):(\d{1,2}(?:\.\d*)?)\s*", text or "")
    return int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3)) if m else None


def video_duration(vs: av.video.stream.VideoStream) -> float | None:
    """The video stream's own duration (s): its header, or Matroska's per-track tag; None when
    the file does not say (never the container's, which may be an audio track's)."""
    if vs.duration and vs.time_base:
        return float(vs.duration * vs.time_base)
    meta = vs.metadata or {}
    return _tag_seconds(meta.get("DURATION") or meta.get("duration"))


@dataclass
class _Info:
    duration: float | None  # the video stream's own: truncation verdicts
    length: float | None  # best guess for progress bars (may be the container's)
    fps: float | None
    width: int
    height: int
    orientation: Orientation
    rotation: int  # degrees, for the status line
    codec: str
    timed: bool  # False: the stream has no timestamps, they are made up


@dataclass
class _Decoded:
    pixels: np.ndarray  # [H, W, 3] RGB uint8, upright
    pts: float


@dataclass
class _Bad:
    pts: float | None
    reason: str


@dataclass
class _Jump:
    pts: float  # media time given to the first frame after the jump
    before: float  # the stream's own times (s from its first frame) around the jump
    after: float


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


class FileSource(CaptureSource):
    name = "file"
    endless = False  # a file ends, paced (`source.realtime`) or not

    def __init__(self, cfg: SourceConfig, path: str, *, remote: bool = False):
        super().__init__(cfg, name="file")
        self.path = path
        self.shown = redact_url(path)  # in messages: an http(s) URL's password never leaves
        # A recorded file behind http(s)://: same semantics, but the network can stall, so
        # opening and reading get the live sources' timeouts.
        self.remote = remote
        self.live = bool(cfg.realtime)  # a paced replay behaves like a live stream
        self.info: _Info | None = None
        self._last_pts: float | None = None  # last frame emitted
        # written by the reader thread, read by the loop once the thread is done with them
        self._last_seen_pts: float | None = None  # last frame decoded
        self._step = 1.0 / FALLBACK_FPS  # one frame's duration (s)
        self._media_end: float | None = None  # where decoding ended by itself (end of file / `end`)
        self._clock: MediaClock | None = None
        self._containers: list[av.container.InputContainer] = []

    # -- the reader thread

    def _open(self) -> av.container.InputContainer:
        try:
            timeout = (self.cfg.open_timeout_s, self.cfg.watchdog_s) if self.remote else None
            container = av.open(self.path, mode="r", timeout=timeout)
        except av.error.FFmpegError as e:
            why = (None if self.remote else mp4_problem(self.path)) or _ffmpeg_reason(e)
            raise FatalError(f"{self.shown}: cannot open as video: {why}", exit_code=2) from None
        self._containers.append(container)
        if not container.streams.video:
            what = " (audio only)" if container.streams.audio else ""
            raise FatalError(f"{self.shown}: no video stream{what}", exit_code=2)
        vs = container.streams.video[0]
        vs.thread_type = "AUTO"
        return container

    def _frames(self, container: av.container.InputContainer, stop: threading.Event) -> Iterator[object]:
        """Decoded frames (av.VideoFrame) in presentation order and _Bad items, from wherever
        the container stands."""
        vs = container.streams.video[0]
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
                yield from packet.decode()
            except av.error.FFmpegError as e:
                yield _Bad(None, _ffmpeg_reason(e))

    def _seek(self, container: av.container.InputContainer, target: float, stop: threading.Event
              ) -> tuple[av.container.InputContainer, Iterator[object]]:
        """Position at or before `target` (raw stream seconds) and check where we landed: the
        first frame decoded after a seek must not be later than the target. Containers without
        an index (MPEG-TS) land on the next keyframe instead, so a late landing is retried
        further back, and the file is decoded from its start as a last resort. Returns the
        container to read and its frames, the landing frame first."""
        vs = container.streams.video[0]
        tb = float(vs.time_base)
        back = 0.0
        for _ in range(SEEK_MAX_RETRIES):
            pos = target - back
            if pos <= 0:
                break
            try:
                container.seek(math.floor(pos / tb), stream=vs, backward=True)
            except av.error.FFmpegError:
                break
            frames = self._frames(container, stop)
            first = next((f for f in frames if not isinstance(f, _Bad)), None)
            if first is None or first.pts is None:
                break  # nothing, or nothing to check the landing by
            if float(first.pts * tb) <= target + PTS_EPS:
                return container, chain([first], frames)
            back = SEEK_RETRY_S if back == 0 else back * 2
        fresh = self._open()  # from the start: always right, only slower
        return fresh, self._frames(fresh, stop)

    def _decode(self, stop: threading.Event) -> Iterator[object]:
        """Runs in the reader thread: open, then yield _Info, _Decoded, _Bad and _Jump items."""
        try:
            yield from self._decode_all(stop)
        finally:
            for c in self._containers:
                c.close()

    def _decode_all(self, stop: threading.Event) -> Iterator[object]:
        container = self._open()
        vs = container.streams.video[0]
        tb = float(vs.time_base) if vs.time_base else 1e-6
        frames = self._frames(container, stop)
        # The first frame fixes the origin of media time, the orientation and the size.
        first = None
        for item in frames:
            if isinstance(item, _Bad):
                yield item
                continue
            first = item
            break
        if first is None:
            return
        timed = first.pts is not None
        origin = float(first.pts * tb) if timed else 0.0
        # One frame's duration, for made-up times. An elementary stream's rate is the one in its
        # bitstream (the codec's): the raw demuxer reports its own 25 fps default as the average.
        rates = (vs.average_rate, vs.guessed_rate, vs.base_rate) if timed else \
            (vs.codec_context.framerate, vs.guessed_rate, vs.average_rate)
        rate = next((float(r) for r in rates if r), None)
        self._step = 1.0 / rate if rate else 1.0 / FALLBACK_FPS
        orient = frame_orientation(first)
        w, h = (first.height, first.width) if orient.transpose else (first.width, first.height)
        rotation = int(getattr(first, "rotation", 0) or 0)
        whole = container.duration / 1e6 if container.duration else None  # every stream's, the longest
        duration = video_duration(vs)
        if duration is None and len(container.streams.video) == 1 and not container.streams.audio:
            duration = whole  # nothing else in the file: the container's duration is the video's
        yield _Info(duration, duration or whole, rate, w, h, orient, rotation,
                    vs.codec_context.name, timed)

        fps, start, end = self.cfg.fps, self.cfg.start, self.cfg.end
        pending: Iterator[object] = chain([first], frames)
        if start > 0 and timed:  # raw streams have no timestamps to seek by: decode from the start
            container, pending = self._seek(container, origin + start, stop)
        clock = self._clock = MediaClock(self._step, origin=origin)
        gate = FpsGate(fps, origin=start)
        jumps = 0
        for frame in pending:
            if stop.is_set():
                return
            if isinstance(frame, _Bad):
                yield frame
                continue
            t = clock.time(float(frame.pts * tb) if frame.pts is not None else None)
            if clock.discontinuities > jumps:
                jumps = clock.discontinuities
                before, after = clock.last_jump
                yield _Jump(t, before - origin, after - origin)
            self._last_seen_pts = t
            if t + PTS_EPS < start:  # decoded only to reach `start` (damage there is not ours)
                continue
            if end is not None and t >= end - PTS_EPS:
                self._media_end = end
                return
            if frame.is_corrupt:
                yield _Bad(t, "corrupt frame")
                continue
            if not gate.accept(t):
                yield "skipped"
                continue
            yield _Decoded(orient.apply(frame.to_ndarray(format="rgb24")), t)
        if not stop.is_set() and self._last_seen_pts is not None:
            self._media_end = self._last_seen_pts + self._step  # the end of the last frame

    # -- the event loop side

    def end_pts(self, *, by_limit: bool) -> float | None:
        if by_limit and self._last_pts is not None:  # max_frames: the last frame's own span
            return round(self._last_pts + max(self._step, 1.0 / self.cfg.fps if self.cfg.fps else 0.0), 6)
        return None if self._media_end is None else round(self._media_end, 6)

    async def capture(self) -> AsyncIterator[Event]:
        reader = ThreadReader(self._decode, live=False, name=f"pyav:{self.shown}").start()
        bad_reasons: list[str] = []
        try:
            while not self.stopping.is_set():
                wait = self.cfg.open_timeout_s + self.cfg.watchdog_s if self.remote else None
                try:
                    item = await reader.get(timeout=wait, stop=self.stopping)
                except EOFError:
                    break
                except TimeoutError:
                    raise FatalError(f"{self.shown}: no data for {wait:g} s", exit_code=1) from None
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
                elif isinstance(item, _Jump):
                    self.count("discontinuities")
                    if self.metrics.extra["discontinuities"] == 1:  # one line; the final status counts them
                        warn = Error(text=f"{self.shown}: time jumps back at {item.pts:.2f} s (pts {item.after:.2f} s "
                                     f"after {item.before:.2f} s); media time carries on", stage=self.name,
                                     stream_id=self.stream_id, pts=item.pts)
                        if self.handle is not None:
                            self.handle.report(warn)
                        yield warn
                elif isinstance(item, _Info):
                    self.info = item
                    yield self._running_status(item)
        finally:
            reader.stop()
        if self._clock is not None and self._clock.made_up:
            self.metrics.extra["made_up_pts"] = self._clock.made_up
        for ev in self._warnings(bad_reasons):
            yield ev

    def _running_status(self, info: _Info) -> Event:
        o = info.orientation
        how = []
        if o != UPRIGHT:
            how.append(f"rotated {info.rotation % 360}°" if not o.mirrored else "mirrored")
        if not info.timed:
            how.append(f"no timestamps (made up at {1 / self._step:g} fps)")
        dur = f"{info.length:.2f} s" if info.length else "unknown length"
        # `duration` = media time where this run will end (progress bars use it)
        until = min(info.length, self.cfg.end or math.inf) if info.length else self.cfg.end
        return self.make_status("running", f"{self.shown}: {info.codec} {info.width}x{info.height}, {dur}"
                                + "".join(f", {x}" for x in how), fps=info.fps, duration=until)

    def _warnings(self, bad_reasons: list[str]) -> list[Event]:
        """Non-fatal problems, reported once at the end (the run continued past them)."""
        out: list[Event] = []
        bad = int(self.metrics.extra.get("bad_frames", 0))
        if bad:
            out.append(Error(text=f"{self.shown}: skipped {bad} bad packets/frames ({'; '.join(bad_reasons)})",
                             stage=self.name, stream_id=self.stream_id, pts=self._last_pts))
        info = self.info
        if info is None and not self.stopping.is_set():
            why = f" ({'; '.join(bad_reasons)})" if bad_reasons else ""
            raise FatalError(f"{self.shown}: no decodable video frames{why}", exit_code=2)
        last = self._last_seen_pts
        if (self._last_pts is None and self.cfg.start > 0 and last is not None and self._media_end is not None
                and not self.stopping.is_set()):
            raise FatalError(f"{self.shown}: source.start = {self.cfg.start:g} s is past the end of the video "
                             f"({self._media_end:.2f} s)", exit_code=2)
        # Only reached when decoding ended by itself (max_frames closes this generator first).
        # The verdict uses the video stream's own duration: an audio track may run longer.
        expected = min(info.duration, self.cfg.end or math.inf) if info and info.duration else None
        if (expected is not None and not self.stopping.is_set() and last is not None
                and last + TRUNCATION_SLACK_S < expected):
            # The run reached the end of what there is, but a recording that stops early is
            # an error for whoever relies on it: exit non-zero (everything decoded is kept).
            out.append(Error(text=f"{self.shown}: truncated: video ends at {last:.2f} s of "
                             f"{info.duration:.2f} s", stage=self.name, stream_id=self.stream_id, pts=last,
                             fatal=True))
        for err in out:
            if self.handle is not None:
                self.handle.report(err)
        return out
