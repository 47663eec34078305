"""Live sources — network streams (PyAV) and cameras (OpenCV) — under a watchdog.

Both libraries can hang (a camera that stops delivering, a server that accepts and never
sends), so the watchdog lives outside them: the library runs in a reader thread, and the
event loop waits for each frame with a deadline. When no frame arrives for `watchdog_s`
seconds (or the stream ends or fails), the thread is abandoned and a new connection is made
after an exponential backoff (`backoff_initial_s`, doubling up to `backoff_max_s`). Each
attempt is counted (`reconnects`) and announced as a Status `reconnecting` event; after
`reconnect_max` consecutive attempts without a frame the run stops with a one-line error.

A first connection that fails fast (refused, no such device, not a video) is bad input and
stops the run at once; a timeout is treated like a hang and retried.

Media time (pts) counts from the first connection and keeps going across reconnects. Within a
connection the stream's own timestamps go through `MediaClock`: a pts reset or a jump back
(an encoder restart, joined segments) is one warning line and a `discontinuities` count in the
final status, and media time carries on instead of stalling until the old times come back.

Frames are sampled at `fps` (by pts) inside the reader thread, so colour conversion is only
paid for frames that are kept. The reader never blocks on a slow consumer: it drops the
oldest undelivered frame (counted as `drops`), like the runtime's live edges.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import AsyncIterator, Iterator

import numpy as np

from framecast.config import SourceConfig
from framecast.errors import FatalError
from framecast.events import Error, Event
from framecast.redact import redact_text
from framecast.stages.sources.base import FALLBACK_FPS, CaptureSource, FpsGate, MediaClock, ThreadReader

#: frames a live reader thread may hold for the loop (older ones are dropped)
LIVE_BRIDGE_SIZE = 2
#: an open that fails within this fraction of `open_timeout_s` was refused, not slow
FAST_FAIL_FRACTION = 0.5


class OpenFailed(Exception):
    """The library could not open the source (raised in the reader thread)."""


class WatchedSource(CaptureSource):
    """Reconnect loop and watchdog; subclasses implement `_read(stop)` (runs in a thread)."""

    live = True

    def __init__(self, cfg: SourceConfig, *, name: str):
        super().__init__(cfg, name=name)
        self._t_origin: float | None = None  # monotonic origin of pts: the first connection
        self._jumps = 0  # times the stream's clock went back (written by the reader thread)

    def _read(self, stop: threading.Event) -> Iterator[tuple[np.ndarray, float]]:
        """Open, then yield (rgb [H, W, 3] uint8, pts s) until the source ends; raise OpenFailed."""
        raise NotImplementedError

    def _session_pts(self) -> float:
        now = time.monotonic()
        if self._t_origin is None:
            self._t_origin = now
        return now - self._t_origin

    async def capture(self) -> AsyncIterator[Event]:
        cfg = self.cfg
        backoff = cfg.backoff_initial_s
        attempts = 0  # consecutive reconnects without a frame
        ever_connected = False
        reconnects = 0
        yield self.make_status("starting", f"{self.uri}: connecting")
        while not self.stopping.is_set():
            reader = ThreadReader(self._read, live=True, maxsize=LIVE_BRIDGE_SIZE, name=f"{self.name}:{self.uri}")
            reader.start()
            opened_at = time.monotonic()
            got_frame = False
            try:
                while not self.stopping.is_set():
                    # The first frame may take the whole open timeout before the watchdog starts.
                    wait = cfg.watchdog_s + (0 if got_frame else cfg.open_timeout_s)
                    try:
                        pixels, pts = await reader.get(timeout=wait, stop=self.stopping)
                    except TimeoutError:
                        reason = f"no frame for {wait:g} s"
                        break
                    except EOFError:
                        reason = "stream ended"
                        break
                    except OpenFailed as e:
                        fast = time.monotonic() - opened_at < cfg.open_timeout_s * FAST_FAIL_FRACTION
                        if not ever_connected and fast:
                            raise FatalError(redact_text(f"{self.uri}: {e}"), exit_code=2) from None
                        reason = str(e)
                        break
                    except Exception as e:  # the library failed mid-stream: reconnect
                        reason = f"{type(e).__name__}: {e}"
                        break
                    if self._jumps > self.metrics.extra.get("discontinuities", 0):
                        first_jump = "discontinuities" not in self.metrics.extra
                        self.metrics.extra["discontinuities"] = self._jumps
                        if first_jump:  # one line; the final status counts them all
                            warn = Error(text=f"{self.uri}: time jumps back at {pts:.2f} s; media time carries on",
                                         stage=self.name, stream_id=self.stream_id, pts=pts)
                            if self.handle is not None:
                                self.handle.report(warn)
                            yield warn
                    if not got_frame:
                        got_frame = ever_connected = True
                        attempts, backoff = 0, cfg.backoff_initial_s
                        state = "running" if reconnects == 0 else "reconnected"
                        yield self.make_status(state, f"{self.uri}: {pixels.shape[1]}x{pixels.shape[0]}",
                                               reconnects=reconnects)
                    yield self.make_frame(pixels, pts)
            finally:
                reader.stop()
                if reader.drops:
                    self.count("drops", reader.drops)
            if self.stopping.is_set():
                break
            if attempts >= cfg.reconnect_max:
                raise FatalError(f"{self.uri}: {reason}; gave up after {attempts} reconnect attempts", exit_code=1)
            attempts += 1
            reconnects += 1
            self.count("reconnects")
            yield self.make_status("reconnecting", f"{self.uri}: {reason}; reconnect {attempts}/{cfg.reconnect_max} "
                                   f"in {backoff:.2g} s", reconnects=reconnects)
            try:
                await _wait_or_stop(self, backoff)
            finally:
                backoff = min(backoff * 2, cfg.backoff_max_s)


async def _wait_or_stop(src: CaptureSource, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(src.stopping.wait(), timeout=seconds)


class StreamSource(WatchedSource):
    """rtsp:// (over TCP), http(s)://, rtmp://, udp://, tcp://, srt:// through PyAV."""

    name = "stream"

    def __init__(self, cfg: SourceConfig):
        super().__init__(cfg, name="stream")

    def _options(self) -> dict[str, str]:
        scheme = self.uri.split("://", 1)[0].lower()
        opts: dict[str, str] = {}
        if scheme in ("rtsp", "rtsps"):
            opts["rtsp_transport"] = "tcp"  # UDP loses packets behind NAT and on Wi-Fi
        if scheme in ("http", "https"):
            opts["reconnect"] = "0"  # our watchdog reconnects; ffmpeg's own retry would hide hangs
        return opts

    def _read(self, stop: threading.Event) -> Iterator[tuple[np.ndarray, float]]:
        import av

        cfg = self.cfg
        t0 = time.monotonic()
        try:
            # PyAV's own timeouts (open, read) are the first line; the watchdog is the second.
            container = av.open(self.cfg.uri, options=self._options(), timeout=(cfg.open_timeout_s, cfg.watchdog_s))
        except av.error.FFmpegError as e:
            if time.monotonic() - t0 >= cfg.open_timeout_s * 0.9:
                raise OpenFailed(f"no answer within {cfg.open_timeout_s:g} s (open timeout)") from None
            raise OpenFailed(f"cannot open stream: {getattr(e, 'strerror', None) or e}") from None
        gate = FpsGate(cfg.fps)
        with container:
            if not container.streams.video:
                raise OpenFailed("no video stream")
            vs = container.streams.video[0]
            tb = float(vs.time_base) if vs.time_base else 0.0
            rate = next((float(r) for r in (vs.average_rate, vs.guessed_rate) if r), FALLBACK_FPS)
            clock: MediaClock | None = None
            counted = 0  # this connection's jumps already added to self._jumps
            base = self._session_pts()  # pts continue across reconnects
            last = -1.0
            for packet in container.demux(vs):
                if stop.is_set():
                    return
                try:
                    frames = packet.decode()
                except av.error.FFmpegError:
                    continue  # a damaged packet on the wire: skip it, the watchdog guards hangs
                for frame in frames:
                    if frame.is_corrupt:
                        continue
                    if frame.pts is None or not tb:
                        t = self._session_pts()
                    else:
                        raw = float(frame.pts * tb)
                        if clock is None:
                            clock = MediaClock(1.0 / rate, origin=raw)
                        t = base + clock.time(raw)
                        self._jumps += clock.discontinuities - counted
                        counted = clock.discontinuities
                    # A frame without a timestamp (first frames before RTCP sync) got the clock
                    # instead; keep pts strictly increasing whatever the mix.
                    t = last = max(t, last + 1e-3)
                    if gate.accept(t):
                        yield frame.to_ndarray(format="rgb24"), t


class CameraSource(WatchedSource):
    """A local camera (`camera:N`, `/dev/videoN`, `camera:/path`) through OpenCV."""

    name = "camera"

    def __init__(self, cfg: SourceConfig):
        super().__init__(cfg, name="camera")
        spec = cfg.uri[len("camera:"):] if cfg.uri.startswith("camera:") else cfg.uri
        self.device: int | str = int(spec) if spec.isdigit() else spec

    def _read(self, stop: threading.Event) -> Iterator[tuple[np.ndarray, float]]:
        import cv2

        _quiet_opencv()
        cfg = self.cfg
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(cfg.open_timeout_s * 1000),
                  cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(cfg.watchdog_s * 1000)]
        cap = cv2.VideoCapture(self.device, cv2.CAP_ANY, params)
        try:
            if not cap.isOpened():
                what = f"device {self.device}" if isinstance(self.device, int) else self.device
                raise OpenFailed(f"cannot open camera {what} (no such device, or busy)")
            gate = FpsGate(cfg.fps)
            while not stop.is_set():
                ok, bgr = cap.read()
                if not ok or bgr is None:
                    return  # the device stopped delivering: the watchdog reconnects
                t = self._session_pts()
                if gate.accept(t):
                    yield np.ascontiguousarray(bgr[..., ::-1]), t  # BGR -> RGB [H, W, 3]
        finally:
            cap.release()


def _quiet_opencv() -> None:
    """OpenCV prints multi-line warnings for a missing camera; our one-line error says it all."""
    import cv2

    try:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    except AttributeError:  # older builds without the logging module
        pass
