"""Capture stages on real media: the demo scene, recorded files written with PyAV, cameras."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pipeline.config import SourceConfig
from pipeline.events import Event, Frame, Status
from pipeline.runtime import Runtime, Stage
from stages.sources import make_source
from stages.synthetic import SceneGenerator


class Collect(Stage):
    name = "collect"

    def __init__(self):
        super().__init__()
        self.seen: list[Event] = []

    async def process(self, item):
        self.seen.append(item)
        yield item

    def frames(self) -> list[Frame]:
        return [e for e in self.seen if isinstance(e, Frame)]

    def statuses(self) -> list[Status]:
        return [e for e in self.seen if isinstance(e, Status)]


def run_source(cfg: SourceConfig, **kw):
    source, sink = make_source(cfg), Collect()
    res = asyncio.run(Runtime(source, [sink], **kw).run(handle_signals=False))
    return res, sink, source


def test_demo_source_matches_generator_and_is_deterministic():
    cfg = SourceConfig(uri="demo", max_frames=12, width=64, height=48, seed=3, fps=5)
    res, sink, src = run_source(cfg)
    frames = sink.frames()
    assert res.exit_code == 0 and len(frames) == 12 and not src.live
    assert [f.seq for f in frames] == list(range(12))
    assert [f.pts for f in frames] == pytest.approx([i / 5 for i in range(12)])
    gen = SceneGenerator(seed=3, width=64, height=48, fps=5)
    assert all(np.array_equal(f.pixels, gen.frame(i)[0]) for i, f in enumerate(frames))
    assert frames[0].pixels.shape == (48, 64, 3) and frames[0].width == 64
    states = [s.state for s in sink.statuses()]
    assert states[0] == "running" and states[-1] == "eof"


def test_demo_source_realtime_pacing_is_live():
    cfg = SourceConfig(uri="demo", max_frames=6, width=32, height=32, fps=50, realtime=True)
    src = make_source(cfg)
    assert src.live
    import time

    t0 = time.monotonic()
    res, sink, _ = run_source(cfg)
    assert len(sink.frames()) + res.metrics["collect"]["drops"] == 6
    assert time.monotonic() - t0 >= 5 / 50 * 0.9
