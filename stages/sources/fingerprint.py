"""Source fingerprints: what ties a saved session to the video it watched.

A saved session (`--save-session`) holds a KV cache built from one video's frames. Cached
multimodal state must never be reused silently for a different clip whose placeholder tokens
happen to be the same (a known bug class of multimodal caches), so the archive records:

- files: the absolute path, the size in bytes, the duration the container announces and a
  SHA-256 of the first `FIRST_PACKETS` compressed video packets (the first frames, read without
  decoding: cheap, and exact for the same file wherever it was copied to);
- the demo source: its seed and size (the pictures are a pure function of those);
- live sources (cameras, network streams): the URI only (there is nothing to hash).

`mismatch(saved, current)` says in words why two fingerprints are different videos, or None.
A file that only moved (same size, duration and first frames, another path) is the same video.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from framecast.config import SourceConfig, local_path
from framecast.errors import UserError
from framecast.redact import redact_url

FIRST_PACKETS = 10
DURATION_TOL_S = 0.01


def _file_fingerprint(path: str) -> dict[str, Any]:
    import av

    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    h = hashlib.sha256()
    n = 0
    try:
        with av.open(path, mode="r") as container:
            if not container.streams.video:
                raise UserError(f"{path}: no video stream")
            vs = container.streams.video[0]
            duration = None
            if vs.duration and vs.time_base:
                duration = float(vs.duration * vs.time_base)
            elif container.duration:
                duration = container.duration / 1e6
            for packet in container.demux(vs):
                if packet.size == 0:
                    continue  # the demuxer's flush packet
                h.update(bytes(packet))
                n += 1
                if n >= FIRST_PACKETS:
                    break
    except av.error.FFmpegError as e:
        raise UserError(f"{path}: cannot open as video: {e}") from None
    return {"kind": "file", "path": os.path.abspath(path), "size": os.path.getsize(path),
            "duration": round(duration, 3) if duration is not None else None,
            "first_frames_sha256": h.hexdigest(), "frames_hashed": n}


def fingerprint(uri: str, cfg: SourceConfig | None = None) -> dict[str, Any]:
    """The fingerprint of a source URI (see the module docstring). Raises UserError for a file
    that cannot be read."""
    from framecast.stages.sources import source_kind

    kind = source_kind(uri)
    if kind == "file":
        path = local_path(uri)
        return _file_fingerprint(path)
    if kind == "demo":
        cfg = cfg or SourceConfig()
        return {"kind": "demo", "seed": cfg.seed, "width": cfg.width, "height": cfg.height}
    return {"kind": kind, "uri": redact_url(uri)}  # saved sessions never hold a password


def describe(fp: dict[str, Any]) -> str:
    """A short human form, e.g. `/data/talk.mp4 (1,234,567 bytes, 63.00 s)`."""
    if fp.get("kind") == "file":
        dur = f", {fp['duration']:.2f} s" if fp.get("duration") is not None else ""
        return f"{fp['path']} ({fp['size']:,} bytes{dur})"
    if fp.get("kind") == "demo":
        return f"demo (seed {fp.get('seed')}, {fp.get('width')}x{fp.get('height')})"
    return str(fp.get("uri", fp.get("kind", "?")))


def mismatch(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Why `current` is not the video `saved` was made from (one phrase), or None when it is."""
    if saved.get("kind") != current.get("kind"):
        return f"a {saved.get('kind')} source, not a {current.get('kind')} one"
    if saved.get("kind") == "file":
        why = []
        if saved.get("size") != current.get("size"):
            why.append("size differs")
        d0, d1 = saved.get("duration"), current.get("duration")
        if (d0 is None) != (d1 is None) or (d0 is not None and abs(d0 - d1) > DURATION_TOL_S):
            why.append("duration differs")
        if saved.get("first_frames_sha256") != current.get("first_frames_sha256"):
            why.append("first frames differ")
        return ", ".join(why) or None
    if saved.get("kind") == "demo":
        diff = [k for k in ("seed", "width", "height") if saved.get(k) != current.get(k)]
        return ", ".join(f"{k} differs" for k in diff) or None
    return None if saved.get("uri") == current.get("uri") else "another URI"
