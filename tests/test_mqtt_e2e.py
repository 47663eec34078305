"""End to end on the bus with the real decoder: demo source -> change -> encode -> decode
(tiny MiniCPM-V, fp32) -> mqtt. Narrations arrive in order with their partials, and a question
sent with `framecast ask`'s client is answered by the model through the response topic."""

from __future__ import annotations

import asyncio

import pytest

from broker import Broker, Recorder
from framecast.config import ChangeConfig, MqttConfig, NarrationConfig, SourceConfig
from framecast.events import Narration
from framecast.runtime import Runtime
from framecast.testing import make_tiny_minicpmv

STREAM = "e2e"
P = "fce"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from framecast.model.load import load_model

    d = tmp_path_factory.mktemp("tiny-2.6")
    make_tiny_minicpmv(d, "2.6")
    return load_model(str(d))


def test_decoder_narrations_and_answers_over_mqtt(tmp_path, tiny_model, capsys):
    from framecast.engine.session import StreamingSession
    from framecast.stages.change import ChangeDetector
    from framecast.stages.decode import DecodeStage
    from framecast.stages.encode import EncodeStage
    from framecast.stages.mqtt.stage import MqttStage, ask_over_mqtt
    from framecast.stages.sources import make_source

    b = Broker(tmp_path / "broker").start()
    rec = Recorder(b.port, [f"{P}/#"])
    session = StreamingSession(tiny_model)
    decode = DecodeStage(session, NarrationConfig(policy="interval", interval_s=1.0, max_tokens=4), stream_id=STREAM)
    bus = MqttStage(MqttConfig(url=b.url, prefix=P), stream_id=STREAM)
    source = make_source(SourceConfig(uri="demo", stream_id=STREAM, fps=4.0, width=56, height=56, realtime=True))
    stages = [ChangeDetector(ChangeConfig()), EncodeStage(tiny_model, worker=session.worker), decode, bus]
    runtime = Runtime(source, stages, stream_id=STREAM)

    async def scenario():
        task = asyncio.create_task(runtime.run(handle_signals=False))
        while decode.frames_added < 6:
            await asyncio.sleep(0.05)
        rc = await asyncio.to_thread(ask_over_mqtt, b.url, STREAM, "What do you see?", prefix=P, timeout=20)
        while decode.narrations < 3:
            await asyncio.sleep(0.05)
        runtime.request_stop("stop")
        return rc, await task

    try:
        rc, result = asyncio.run(asyncio.wait_for(scenario(), 60))
        assert rc == 0 and result.exit_code == 0, result.errors
        printed = capsys.readouterr().out.strip()
        assert rec.wait_for(lambda ms: sum(m.topic == f"{P}/{STREAM}/narration" for m in ms) >= decode.narrations, 5)
        nars = [m.json() for m in rec.on(f"{P}/{STREAM}/narration")]
        assert [n["seq"] for n in nars] == sorted(n["seq"] for n in nars)  # in order
        for n in nars:
            Narration.model_validate(n)  # the documented schema round-trips
            deltas = [m.json()["text"] for m in rec.on(f"{P}/{STREAM}/narration/partial")
                      if m.json()["narration_id"] == n["narration_id"]]
            assert "".join(deltas).strip() == n["text"]
        answers = [m.json() for m in rec.on(f"{P}/{STREAM}/answer")]
        assert len(answers) == 1 and answers[0]["error"] is None and answers[0]["question"] == "What do you see?"
        assert answers[0]["text"] == printed and answers[0]["cache_tokens"] > 0
        # the decoder's record of the question went out too (the JSONL gets the same event)
        asked = [m.json() for m in rec.on(f"{P}/{STREAM}/event") if m.json()["type"] == "question"]
        assert [(q["request_id"], q["text"]) for q in asked] == [(answers[0]["request_id"], "What do you see?")]
        reply = [m for m in rec.messages if m.topic.startswith(f"{P}/{STREAM}/answer/")]
        assert len(reply) == 1 and reply[0].props["CorrelationData"] == answers[0]["request_id"].encode()
    finally:
        rec.close()
        b.stop()
