"""Scene-change detector: a cheap per-frame score that marks frames changed or unchanged.

Each frame is shrunk to `size` x `size` pixels (area averaging, which also removes most
sensor noise; colour by default, because a red shape on grey has the grey's brightness and a
grey-level comparison would never see it) and compared with the *reference*: the last frame that was marked changed. The
score is the mean absolute difference in [0, 1], taken per cell of a `grid` x `grid` split and
reported for the worst cell: a whole-frame mean would dilute a small object appearing in one
corner below any useful threshold, while a cell mean still averages away pixel noise. Comparing with the last changed frame rather
than the previous frame means a slow drift (a shape creeping across, light fading) adds up
until it crosses the threshold, instead of staying under it forever.

The first frame of a stream is always changed (there is nothing to compare it with, score
1.0). Later stages use `Frame.changed` to skip re-encoding unchanged frames and to narrate on
change; a `SceneChange` event follows every changed frame, the first one included.
"""

from __future__ import annotations

from typing import AsyncIterator

import cv2
import numpy as np

from framecast.config import ChangeConfig
from framecast.events import Event, Frame, SceneChange
from framecast.runtime import Stage


def thumbnail(pixels: np.ndarray, size: int, *, colour: bool = True) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> float32 [size, size, 3] (or [size, size] grey) in [0, 1]."""
    src = pixels if colour else cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(src, (size, size), interpolation=cv2.INTER_AREA)
    return small.astype(np.float32) * (1.0 / 255.0)


class ChangeDetector(Stage):
    name = "change"

    def __init__(self, cfg: ChangeConfig, *, name: str | None = None):
        super().__init__(name=name)
        self.threshold = cfg.threshold
        self.size = cfg.size
        self.grid = min(cfg.grid, cfg.size)
        self.colour = cfg.colour
        self._reference: dict[str, np.ndarray] = {}  # per stream: thumbnail of the last changed frame
        self._seq: dict[str, int] = {}

    def score(self, frame: Frame) -> tuple[bool, float]:
        thumb = thumbnail(frame.pixels, self.size, colour=self.colour)
        ref = self._reference.get(frame.stream_id)
        if ref is None:
            self._reference[frame.stream_id] = thumb
            return True, 1.0
        diff = np.abs(thumb - ref)  # [size, size] or [size, size, 3]
        if diff.ndim == 3:
            diff = diff.mean(axis=2)
        cells = cv2.resize(diff, (self.grid, self.grid), interpolation=cv2.INTER_AREA)  # cell means
        score = float(cells.max())
        changed = score > self.threshold
        if changed:
            self._reference[frame.stream_id] = thumb
        return changed, score

    async def process(self, item: Event) -> AsyncIterator[Event]:
        if not isinstance(item, Frame):
            yield item
            return
        first = item.stream_id not in self._reference
        item.changed, score = self.score(item)
        item.change_score = round(score, 6)
        self.metrics.extra["changes"] = self.metrics.extra.get("changes", 0) + int(item.changed)
        yield item
        if item.changed:
            seq = self._seq.get(item.stream_id, 0)
            self._seq[item.stream_id] = seq + 1
            what = "first frame" if first else f"score {score:.3f}"
            yield SceneChange(score=round(score, 6), stream_id=item.stream_id, seq=seq, pts=item.pts,
                              text=f"scene change ({what})")
