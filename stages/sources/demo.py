"""The `demo` source: the seeded synthetic scene (scene.py) as a video stream.

Frame i has pts = i / fps. Paced in real time (`realtime`) it behaves like a camera (a live
source: latest frame wins); unpaced it behaves like a recorded file (backpressure, nothing
lost), which is what tests and `--max-frames` runs want.
"""

from __future__ import annotations

from typing import AsyncIterator

from framecast.config import SourceConfig
from framecast.events import Event
from framecast.stages.sources.base import CaptureSource
from framecast.stages.sources.scene import SceneGenerator

DEFAULT_DEMO_FPS = 10.0


class DemoSource(CaptureSource):
    name = "demo"

    def __init__(self, cfg: SourceConfig):
        super().__init__(cfg, name="demo")
        self.fps = cfg.fps or DEFAULT_DEMO_FPS
        # Auto pacing: an endless demo is a stand-in for a camera; a bounded one is a recording.
        self.realtime = cfg.realtime if cfg.realtime is not None else (cfg.max_frames is None and cfg.duration is None)
        self.live = self.realtime
        self.generator = SceneGenerator(seed=cfg.seed, width=cfg.width, height=cfg.height, fps=self.fps)

    async def capture(self) -> AsyncIterator[Event]:
        n_total = None if self.cfg.duration is None else max(1, round(self.cfg.duration * self.fps))
        yield self.make_status("running", f"demo: synthetic shapes, seed {self.cfg.seed}, "
                               f"{self.cfg.width}x{self.cfg.height} at {self.fps:g} fps", fps=self.fps,
                               duration=self.cfg.duration)
        start = round(self.cfg.start * self.fps)
        i = start
        while (n_total is None or i < n_total) and not self.stopping.is_set():
            if self.cfg.end is not None and i / self.fps >= self.cfg.end:
                break
            pixels, _truth = self.generator.frame(i)  # [H, W, 3] RGB uint8
            if self.realtime:
                await self.pace(i / self.fps)
            yield self.make_frame(pixels, i / self.fps)
            i += 1
