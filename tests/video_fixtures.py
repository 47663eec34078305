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
                faststart: bool = False, gop: int = 10) -> Path:
    """An MP4 (or whatever `path`'s suffix says) of `n` index frames; `pts_s` gives VFR times."""
    opts = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=opts) as out:
        s = out.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.codec_context.gop_size = gop
        if codec == "libx264":
            s.codec_context.options = {"preset": "ultrafast", "tune": "zerolatency"}
        if pts_s is not None:
            s.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            s.set_display_rotation(rotation)
        for i in range(n):
            f = av.VideoFrame.from_ndarray(index_frame(i, width, height), format="rgb24")
            if pts_s is not None:
                f.pts, f.time_base = int(round(pts_s[i] * 1000)), Fraction(1, 1000)
            for p in s.encode(f):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path


def write_audio_only(path: Path, seconds: float = 0.5) -> Path:
    with av.open(str(path), "w") as out:
        s = out.add_stream("aac", rate=16000)
        s.layout = "mono"
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
    return path


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
