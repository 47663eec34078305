"""Scripted clips of the demo generator's shapes with hard cuts between scenes.

`write_scene_video` writes the recorded-analysis test clip (three 10-s scenes: a red circle,
two blue squares, three yellow triangles, drifting slowly) used by tests/test_recorded.py and
scripts/bench_recorded.py; other scene lists make other clips of the same kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from framecast.stages.sources.scene import COLOURS, draw_shape

#: the three scenes of `write_scene_video` (shape, colour, count), 10 s each by default
THREE_SCENES = (("circle", "red", 1), ("square", "blue", 2), ("triangle", "yellow", 3))


def scene_frame(t: float, shape: str, colour: str, count: int, *, size: int = 224,
                background: tuple[int, int, int] = (120, 120, 120)) -> np.ndarray:
    """One frame of a scene: `count` shapes of one colour on a plain background, drifting slowly
    to the right (t = seconds into the scene), drawn with the demo generator's helpers."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = background
    diameter = 0.2 * size
    for k in range(count):
        x = (0.2 + 0.6 * (k + 0.5) / count) * size + 0.01 * size * t  # a little motion
        y = (0.35 + 0.3 * (k % 2)) * size
        draw_shape(img, shape, COLOURS[colour], (x, y), diameter)
    return img  # [H, W, 3] RGB


def write_scene_video(path: Path, scenes=THREE_SCENES, *, scene_s: float | Sequence[float] = 10.0,
                      fps: int = 5, size: int = 224) -> Path:
    """An h264 MP4 of consecutive scenes (`scene_s` seconds each, or one length per scene) with
    hard cuts between them: the recorded-analysis fixture (chapters, summary, saved sessions)."""
    import av

    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=fps)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        s.codec_context.options = {"preset": "ultrafast"}
        lengths = [scene_s] * len(scenes) if isinstance(scene_s, (int, float)) else list(scene_s)
        for (shape, colour, count), seconds in zip(scenes, lengths):
            for i in range(int(round(seconds * fps))):
                img = scene_frame(i / fps, shape, colour, count, size=size)
                for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path
