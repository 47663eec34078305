"""Capture stages. `make_source(cfg.source)` picks one from the URI:

- `demo`                               synthetic shapes (stages/sources/scene.py), seeded
- `camera:N`, `/dev/videoN`            a local camera through OpenCV (watchdog + reconnect)
- `rtsp://`, `rtsps://`, `rtmp://`, `http(s)://`, `udp://`, `tcp://`, `srt://`
                                       a network stream through PyAV (watchdog + reconnect)
- anything else                        a recorded file through PyAV (`file://` accepted)
- `http(s)://…/name.mp4` (a file extension of a recording) is read as a recorded file:
  nothing dropped, a progress bar, but with the network timeouts

Bad input fails here, before anything starts, with one line naming it (exit status 2).
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

from framecast.config import SOURCE_NETWORK_SCHEMES, SourceConfig, local_path
from framecast.errors import UserError
from framecast.stages.sources.base import CaptureSource

RECORDING_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".wmv", ".mpg", ".mpeg")
NETWORK_SCHEMES = SOURCE_NETWORK_SCHEMES
_CAMERA = re.compile(r"^camera:(\d+|/.+)$")
_DEVICE = re.compile(r"^/dev/video\d+$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

__all__ = ["CaptureSource", "NETWORK_SCHEMES", "make_source", "source_kind"]


def source_kind(uri: str) -> str:
    """'demo' | 'camera' | 'stream' | 'file' (raises UserError for an unsupported scheme)."""
    if uri == "demo":
        return "demo"
    if _CAMERA.match(uri) or _DEVICE.match(uri):
        return "camera"
    m = _SCHEME.match(uri)
    if m:
        scheme = m.group(1).lower()
        if scheme in NETWORK_SCHEMES:
            return "stream"
        if scheme == "file":
            return "file"
        raise UserError(f"{uri}: unsupported source scheme '{scheme}://' "
                        f"(use demo, a file, camera:N or {', '.join(s + '://' for s in NETWORK_SCHEMES)})")
    if uri.startswith("camera:"):
        raise UserError(f"{uri}: camera sources are camera:N (a device index) or camera:/path, e.g. camera:0")
    return "file"


def _file_path(uri: str) -> str:
    path = local_path(uri)
    if not os.path.exists(path):
        head, sep, tail = path.rpartition("#")
        if sep and os.path.isfile(head):  # `URI#id` with --stream-id: the URI was taken whole
            raise UserError(f"{path}: no such file ({head} exists: '#{tail}' names a stream only when no "
                            "--stream-id is given)")
        raise UserError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory, not a video file")
    if os.path.getsize(path) == 0:
        raise UserError(f"{path}: empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise UserError(f"{path}: permission denied")
    return path


def make_source(cfg: SourceConfig) -> CaptureSource:
    kind = source_kind(cfg.uri)
    if kind == "demo":
        from framecast.stages.sources.demo import DemoSource

        return DemoSource(cfg)
    if kind == "camera":
        from framecast.stages.sources.live import CameraSource

        return CameraSource(cfg)
    if kind == "stream":
        parts = urlsplit(cfg.uri)
        if parts.scheme.lower() in ("http", "https") and parts.path.lower().endswith(RECORDING_EXTENSIONS):
            from framecast.stages.sources.file import FileSource

            return FileSource(cfg, cfg.uri, remote=True)
        from framecast.stages.sources.live import StreamSource

        return StreamSource(cfg)
    from framecast.stages.sources.file import FileSource

    return FileSource(cfg, _file_path(cfg.uri))
