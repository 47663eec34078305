"""Scene-change detector: first frame changed, thresholds, reference = last changed frame."""

from __future__ import annotations

import asyncio

import numpy as np

from framecast.config import ChangeConfig, SourceConfig
from framecast.events import Frame, SceneChange
from framecast.runtime import Runtime, Stage
from framecast.stages.change import ChangeDetector
from framecast.stages.sources import make_source
from framecast.stages.sources.scene import SceneGenerator


def frame(pixels: np.ndarray, i: int = 0, stream: str = "default") -> Frame:
    return Frame(pixels=pixels, seq=i, pts=i / 10, stream_id=stream)


def grey(level: int, h: int = 48, w: int = 64) -> np.ndarray:
    return np.full((h, w, 3), level, np.uint8)


async def _drive(det: ChangeDetector, frames: list[Frame]) -> list:
    out = []
    for f in frames:
        async for ev in det.process(f):
            out.append(ev)
    return out


def test_first_frame_changed_identical_frames_not_and_big_change_emits_event():
    det = ChangeDetector(ChangeConfig(threshold=0.05))
    frames = [frame(grey(100), 0), frame(grey(100), 1), frame(grey(200), 2), frame(grey(200), 3)]
    out = asyncio.run(_drive(det, frames))
    assert [f.changed for f in frames] == [True, False, True, False]
    assert frames[1].change_score == 0.0 and frames[2].change_score > 0.3
    changes = [e for e in out if isinstance(e, SceneChange)]
    # issue 12: the first frame counts as changed AND emits its event (README and behaviour agree)
    assert len(changes) == 2 and changes[1].pts == frames[2].pts and changes[1].score == frames[2].change_score
    assert changes[0].pts == frames[0].pts and changes[0].score == 1.0 and "first frame" in changes[0].text
    assert [c.seq for c in changes] == [0, 1]


def test_slow_drift_adds_up_against_the_last_changed_frame():
    det = ChangeDetector(ChangeConfig(threshold=0.05, grid=1))
    frames = [frame(grey(100 + 3 * i), i) for i in range(12)]  # +3 grey levels per frame
    asyncio.run(_drive(det, frames))
    flags = [f.changed for f in frames]
    # each step is 0.012 < threshold, yet the drift triggers every ~5 frames
    assert flags[0] and sum(flags[1:]) >= 2 and not all(flags[1:])


def test_small_object_in_a_corner_is_seen_and_noise_is_not():
    rng = np.random.default_rng(0)
    base = grey(120, 224, 224)
    noisy = [np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8) for _ in range(5)]
    with_obj = noisy[-1].copy()
    with_obj[10:40, 10:40] = (220, 40, 40)  # a red square: ~2% of the frame, grey-ish brightness
    det = ChangeDetector(ChangeConfig())
    frames = [frame(p, i) for i, p in enumerate(noisy + [with_obj])]
    asyncio.run(_drive(det, frames))
    assert [f.changed for f in frames] == [True, False, False, False, False, True]
    grey_only = ChangeDetector(ChangeConfig(colour=False, grid=1))
    frames = [frame(p, i) for i, p in enumerate(noisy + [with_obj])]
    asyncio.run(_drive(grey_only, frames))
    assert not frames[-1].changed  # why the default compares colour cells


def test_streams_have_separate_references_and_events_pass_through():
    det = ChangeDetector(ChangeConfig())
    a, b = frame(grey(10), 0, "a"), frame(grey(250), 0, "b")
    asyncio.run(_drive(det, [a, b]))
    assert a.changed and b.changed  # both first of their stream


def test_detector_in_a_graph_marks_every_demo_frame_and_sees_appearances():
    class Collect(Stage):
        name = "collect"

        def __init__(self):
            super().__init__()
            self.seen = []

        async def process(self, item):
            self.seen.append(item)
            yield item

    cfg = SourceConfig(uri="demo", max_frames=120, width=160, height=160, seed=0)
    sink = Collect()
    asyncio.run(Runtime(make_source(cfg), [ChangeDetector(ChangeConfig()), sink]).run(handle_signals=False))
    frames = [e for e in sink.seen if isinstance(e, Frame)]
    assert len(frames) == 120 and all(f.changed is not None for f in frames)
    gen = SceneGenerator(seed=0, width=160, height=160, fps=10)
    appear = [i for i in range(120) if any(e.kind == "appear" for e in gen.truth(i).events)]
    assert appear and all(frames[i].changed for i in appear)
    n_changes = sum(isinstance(e, SceneChange) for e in sink.seen)
    assert n_changes == sum(f.changed for f in frames) < 120  # one event per changed frame, the first too
