"""Several streams, one model (issue 15): `[[streams]]` and repeated `--source`, one session per
stream on one loaded model and one worker, frames of all streams encoded in one batch, turns
interleaved step by step; 4 streams in one run narrate exactly as 4 separate runs; a stream that
ends or stalls leaves the others running; questions and HA discovery per stream on the bus."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from framecast.config import ConfigError, load_config, stream_configs
from framecast.events import Frame, Status
from framecast.runtime import Runtime, Source
from framecast.stages.app import SharedModel, build_graph
from framecast.stages.cli import _run_overrides, build_parser
from framecast.stages.multi import (
    LabelledWriter,
    StreamRun,
    build_streams,
    load_shared_model,
    run_streams,
)
from framecast.testing import make_tiny_minicpmv, random_image


def _write(tmp_path, text: str, name: str = "run.toml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# ---------------------------------------------------------------- configuration


def test_streams_entries_merge_over_the_run_groups(tmp_path):
    path = _write(tmp_path, """
[source]
fps = 2
[narration]
policy = "change"
[outputs]
jsonl = "out/{stream_id}.jsonl"
[session]
state_file = "state/{stream_id}.safetensors"

[[streams]]
id = "door"
source = { uri = "door.mp4", start = 3 }

[[streams]]
source = { uri = "rtsp://cam/yard" }
narration = { policy = "interval", interval_s = 5 }
outputs = { srt = "yard.srt" }

[[streams]]
source = { uri = "demo", stream_id = "garden", seed = 7 }
""")
    cfg = load_config(path)
    door, yard, garden = stream_configs(cfg, path)
    assert [c.source.stream_id for c in (door, yard, garden)] == ["door", "stream2", "garden"]
    assert door.source.uri == "door.mp4" and door.source.start == 3 and door.source.fps == 2  # shared fps
    assert door.narration.policy == "change" and yard.narration.policy == "interval"
    assert yard.narration.interval_s == 5 and yard.outputs.srt == "yard.srt"
    assert [c.outputs.jsonl for c in (door, yard, garden)] == ["out/door.jsonl", "out/stream2.jsonl",
                                                               "out/garden.jsonl"]
    assert door.session.state_file == "state/door.safetensors"
    assert garden.source.seed == 7 and not any(c.streams for c in (door, yard, garden))


def test_single_stream_paths_expand_too():
    cfg = load_config(None, {"source.stream_id": "porch", "outputs.jsonl": "{stream_id}.jsonl"}, env=False)
    (one,) = stream_configs(cfg)
    assert one.outputs.jsonl == "porch.jsonl"


@pytest.mark.parametrize("body, message", [
    ('[[streams]]\nid = "a"\n[[streams]]\nid = "a"\n', r"streams\[1\]: stream id 'a' is already used by streams\[0\]"),
    ('[[streams]]\nsource = { stream_id = "b" }\n[[streams]]\nid = "b"\n', r"streams\[1\]: stream id 'b' is already"),
    ('[[streams]]\nid = "a/b"\n', r"streams\[0\]: id = 'a/b': stream ids use"),
    ('[[streams]]\nid = "a"\nsource = { fps = -1 }\n', r"streams\[0\]: source.fps = -1: .*greater than 0"),
    ('[[streams]]\nid = "a"\nsource = { colour = 1 }\n', r"streams\[0\]: unknown key 'source.colour'"),
    ('[[streams]]\nid = "a"\nnarration = { policy = "often" }\n', r"streams\[0\]: narration.policy = 'often'"),
    ('[[streams]]\nid = "a"\nmqtt = { url = "mqtt://x" }\n', r"unknown key 'streams.0.mqtt'"),
    ('[[streams]]\nid = "a"\nsource = "demo"\n', r"streams.0.source = 'demo'"),
    ('[[streams]]\nid = "a"\nsource = { stream_id = "b" }\n', r"id = 'a' but source.stream_id = 'b'"),
    ('[outputs]\njsonl = "all.jsonl"\n[[streams]]\nid = "a"\n[[streams]]\nid = "b"\n',
     r"outputs.jsonl = 'all.jsonl' is shared by streams 'a' and 'b': put \{stream_id\} in the path"),
    ('[[streams]]\nid = "a"\nsession = { state_file = "s" }\n[[streams]]\nid = "b"\nsession = { state_file = "s" }\n',
     r"session.state_file = 's' is shared"),
])
def test_bad_stream_entries_fail_with_one_line(tmp_path, body, message):
    path = _write(tmp_path, body)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(path, env=False)
    assert "\n" not in str(e.value) and str(e.value).startswith(path)


def test_streams_cannot_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("FRAMECAST_STREAMS", "[]")
    with pytest.raises(ConfigError, match="FRAMECAST_STREAMS: streams are set in a config file"):
        load_config(None)


def _cli(*argv: str) -> dict:
    return _run_overrides(build_parser().parse_args(["run", *argv]))


def test_repeated_source_flags_become_streams(tmp_path):
    assert _cli("--source", "demo")["source.uri"] == "demo"
    one = _cli("--source", "cam.mp4#door")
    assert one["source.uri"] == "cam.mp4" and one["source.stream_id"] == "door" and one["streams"] == []
    many = _cli("--source", "a.mp4#door", "--source", "rtsp://h/s#yard", "--source", "demo")
    assert many["streams"] == [{"id": "door", "source": {"uri": "a.mp4"}},
                               {"id": "yard", "source": {"uri": "rtsp://h/s"}},
                               {"id": None, "source": {"uri": "demo"}}]
    named = _cli("--source", "a.mp4", "--stream-id", "x", "--source", "b.mp4", "--stream-id", "y")
    assert [s["id"] for s in named["streams"]] == ["x", "y"]
    # a fragment that is no stream id stays part of the URL
    assert _cli("--source", "http://h/v.mp4#t=1,2")["source.uri"] == "http://h/v.mp4#t=1,2"
    # with --stream-id the URI is taken whole
    assert _cli("--source", "http://h/v.mp4#part", "--stream-id", "x") == {
        "source.uri": "http://h/v.mp4#part", "source.stream_id": "x", "streams": []}
    # flags replace the file's streams
    path = _write(tmp_path, '[[streams]]\nid = "file"\n')
    cfg = load_config(path, _cli("--source", "demo#x", "--source", "demo#y"), env=False)
    assert [c.source.stream_id for c in stream_configs(cfg)] == ["x", "y"]
    assert load_config(path, _cli("--source", "demo"), env=False).streams == []
    # --resume: {stream_id} expands; one .fcs for two streams is refused
    cfg = load_config(None, {**_cli("--source", "demo#a", "--source", "demo#b"), "session.resume": "{stream_id}.fcs"},
                      env=False)
    assert [c.session.resume for c in stream_configs(cfg)] == ["a.fcs", "b.fcs"]
    with pytest.raises(ConfigError, match="session.resume = 'x.fcs' is given to streams 'a' and 'b'"):
        stream_configs(load_config(None, {**_cli("--source", "demo#a", "--source", "demo#b"),
                                          "session.resume": "x.fcs"}, env=False))
    # an automatic name never takes an id that another stream was given
    cfg = load_config(None, _cli("--source", "demo#stream2", "--source", "demo", "--source", "demo"), env=False)
    assert [c.source.stream_id for c in stream_configs(cfg)] == ["stream2", "stream3", "stream4"]


@pytest.mark.parametrize("argv, message", [
    (["--source", "a", "--source", "b", "--stream-id", "x"], "--stream-id given 1 times for 2 --source flags"),
    (["--source", "a", "--stream-id", "x", "--stream-id", "y"], "--stream-id given 2 times for 1"),
])
def test_bad_source_flags_fail_with_one_line(argv, message):
    from framecast.errors import UserError

    with pytest.raises(UserError, match=message):
        _cli(*argv)


def test_cli_errors_for_duplicate_ids_exit_2(capsys):
    from framecast.stages.cli import main

    assert main(["run", "--source", "demo#a", "--source", "demo#a"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "framecast: command line: streams[1]: stream id 'a' is already used by streams[0]"


def test_labelled_writer_prefixes_every_line():
    import io

    buf = io.StringIO()
    w = LabelledWriter(buf, "door")
    w.write("one\ntwo")
    w.write(" halves\n")
    w.write("\r\033[Kpartial")
    assert buf.getvalue() == "[door] one\n[door] two halves\n\r[door] \033[Kpartial"


# ---------------------------------------------------------------- engine: batching, interleaving


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from framecast.model.load import load_model

    d = tmp_path_factory.mktemp("tiny-2.6")
    make_tiny_minicpmv(d, "2.6")
    return load_model(str(d))


def test_batch_encoder_batches_frames_that_arrive_together(tiny):
    from framecast.engine.scheduler import BatchEncoder
    from framecast.engine.worker import worker_for

    worker = worker_for(tiny)
    enc = BatchEncoder(tiny, worker=worker, max_batch=8)
    images = [random_image(56 + 14 * (i % 3), 70, seed=i) for i in range(6)]  # mixed sizes

    async def scenario():
        import threading
        release = threading.Event()
        worker.submit_sync(release.wait, 10)  # the worker is busy: requests pile up
        tasks = [asyncio.ensure_future(enc([img])) for img in images[:4]] + [
            asyncio.ensure_future(enc(images[4:]))]
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(*tasks)

    results = asyncio.run(scenario())
    assert enc.calls == 1 and enc.frames == 6 and enc.max_rows == 6  # one vision-tower call
    got = [f for r in results for f in r]
    assert len(got) == 6

    def compare():  # MLX arrays belong to the worker's thread
        for img, a in zip(images, got):
            (b,) = tiny.encode_images([img], max_slice_nums=1)  # each frame alone
            np.testing.assert_allclose(np.array(a.features), np.array(b.features), rtol=1e-5, atol=1e-5)
            assert a.grid == b.grid

    worker.submit_sync(compare).result()


def test_batch_encoder_splits_at_max_batch_and_reports_errors_to_every_stream(tiny):
    from framecast.engine.scheduler import BatchEncoder

    enc = BatchEncoder(tiny, max_batch=2)
    images = [random_image(56, 56, seed=i) for i in range(5)]

    async def scenario():
        import threading
        release = threading.Event()
        enc.worker.submit_sync(release.wait, 10)
        tasks = [asyncio.ensure_future(enc([img])) for img in images]
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(*tasks)

    assert len(asyncio.run(scenario())) == 5 and enc.calls == 3 and enc.max_rows == 2

    async def broken():
        import threading
        release = threading.Event()
        enc.worker.submit_sync(release.wait, 10)
        tasks = [asyncio.ensure_future(enc([np.zeros((0, 0, 3), np.uint8)])), asyncio.ensure_future(enc([images[0]]))]
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    assert all(isinstance(r, Exception) for r in asyncio.run(broken()))


def _encode(model, images):
    from framecast.engine.worker import worker_for

    return worker_for(model).submit_sync(model.encode_images, images).result()


@pytest.fixture(scope="module")
def tiny45(tmp_path_factory):
    from framecast.model.load import load_model

    d = tmp_path_factory.mktemp("tiny-4.5")
    make_tiny_minicpmv(d, "4.5")
    return load_model(str(d)), d


def test_frame_groups_of_several_streams_encode_in_one_call(tiny45):
    from framecast.engine.scheduler import BatchEncoder

    model, _ = tiny45
    enc = BatchEncoder(model, max_batch=16)
    groups = [([random_image(56, 56, seed=10 * g + f) for f in range(n)], [g * 10 + 3 * f for f in range(n)])
              for g, n in enumerate((3, 3, 2, 1))]  # a partial group at a stream's end too
    groups.append(([random_image(84, 56, seed=99)] * 3, [0, 3, 6]))  # another stream's frame size

    async def scenario():
        import threading
        release = threading.Event()
        enc.worker.submit_sync(release.wait, 10)
        tasks = [asyncio.ensure_future(enc.group(px, ids)) for px, ids in groups]
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(*tasks)

    got = asyncio.run(scenario())
    assert enc.calls == 1 and enc.frames == 12

    def compare():
        for (px, ids), a in zip(groups, got):
            b = model.encode_frame_group(px, ids, max_slice_nums=1)  # each group alone
            assert a.features.shape == b.features.shape and a.grid == b.grid and a.temporal_ids == b.temporal_ids
            np.testing.assert_allclose(np.array(a.features), np.array(b.features), rtol=1e-4, atol=1e-4)

    enc.worker.submit_sync(compare).result()


def test_urgent_jobs_overtake_queued_jobs_and_keep_their_own_order():
    import threading

    from framecast.engine.worker import ModelWorker

    worker = ModelWorker("order-test")
    ran: list[str] = []
    release = threading.Event()
    worker.submit_sync(release.wait, 10)
    futs = [worker.submit_sync(ran.append, "n1"), worker.submit_sync(ran.append, "n2"),
            worker.submit_urgent(ran.append, "u1"), worker.submit_urgent(ran.append, "u2")]
    assert worker.queued >= 4
    release.set()
    for f in futs:
        f.result(timeout=10)
    assert ran == ["u1", "u2", "n1", "n2"] and worker.wait_idle(5)


def test_turns_of_two_sessions_interleave_and_match_separate_turns(tiny):
    from framecast.engine.session import StreamingSession, TextDelta, TurnDone

    feats = _encode(tiny, [random_image(56, 56, seed=s) for s in (1, 2)])

    async def alone(i: int) -> str:
        s = StreamingSession(tiny)
        await s.add_frame(feats[i], 0.0)
        async for ev in s.narrate("Describe it.", max_tokens=12):
            if isinstance(ev, TurnDone):
                return ev.text

    async def together() -> tuple[list[str], list[int]]:
        sessions = [StreamingSession(tiny) for _ in range(2)]
        order: list[int] = []
        for s, f in zip(sessions, feats):
            await s.add_frame(f, 0.0)

        async def one(i: int) -> str:
            async for ev in sessions[i].narrate("Describe it.", max_tokens=12):
                if isinstance(ev, TextDelta):
                    order.append(i)
                elif isinstance(ev, TurnDone):
                    return ev.text

        return list(await asyncio.gather(one(0), one(1))), order

    expected = [asyncio.run(alone(0)), asyncio.run(alone(1))]
    texts, order = asyncio.run(together())
    assert texts == expected
    # step by step: the second session's tokens come before the first's turn is over
    assert order.index(1) < len(order) - 1 - order[::-1].index(0)


def test_a_question_is_answered_between_the_steps_of_other_streams_narrations(tiny):
    from framecast.engine.session import StreamingSession, TurnDone

    feats = _encode(tiny, [random_image(56, 56, seed=3)])

    async def scenario():
        narrators = [StreamingSession(tiny) for _ in range(3)]
        asked = StreamingSession(tiny)
        for s in (*narrators, asked):
            await s.add_frame(feats[0], 0.0)
        done: list[str] = []
        tokens_at_answer: list[int] = []
        progress = [0] * len(narrators)

        async def narrate(i: int):
            async for ev in narrators[i].narrate("Describe it at length.", max_tokens=150, ignore_eos=True):
                progress[i] = narrators[i].core.offset
                if isinstance(ev, TurnDone):
                    done.append(f"narration{i}")

        async def ask():
            while not all(progress):  # every narration is decoding
                await asyncio.sleep(0.001)
            start = list(progress)
            async for ev in asked.ask("What is it?", max_tokens=20, ignore_eos=True):
                if isinstance(ev, TurnDone):
                    done.append("answer")
                    tokens_at_answer.extend(p - s for p, s in zip(progress, start))

        await asyncio.gather(*(narrate(i) for i in range(3)), ask())
        return done, tokens_at_answer

    done, tokens_at_answer = asyncio.run(scenario())
    assert done[0] == "answer"
    # the answer's 20 steps overtook the narrations: they moved on by a few tokens, not 20 each
    assert max(tokens_at_answer) < 10, tokens_at_answer


def test_an_interrupted_interleaved_turn_is_closed_before_the_next_call(tiny):
    from framecast.engine.session import StreamingSession, TextDelta

    feats = _encode(tiny, [random_image(56, 56, seed=4)])

    async def scenario():
        s, other = StreamingSession(tiny), StreamingSession(tiny)
        await s.add_frame(feats[0], 0.0)
        await other.add_frame(feats[0], 0.0)
        busy = asyncio.ensure_future(_drain(other.narrate("Go on.", max_tokens=40, ignore_eos=True)))
        n = 0
        async for ev in s.narrate("Describe it.", max_tokens=40, ignore_eos=True):
            n += isinstance(ev, TextDelta)
            if n == 2:
                break
        await s.add_text("after")  # runs after the interrupted turn was closed
        await busy
        return s.core.spans, s.core.offset

    spans, offset = asyncio.run(scenario())
    assert [sp.kind for sp in spans] == ["prefix", "frame", "turn", "text"]
    assert offset == sum(sp.length for sp in spans)


async def _drain(gen):
    async for _ in gen:
        pass


# ---------------------------------------------------------------- the proof, demo model


def _demo_streams(tmp_path, n: int = 4) -> list:
    overrides = {"streams": [{"id": f"cam{i}", "source": {"seed": 10 + i, "max_frames": 14 - 3 * (i == 3)}}
                             for i in range(n)],
                 "source.fps": 10.0, "narration.interval_s": 0.5, "narration.max_tokens": 8,
                 "outputs.console": False, "outputs.jsonl": str(tmp_path / "{stream_id}.jsonl")}
    return stream_configs(load_config(None, overrides, env=False))


def _narrations(path) -> list[tuple]:
    rows = _envelopes(path)
    return [(r["pts"], r["trigger"], r["text"]) for r in rows if r["type"] == "narration"]


def test_four_streams_in_one_run_narrate_exactly_as_four_separate_runs(tmp_path):
    configs = _demo_streams(tmp_path / "together")
    (tmp_path / "together").mkdir()
    runs = build_streams(configs)
    results = asyncio.run(run_streams(runs, handle_signals=False))
    assert all(r.exit_code == 0 for r in results.values()), {k: r.errors for k, r in results.items()}
    encode = next(st for st in runs[0].runtime.stages if st.name == "encode")
    assert encode.encoder is not None and encode.encoder.max_rows > 1  # frames of several streams in one call
    assert len({id(st.session.model) for r in runs for st in r.runtime.stages if st.name == "decode"}) == 1

    shared = SharedModel(encode.model, encode.worker)  # the same weights, one stream at a time
    separate = {}
    (tmp_path / "separate").mkdir()
    for cfg in _demo_streams(tmp_path / "separate"):
        source, stages = build_graph(cfg, shared=shared)
        result = asyncio.run(Runtime(source, stages, stream_id=cfg.source.stream_id).run(handle_signals=False))
        assert result.exit_code == 0
        separate[cfg.source.stream_id] = _narrations(cfg.outputs.jsonl)
    together = {c.source.stream_id: _narrations(c.outputs.jsonl) for c in configs}
    assert together == separate
    assert all(len(v) >= 2 for v in together.values())
    assert len({tuple(v) for v in together.values()}) > 1  # the streams saw different scenes
    # cam3's file ended first; the others went on to their own end
    assert max(p for p, _, _ in together["cam3"]) < max(p for p, _, _ in together["cam0"])
    for sid in together:
        rows = _envelopes(tmp_path / "together" / f"{sid}.jsonl")
        assert {r["stream_id"] for r in rows} == {sid}


class StallingSource(Source):
    """A live camera that sends two frames, then hangs (no frame, no end) until stopped."""

    live = True

    def __init__(self, stream_id: str):
        super().__init__(name="stalled")
        self.stream_id = stream_id

    async def frames(self):
        yield Status(state="running", stream_id=self.stream_id)
        for i in range(2):
            yield Frame(pixels=random_image(448, 448, seed=i), pts=i / 10, stream_id=self.stream_id)
        await self.stopping.wait()
        yield Status(state="stopped", stream_id=self.stream_id)


def test_a_stalled_stream_leaves_the_other_three_running(tmp_path):
    configs = _demo_streams(tmp_path)
    shared = load_shared_model(configs)
    runs = build_streams(configs[:3], shared=shared)
    stalled_cfg = configs[3]
    _, stages = build_graph(stalled_cfg, shared=shared)
    stalled = Runtime(StallingSource("cam3"), stages, stream_id="cam3")
    runs.append(StreamRun("cam3", stalled_cfg, stalled))

    async def scenario():
        task = asyncio.ensure_future(run_streams(runs, handle_signals=False))
        others = [asyncio.ensure_future(_until_done(r.runtime)) for r in runs[:3]]
        await asyncio.wait_for(asyncio.gather(*others), 120)
        assert not task.done()  # the stalled camera is still waiting for frames
        stalled.request_stop("stop")
        return await asyncio.wait_for(task, 30)

    results = asyncio.run(scenario())
    for cfg in configs[:3]:
        assert results[cfg.source.stream_id].stopped_by == "eos"
        assert len(_narrations(cfg.outputs.jsonl)) >= 2
    assert results["cam3"].stopped_by == "stop"


async def _until_done(runtime: Runtime) -> None:
    """Wait until the runtime's graph has finished (its last stage saw the end of stream)."""
    while not (runtime.source.stopping.is_set() or _ended(runtime)):
        await asyncio.sleep(0.05)
    while not _ended(runtime):
        await asyncio.sleep(0.05)


def _ended(runtime: Runtime) -> bool:
    return bool(runtime._stage_tasks) and all(t.done() for t in runtime._stage_tasks)


# ---------------------------------------------------------------- the bus, per stream


def test_questions_status_and_ha_discovery_per_stream_on_the_bus(tmp_path):
    from broker import Broker, Recorder
    from framecast.stages.mqtt.ask import ask_over_mqtt

    b = Broker(tmp_path / "broker").start()
    rec = Recorder(b.port, ["fcs/#", "homeassistant/#"])
    overrides = {"streams": [{"id": "front", "source": {"max_frames": 8}},
                             {"id": "back", "source": {"seed": 5, "realtime": True, "max_frames": 600}}],
                 "source.fps": 10.0, "narration.interval_s": 0.5, "narration.max_tokens": 6,
                 "outputs.console": False, "mqtt.url": b.url, "mqtt.prefix": "fcs", "mqtt.ha_discovery": True,
                 "mqtt.client_id": "fc"}
    runs = build_streams(stream_configs(load_config(None, overrides, env=False)))

    async def scenario():
        task = asyncio.ensure_future(run_streams(runs, handle_signals=False))
        await asyncio.wait_for(_until_done(runs[0].runtime), 60)  # front's file ended...
        rc = await asyncio.to_thread(ask_over_mqtt, b.url, "back", "What do you see?", prefix="fcs", timeout=30)
        runs[1].runtime.request_stop("stop")  # ...back, a live stream, still answers
        return rc, await asyncio.wait_for(task, 30)

    try:
        rc, results = asyncio.run(scenario())
        assert rc == 0 and results["front"].stopped_by == "eos" and results["back"].stopped_by == "stop"
        assert rec.wait_for(lambda ms: any(m.topic == "fcs/status" and m.json()["state"] == "offline" for m in ms), 5)
        answers = [m.json() for m in rec.on("fcs/back/answer")]
        assert len(answers) == 1 and answers[0]["stream_id"] == "back" and answers[0]["error"] is None
        assert not rec.on("fcs/front/answer")
        assert {m.json()["stream_id"] for m in rec.on("fcs/front/narration")} == {"front"}
        assert [m.json()["state"] for m in rec.on("fcs/front/status")][-1] == "eof"
        assert [m.json()["state"] for m in rec.on("fcs/back/status")][-1] == "stopped"
        # one process: `fcs/status` goes offline once, when the last stream closed
        states = [m.json()["state"] for m in rec.on("fcs/status")]
        assert states.count("offline") == 1 and states[-1] == "offline"
        discovery = {m.topic: m.json() for m in rec.messages if m.topic.startswith("homeassistant/")}
        assert set(discovery) == {"homeassistant/sensor/fcs/front/config", "homeassistant/sensor/fcs/back/config"}
        assert discovery["homeassistant/sensor/fcs/back/config"]["state_topic"] == "fcs/back/narration"
        assert len({d["unique_id"] for d in discovery.values()}) == 2
    finally:
        rec.close()
        b.stop()


def test_bench_streams_runs_and_prints_json_last(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "bench_streams.py"
    spec = importlib.util.spec_from_file_location("bench_streams", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--streams", "3", "--ticks", "2", "--narrate-every", "1", "--max-tokens", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    one, three = result["rows"]
    assert one["streams"] == 1 and three["streams"] == 3 and one["x_frames_per_s"] == 1.0
    assert three["encode_rows_max"] == 3 and three["encode_calls"] == 2  # one call per tick for 3 streams
    assert three["first_samples"] == 6 and three["tok_per_s"] > 0 and three["first_ms_p95"] > 0
    # MiniCPM-V 4.5: one 3-frame group per stream and tick, all streams' groups in one call
    assert bench.main(["--streams", "2", "--ticks", "2", "--narrate-every", "2", "--max-tokens", "2",
                       "--group", "3", "--json"]) == 0
    two = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"][1]
    assert two["encode_calls"] == 2 and two["encode_rows_max"] == 6 and two["frames"] == 12
    # --prefill both --decode both: the three modes a row count can run, each its own row
    assert bench.main(["--streams", "2", "--ticks", "2", "--narrate-every", "1", "--max-tokens", "2",
                       "--prefill", "both", "--decode", "both", "--layers", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert [(r["streams"], r["prefill"], r["decode"], r["cache"]) for r in rows] == [
        (1, "separate", "separate", "own"), (2, "separate", "separate", "own"), (2, "batched", "separate", "pooled"),
        (2, "batched", "batched", "pooled")]
    assert rows[-1]["decode_rows_max"] == 2
    # --cache both: pooled rows beside own ones (batched prefill only)
    assert bench.main(["--streams", "2", "--ticks", "2", "--narrate-every", "1", "--max-tokens", "2",
                       "--cache", "both", "--layers", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert [(r["streams"], r["cache"]) for r in rows] == [(1, "own"), (2, "own"), (2, "pooled")]


# ---------------------------------------------------------------- real processes


def _framecast(tmp_path, *args: str):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.Popen([sys.executable, "-m", "framecast", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _envelopes(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_a_camera_that_fails_leaves_the_other_stream_running_and_the_exit_status_says_so(tmp_path):
    proc = _framecast(tmp_path, "run", "--capture-only", "--source", "demo#a", "--source", "camera:7#cam",
                      "--source", "demo#b", "--max-frames", "30", "--set", "source.width=64",
                      "--set", "source.height=64", "--jsonl", "{stream_id}.jsonl")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert err.strip().splitlines() == ["framecast: [cam] camera:7: cannot open camera device 7 (no such device, or busy)"]
    for sid in ("a", "b"):
        ev = _envelopes(tmp_path / f"{sid}.jsonl")
        assert [e["state"] for e in ev if e["type"] == "status"][-1] == "eof"
        assert "eof after 30 frames" in [e for e in ev if e["type"] == "status"][-1]["text"]
    assert "[a] -- eof" in out and "[b] -- eof" in out


def test_a_signal_stops_every_stream_and_flushes_their_outputs(tmp_path):
    import signal
    import time

    proc = _framecast(tmp_path, "run", "--capture-only", "--source", "demo#a", "--source", "demo#b",
                      "--source", "demo#c", "--realtime", "--fps", "20", "--no-console", "--set", "source.width=64",
                      "--set", "source.height=64", "--jsonl", "{stream_id}.jsonl", "--vtt", "{stream_id}.vtt")
    files = [tmp_path / f"{sid}.jsonl" for sid in "abc"]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(f.exists() and '"running"' in f.read_text() for f in files):
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    for sid, f in zip("abc", files):
        ev = _envelopes(f)
        assert ev[-1]["type"] == "eos" and ev[-1]["text"] == "signal" and {e["stream_id"] for e in ev} == {sid}
        assert any(e["type"] == "status" and e["state"] == "stopped" for e in ev)
        assert (tmp_path / f"{sid}.vtt").read_text().startswith("WEBVTT")
    assert "Traceback" not in err


def test_minicpmv45_streams_in_one_run_narrate_as_separate_runs(tmp_path, tiny45):
    _, model_dir = tiny45
    overrides = {"streams": [{"id": f"s{i}", "source": {"seed": 20 + i, "max_frames": 9 + 3 * i}} for i in range(3)],
                 "model.path": str(model_dir), "source.fps": 4.0, "source.width": 112, "source.height": 112,
                 "narration.interval_s": 1.0, "narration.max_tokens": 5, "outputs.console": False,
                 "outputs.jsonl": str(tmp_path / "{stream_id}.jsonl")}
    configs = stream_configs(load_config(None, overrides, env=False))
    runs = build_streams(configs)
    results = asyncio.run(run_streams(runs, handle_signals=False))
    assert all(r.exit_code == 0 for r in results.values())
    encode = next(st for st in runs[0].runtime.stages if st.name == "encode")
    assert encode.pack == 3 and encode.encoder.calls > 0
    together = {c.source.stream_id: _narrations(c.outputs.jsonl) for c in configs}
    shared = SharedModel(encode.model, encode.worker)
    for cfg in configs:
        cfg = cfg.model_copy(update={"outputs": cfg.outputs.model_copy(update={"jsonl": str(tmp_path / "alone.jsonl")})})
        source, stages = build_graph(cfg, shared=shared)
        assert asyncio.run(Runtime(source, stages).run(handle_signals=False)).exit_code == 0
        assert _narrations(tmp_path / "alone.jsonl") == together[cfg.source.stream_id]
    assert all(together.values())


def test_batch_prefill_appends_frames_of_several_sessions_in_one_call(tiny):
    """Frames that sessions append in one tick go through one batched prefill: each session
    (caches of different lengths; 4.0 and 4.5 are covered by the engine test) narrates the
    same text as with its own add_features; a session's two
    frames keep their order (one per call); a frame its own budget refuses fails alone."""
    import threading

    from framecast.engine.scheduler import BatchPrefill
    from framecast.engine.session import StreamingSession, TurnDone
    from framecast.engine.worker import worker_for

    worker = worker_for(tiny)
    feats = _encode(tiny, [random_image(56, 56, seed=s) for s in range(6)])

    async def narrate(s: StreamingSession) -> str:
        async for ev in s.narrate("Describe it.", max_tokens=10):
            if isinstance(ev, TurnDone):
                return ev.text

    async def separate() -> list[str]:
        out = []
        for i in range(3):
            s = StreamingSession(tiny, worker=worker)
            for k in range(i):  # different cache lengths before the batched tick
                await s.add_frame(feats[k], float(k))
            await s.add_frame(feats[3 + i], 5.0)
            if i == 2:
                await s.add_frame(feats[0], 6.0)
            out.append(await narrate(s))
        return out

    async def together() -> tuple[list[str], BatchPrefill, list]:
        prefill = BatchPrefill(tiny, worker=worker)
        sessions = [StreamingSession(tiny, worker=worker, prefill=prefill) for _ in range(3)]
        small = StreamingSession(tiny, worker=worker, prefill=prefill, max_cache_tokens=84)  # prefix + < one frame
        for i, s in enumerate(sessions):
            for k in range(i):
                await s.add_frame(feats[k], float(k))
        calls0 = prefill.calls
        release = threading.Event()
        worker.submit_sync(release.wait, 10)  # the worker is busy: the tick's frames pile up

        async def last_session() -> None:
            await sessions[2].add_frame(feats[5], 5.0)
            await sessions[2].add_frame(feats[0], 6.0)

        tasks = [asyncio.ensure_future(sessions[0].add_frame(feats[3], 5.0)),
                 asyncio.ensure_future(sessions[1].add_frame(feats[4], 5.0)),
                 asyncio.ensure_future(last_session()),
                 asyncio.ensure_future(small.add_frame(feats[1], 5.0))]
        await asyncio.sleep(0.05)
        release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        texts = [await narrate(s) for s in sessions]
        return texts, prefill, [prefill.calls - calls0, results]

    expected = asyncio.run(separate())
    texts, prefill, (calls, results) = asyncio.run(together())
    assert texts == expected
    assert prefill.max_rows_seen == 4 and calls == 2  # 4 sessions in one call, then sessions[2]'s next frame
    assert isinstance(results[3], Exception) and "budget" in str(results[3]).lower()
    assert all(not isinstance(r, Exception) for r in results[:3])


def test_batch_decode_runs_overlapping_turns_as_one_forward(tiny):
    """Turns of four sessions (caches of different lengths, different max_tokens) narrating at
    once through one BatchDecode: the same texts and caches as turns decoded alone, with up to
    four rows per step; a reader that leaves early keeps the cache contract."""
    from framecast.engine.scheduler import BatchDecode
    from framecast.engine.session import StreamingSession, TurnDone
    from framecast.engine.worker import worker_for

    worker = worker_for(tiny)
    feats = _encode(tiny, [random_image(56, 56, seed=s) for s in range(4)])

    async def scenario(batched: bool):
        dec = BatchDecode(tiny) if batched else None
        sessions = [StreamingSession(tiny, worker=worker, decode=dec) for _ in range(4)]
        for i, s in enumerate(sessions):
            for k in range(i + 1):
                await s.add_frame(feats[k], float(k))

        async def one(i: int):
            async for ev in sessions[i].narrate("Describe it.", max_tokens=5 + 3 * i):
                if isinstance(ev, TurnDone):
                    return ev.text, ev.tokens

        async def leaves_early():  # reads two deltas, then breaks: the turn ends on the worker
            got = 0
            async for _ev in sessions[3].narrate("Describe it again.", max_tokens=20):
                got += 1
                if got == 2:
                    break

        texts = await asyncio.gather(*(one(i) for i in range(4)))
        await asyncio.gather(leaves_early(), one(0))
        after = await one(1)  # the session after an interrupted turn goes on as usual
        return texts, after, [s.core.offset for s in sessions], [len(s.core.spans) for s in sessions], dec

    alone = asyncio.run(scenario(False))
    together = asyncio.run(scenario(True))
    assert together[0] == alone[0] and together[1] == alone[1]
    assert together[3] == alone[3]
    assert together[2][:3] == alone[2][:3]  # session 3's interrupted turn may stop a token apart
    dec = together[4]
    assert dec.max_rows_seen == 4 and dec.rows > dec.calls


def test_batch_decode_failure_reaches_every_turn_in_the_batch_and_rolls_back(tiny):
    from framecast.engine.scheduler import BatchDecode
    from framecast.engine.session import StreamingSession
    from framecast.engine.worker import worker_for

    worker = worker_for(tiny)
    feats = _encode(tiny, [random_image(56, 56, seed=s) for s in range(2)])
    dec = BatchDecode(tiny)
    real_lm = dec.lm

    def broken(tokens, cache=None):
        if tokens.shape[0] > 1:
            raise RuntimeError("device lost")
        return real_lm(tokens, cache=cache)

    async def scenario():
        sessions = [StreamingSession(tiny, worker=worker, decode=dec) for _ in range(2)]
        for s, f in zip(sessions, feats):
            await s.add_frame(f, 0.0)
        before = [s.core.offset for s in sessions]
        dec.lm = broken

        async def one(s):
            async for _ev in s.narrate("Describe it.", max_tokens=8):
                pass

        results = await asyncio.gather(*(one(s) for s in sessions), return_exceptions=True)
        dec.lm = real_lm
        return results, before, [s.core.offset for s in sessions]

    results, before, after = asyncio.run(scenario())
    assert all(isinstance(r, RuntimeError) and "device lost" in str(r) for r in results), results
    assert after == before  # each turn rolled its own cache back


def test_batched_prefill_and_decode_with_quantised_caches_and_eviction(tmp_path):
    """Rows whose sessions differ in cache kind and budget (8-bit, 4-bit, evicting, plain) go
    through the batched prefill and decode like separate sessions: same texts, offsets and
    evictions."""
    from framecast.engine.scheduler import BatchDecode, BatchPrefill
    from framecast.engine.session import StreamingSession, TurnDone
    from framecast.engine.worker import worker_for
    from framecast.model.load import load_model

    make_tiny_minicpmv(tmp_path, "2.6", llm={"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32})
    model = load_model(str(tmp_path))
    worker = worker_for(model)
    feats = _encode(model, [random_image(56, 56, seed=s) for s in range(4)])

    async def run(batched: bool):
        dec = BatchDecode(model) if batched else None
        pre = BatchPrefill(model, worker=worker) if batched else None
        sessions = [StreamingSession(model, worker=worker, decode=dec, prefill=pre, kv_bits=bits, max_cache_tokens=cap)
                    for bits, cap in ((8, None), (None, 160), (4, 170), (None, None))]
        for k in range(6):
            await asyncio.gather(*(s.add_frame(feats[k % 4], float(k)) for s in sessions))

        async def one(s):
            async for ev in s.narrate("Describe it.", max_tokens=8):
                if isinstance(ev, TurnDone):
                    return ev.text

        texts = await asyncio.gather(*(one(s) for s in sessions))
        return texts, [s.core.offset for s in sessions], [s.core.evicted_total for s in sessions]

    alone, together = asyncio.run(run(False)), asyncio.run(run(True))
    assert together == alone
    assert alone[2][1] > 0 and alone[2][2] > 0  # the budgets did evict


def test_a_signal_noted_before_several_streams_start_stops_them_all():
    """`run_streams(early_signals=...)`: a Ctrl-C noted while the graphs were built
    (`runtime.noting_signals`) stops every stream once they run, as a signal during the run does."""
    import signal

    runs = [StreamRun(sid, None, Runtime(StallingSource(sid), [], stream_id=sid)) for sid in ("cam0", "cam1")]
    results = asyncio.run(asyncio.wait_for(run_streams(runs, handle_signals=False, early_signals=[signal.SIGINT]),
                                           30))
    assert {sid: (r.stopped_by, r.signal) for sid, r in results.items()} == {
        "cam0": ("signal", signal.SIGINT), "cam1": ("signal", signal.SIGINT)}
