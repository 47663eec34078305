"""Real encoded media for the capture tests, written with PyAV (no mocks of video libraries).

Every frame carries its index as the grey level of a marker block (`index_of` reads it back),
so a test can tell exactly which source frames a capture stage delivered.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

MARK = 16  # marker block side (pixels), top-left


def index_frame(i: int, width: int = 64, height: int = 48) -> np.ndarray:
    img = np.full((height, width, 3), 30, np.uint8)
    img[:MARK, :MARK] = 20 + 6 * (i % 39)
    img[-8:, -8:] = 250  # a bright corner: shows the orientation
    return img  # [H, W, 3] RGB


def index_of(frame: np.ndarray) -> int:
    return int(round((float(frame[2:MARK - 2, 2:MARK - 2].mean()) - 20) / 6))


def write_video(path: Path, n: int = 30, *, fps: int = 10, width: int = 64, height: int = 48,
                codec: str = "libx264", pts_s: list[float] | None = None, rotation: int | None = None,
                matrix: list[int] | None = None, faststart: bool = False, gop: int = 10,
                audio_s: float | None = None, fmt: str | None = None) -> Path:
    """An MP4 (or whatever `path`'s suffix or `fmt` says: .mkv, .ts, .avi, .h264, .hevc) of `n`
    index frames. `pts_s` gives VFR times (repeat one for repeated pts); `rotation` or a whole
    display `matrix` (9 int32, FFmpeg layout) sets the orientation; `audio_s` adds that many
    seconds of AAC after the video stream."""
    opts = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format=fmt, options=opts) as out:
        s = out.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.codec_context.gop_size = gop
        if codec == "libx264":
            s.codec_context.options = {"preset": "ultrafast", "tune": "zerolatency"}
        if pts_s is not None:
            s.codec_context.time_base = Fraction(1, 1000)
        if codec == "libx265":
            s.codec_context.options = {"preset": "ultrafast", "x265-params": "log-level=error"}
        if rotation is not None:
            s.set_display_rotation(rotation)
        if matrix is not None:
            s.set_display_matrix(matrix)
        a = out.add_stream("aac", rate=16000) if audio_s else None
        if a is not None:
            a.layout = "mono"
            _write_tone(out, a, audio_s)
        for i in range(n):
            f = av.VideoFrame.from_ndarray(index_frame(i, width, height), format="rgb24")
            if pts_s is not None:
                f.pts, f.time_base = int(round(pts_s[i] * 1000)), Fraction(1, 1000)
            for p in s.encode(f):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path


def _write_tone(out, s, seconds: float) -> None:
    samples = int(16000 * seconds)
    t = np.arange(samples, dtype=np.float32) / 16000
    pcm = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
    for k in range(0, samples, 1024):
        f = av.AudioFrame.from_ndarray(pcm[:, k:k + 1024], format="fltp", layout="mono")
        f.sample_rate = 16000
        f.pts = k
        for p in s.encode(f):
            out.mux(p)
    for p in s.encode():
        out.mux(p)


def write_audio_only(path: Path, seconds: float = 0.5) -> Path:
    with av.open(str(path), "w") as out:
        s = out.add_stream("aac", rate=16000)
        s.layout = "mono"
        _write_tone(out, s, seconds)
    return path


def corner_of(img: np.ndarray) -> str:
    """Where the bright marker (bottom-right as stored) is in a frame: 'tl', 'tr', 'bl' or 'br'."""
    h, w = img.shape[:2]
    corners = {"tl": img[:4, :4], "tr": img[:4, w - 4:], "bl": img[h - 4:, :4], "br": img[h - 4:, w - 4:]}
    bright = [k for k, v in corners.items() if v.min() > 200]
    assert len(bright) == 1, {k: int(v.mean()) for k, v in corners.items()}
    return bright[0]


def flip_bytes(src: Path, dst: Path, *, every: int = 997, span: int = 8) -> Path:
    """Corrupt the media data (not the headers): invert `span` bytes every `every` bytes of the
    middle of the file, like a damaged disk or a lossy link would."""
    data = bytearray(src.read_bytes())
    lo, hi = len(data) // 4, len(data) * 3 // 4
    mdat, moov = data.find(b"mdat"), data.find(b"moov")
    if mdat >= 0 and moov > mdat:  # MP4 with the index at the end: stay inside the media data
        lo, hi = max(lo, mdat + 64), min(hi, moov - 64)
    for k in range(lo, hi, every):
        data[k:k + span] = bytes(b ^ 0xFF for b in data[k:k + span])
    dst.write_bytes(bytes(data))
    return dst


# the recorded-analysis clip (three scenes with hard cuts) lives in the package, for scripts too
from framecast.stages.sources.clips import THREE_SCENES, scene_frame, write_scene_video  # noqa: E402,F401
