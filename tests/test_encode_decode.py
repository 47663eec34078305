"""Encode and decode stages on a real runtime graph with a tiny model: unchanged frames reuse
features, micro-batching, narration policies, questions answered from the cache (no
re-encoding), MiniCPM-V 4.5 frame groups."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from framecast.testing import make_tiny_minicpmv, random_image

from framecast.config import NarrationConfig
from framecast.events import Answer, Event, Frame, Narration, NarrationDelta, Question
from framecast.runtime import Runtime, Source, Stage
from framecast.model.load import load_model
from framecast.engine.session import StreamingSession
from framecast.stages.decode import DecodeStage
from framecast.stages.encode import EncodeStage


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for version in ("2.6", "4.5"):
        d = tmp_path_factory.mktemp(f"tiny-{version}")
        make_tiny_minicpmv(d, version)
        out[version] = load_model(str(d))
    return out


class CountingModel:
    """The real model, with its encoder entry points counted (calls and images)."""

    def __init__(self, model: Any):
        self._model = model
        self.image_calls: list[int] = []
        self.group_calls: list[list[int]] = []

    def encode_images(self, images, **kw):
        self.image_calls.append(len(images))
        return self._model.encode_images(images, **kw)

    def encode_frame_group(self, images, temporal_ids, **kw):
        self.group_calls.append(list(temporal_ids))
        return self._model.encode_frame_group(images, temporal_ids, **kw)

    def __getattr__(self, name):
        return getattr(self._model, name)


class FrameSource(Source):
    """Frames at 1 fps media time; `changed` per frame; optional hook after the frames."""

    def __init__(self, changed: list[bool | None], *, after=None, distinct: bool = True):
        super().__init__(name="frames")
        self.changed = changed
        self.after = after

    async def frames(self):
        for i, ch in enumerate(self.changed):
            yield Frame(pixels=random_image(56, 56, seed=i), pts=float(i), changed=ch)
        if self.after is not None:
            await self.after(self)


class Collect(Stage):
    name = "collect"

    def __init__(self):
        super().__init__()
        self.items: list[Event] = []

    async def process(self, item):
        self.items.append(item)
        yield item

    async def on_control(self, msg):
        self.items.append(msg)
        yield msg


def run_graph(model, changed, *, narration=None, after=None, pack=None):
    session = StreamingSession(model)
    encode = EncodeStage(model, worker=session.worker, pack_frames=pack)
    decode = DecodeStage(session, narration or NarrationConfig(policy="on_demand", max_tokens=4))
    collect = Collect()
    source = FrameSource(changed, after=after)
    result = asyncio.run(Runtime(source, [encode, decode, collect]).run(handle_signals=False))
    assert result.exit_code == 0 and not result.errors, result.errors
    return encode, decode, collect


def _frames(collect):
    return [e for e in collect.items if isinstance(e, Frame)]


def test_unchanged_frames_reuse_features_and_are_not_encoded(models):
    model = CountingModel(models["2.6"])
    changed = [None, False, False, True, False, True, False, False]
    encode, decode, collect = run_graph(model, changed)
    frames = _frames(collect)
    assert [f.pts for f in frames] == [float(i) for i in range(8)]  # order kept
    assert sum(model.image_calls) == 3 == encode.frames_encoded  # frames 0, 3, 5 only
    assert encode.frames_reused == 5
    for i in (1, 2):
        assert frames[i].features is frames[0].features
    assert frames[4].features is frames[3].features and frames[7].features is frames[5].features
    assert decode.frames_added == 8  # reused frames still enter the session (time passes)


def test_waiting_frames_are_micro_batched(models):
    model = CountingModel(models["2.6"])
    encode, _, collect = run_graph(model, [True] * 12)
    assert sum(model.image_calls) == 12 == encode.frames_encoded and encode.encode_calls == len(model.image_calls)
    assert len(model.image_calls) < 12 and max(model.image_calls) > 1  # several frames per call
    assert [f.pts for f in _frames(collect)] == [float(i) for i in range(12)]


def test_question_is_answered_from_the_cache_without_re_encoding(models):
    model = CountingModel(models["2.6"])
    question = Question(text="What is shown?")
    seen = {}

    async def ask(source):
        decode = source.runtime.stages[1]
        while decode.frames_added < 5:
            await asyncio.sleep(0.01)
        seen["calls_before"] = list(model.image_calls)
        seen["cache_before"] = decode.session.cache_tokens
        await source.runtime.inject(question)
        collect = source.runtime.stages[2]
        while not any(isinstance(e, Answer) for e in collect.items):
            await asyncio.sleep(0.01)

    _, _, collect = run_graph(model, [True] * 5, after=ask)
    answers = [e for e in collect.items if isinstance(e, Answer)]
    assert len(answers) == 1
    ans = answers[0]
    assert ans.request_id == question.request_id and ans.question == "What is shown?" and ans.error is None
    assert ans.pts == 4.0  # the media time of the latest frame the answer saw
    assert model.image_calls == seen["calls_before"]  # nothing re-encoded for the answer
    assert ans.cache_tokens is not None and ans.cache_tokens > seen["cache_before"]
    assert ans.first_token_ms is not None and ans.first_token_ms >= 0
    assert not any(isinstance(e, Question) for e in collect.items)  # consumed by decode


def test_interval_policy_narrates_every_n_media_seconds(models):
    cfg = NarrationConfig(policy="interval", interval_s=2.0, max_tokens=4)
    _, decode, collect = run_graph(models["2.6"], [True] * 7, narration=cfg)
    assert [(p, t) for p, t, _ in decode.turn_log] == [(2.0, "interval"), (4.0, "interval"), (6.0, "interval")]
    narrations = [e for e in collect.items if isinstance(e, Narration)]
    for n in narrations:
        assert n.trigger == "interval" and n.first_token_ms >= 0 and n.cache_tokens > 0
        assert n.pts_end == n.pts and n.pts_start < n.pts_end
        deltas = [d.text for d in collect.items if isinstance(d, NarrationDelta) and d.narration_id == n.narration_id]
        assert "".join(deltas).strip() == n.text


def test_change_policy_narrates_on_scene_changes_only(models):
    cfg = NarrationConfig(policy="change", max_tokens=3)
    changed = [None, False, True, False, False, True, False]
    _, decode, _ = run_graph(models["2.6"], changed, narration=cfg)
    assert [(p, t) for p, t, _ in decode.turn_log] == [(2.0, "change"), (5.0, "change")]


def test_on_demand_policy_never_narrates(models):
    _, decode, collect = run_graph(models["2.6"], [True] * 4)
    assert not decode.turn_log and not any(isinstance(e, Narration) for e in collect.items)


def test_minicpmv45_packs_frames_into_3d_groups(models):
    model = CountingModel(models["4.5"])
    encode, decode, collect = run_graph(model, [True] * 7)
    assert encode.pack == 3
    assert model.group_calls == [[0, 10, 20], [30, 40, 50], [60]]  # 0.1 s units; tail flushed
    assert model.image_calls == []
    frames = _frames(collect)
    assert [f.features is not None for f in frames] == [False, False, True, False, False, True, True]
    assert decode.frames_added == 3
    spans = [s.kind for s in decode.session.core.spans]
    assert spans == ["prefix", "frame", "frame", "frame"]
    assert np.isfinite(np.array(frames[2].features.features)).all()


def test_model_stages_from_config_run_end_to_end(tmp_path):
    from framecast.stages.app import _model_stages
    from framecast.config import RunConfig
    from framecast.errors import ModelLoadError

    make_tiny_minicpmv(tmp_path / "m", "2.6")
    cfg = RunConfig.model_validate({"model": {"path": str(tmp_path / "m")},
                                    "session": {"max_cache_tokens": 400},
                                    "narration": {"policy": "interval", "interval_s": 1.0, "max_tokens": 3}})
    stages = _model_stages(cfg)
    assert [s.name for s in stages] == ["encode", "decode"]
    collect = Collect()
    result = asyncio.run(Runtime(FrameSource([True] * 40), [*stages, collect]).run(handle_signals=False))
    assert result.exit_code == 0 and not result.errors
    decode = stages[1]
    assert decode.frames_added == 40 and len(decode.turn_log) == 39
    assert decode.session.core.evicted_total > 0 and decode.session.cache_tokens <= 400
    with pytest.raises(ModelLoadError):
        _model_stages(RunConfig.model_validate({"model": {"path": str(tmp_path / "missing")}}))


@pytest.mark.parametrize("name", ["stream.safetensors", "stream.fcs", "stream.state", "stream"])
def test_state_file_continues_the_conversation_across_runs(tmp_path, name):
    """Whatever the state file is called (MLX's safetensors writer would add `.safetensors` to a
    name without it, and the next run would never find the file), it is written where named."""
    from framecast.stages.app import _model_stages
    from framecast.config import RunConfig

    make_tiny_minicpmv(tmp_path / "m", "2.6")
    state = tmp_path / name
    cfg = RunConfig.model_validate({"model": {"path": str(tmp_path / "m")},
                                    "session": {"state_file": str(state)},
                                    "narration": {"policy": "on_demand"}})
    counts = []
    for _ in range(2):
        stages = _model_stages(cfg)
        result = asyncio.run(Runtime(FrameSource([True] * 3), stages).run(handle_signals=False))
        assert result.exit_code == 0 and not result.errors
        core = stages[1].session.core
        counts.append((core.frames_added, [s.kind for s in core.spans].count("frame")))
    assert state.is_file() and counts == [(3, 3), (6, 6)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m", name])  # nothing beside it


class DetectorLikeSource(Source):
    """Frames at 1 fps like the change detector leaves them: a changed frame is followed by its
    SceneChange event (the first frame too); then an eof status ending the input at `end`."""

    def __init__(self, changed: list[bool], *, end: float | None = None):
        super().__init__(name="frames")
        self.changed, self.end = changed, end

    async def frames(self):
        from framecast.events import SceneChange, Status

        for i, ch in enumerate(self.changed):
            yield Frame(pixels=random_image(56, 56, seed=i), pts=float(i), changed=ch)
            if ch:
                yield SceneChange(score=0.5, pts=float(i))
        if self.end is not None:
            yield Status(state="eof", pts=self.end)


def _run_detector_like(model, changed, narration, *, end=None, pack=None, narrate_at_end=True):
    session = StreamingSession(model)
    decode = DecodeStage(session, narration, narrate_at_end=narrate_at_end)
    collect = Collect()
    stages = [EncodeStage(model, worker=session.worker, pack_frames=pack), decode, collect]
    result = asyncio.run(Runtime(DetectorLikeSource(changed, end=end), stages).run(handle_signals=False))
    assert result.exit_code == 0 and not result.errors, result.errors
    return decode, [e for e in collect.items if isinstance(e, Narration)]


def test_change_policy_narrates_once_per_change_with_the_detector_events(models):
    cfg = NarrationConfig(policy="change", max_tokens=3)
    decode, _ = _run_detector_like(models["2.6"], [True, False, True, False, False, True, False], cfg)
    # the event after its frame is not a second change (it used to re-trigger on the next frame)
    assert [(p, t) for p, t, _ in decode.turn_log] == [(0.0, "change"), (2.0, "change"), (5.0, "change")]


@pytest.mark.parametrize("version", ["2.6", "4.5"])
def test_closing_narration_covers_the_last_span_at_end_of_input(models, version):
    cfg = NarrationConfig(policy="interval", interval_s=3.0, max_tokens=3)
    decode, nars = _run_detector_like(models[version], [True] * 8, cfg, end=8.0)
    turns = [(p, t) for p, t, _ in decode.turn_log]
    # 4.5 packs 3 frames per group (features on frames 2, 5, 7), and the last, partial group is
    # flushed only at the end of the stream: the closing turn still comes after every frame
    assert turns == ([(3.0, "interval"), (6.0, "interval"), (7.0, "end")] if version == "2.6"
                     else [(5.0, "interval"), (7.0, "end")])
    end = [n for n in nars if n.trigger == "end"]
    assert all(n.pts == 7.0 and n.pts_end == 8.0 for n in end)  # (a turn with no words has no event)
    _, nars = _run_detector_like(models[version], [True] * 8, cfg, end=None)  # no eof (stopped): no closing
    assert all(n.trigger != "end" for n in nars)
    decode, _ = _run_detector_like(models[version], [True] * 8, cfg, end=8.0, narrate_at_end=False)
    assert all(t != "end" for _, t, _ in decode.turn_log)


def test_no_closing_narration_when_a_signal_comes_after_the_end_of_input(models):
    """The input ended (eof status), then a signal stopped the run before the closing turn: the
    README's rule holds (a run stopped by a signal gets no closing narration)."""
    from framecast.events import Status

    class SignalAfterEof(Stage):
        runtime = None

        async def process(self, item):
            if isinstance(item, Status) and item.state == "eof":
                self.runtime.request_stop("signal")
            yield item

    cfg = NarrationConfig(policy="interval", interval_s=3.0, max_tokens=3)
    session = StreamingSession(models["2.6"])
    decode = DecodeStage(session, cfg)
    stop = SignalAfterEof()
    stages = [EncodeStage(models["2.6"], worker=session.worker), stop, decode, Collect()]
    runtime = Runtime(DetectorLikeSource([True] * 8, end=8.0), stages)
    stop.runtime = runtime
    result = asyncio.run(runtime.run(handle_signals=False))
    assert result.stopped_by == "signal"
    assert [t for _, t, _ in decode.turn_log] and all(t != "end" for _, t, _ in decode.turn_log)
