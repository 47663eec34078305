"""Faults on the bus (issue 13), each against a real mosquitto: a broker packet limit, a broker
that comes up late, messages still queued at exit, re-published status numbering, and the
JSONL and the bus seeing the same event stream."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from broker import Broker, Recorder
from framecast.config import ChangeConfig, MqttConfig, SourceConfig
from framecast.events import (Answer, Event, Narration, NarrationDelta, Question, QuestionRecord, SceneChange,
                              Status)
from framecast.runtime import Runtime, Source, Stage
from framecast.stages.change import ChangeDetector
from framecast.stages.mqtt.client import BusClient, BusMessage, parse_mqtt_url
from framecast.stages.mqtt.stage import POISON_LIMIT, MqttStage
from framecast.stages.outputs import JsonlOutput
from framecast.stages.sources import make_source

STREAM = "cam1"
P = "ff"
LIMIT = 330  # the broker: demo narrations are 313-355 bytes


def topic(leaf: str) -> str:
    return f"{P}/{STREAM}/{leaf}"


def bus_cfg(url: str, **kw) -> MqttConfig:
    base = dict(url=url, prefix=P, reconnect_initial_s=0.05, reconnect_max_s=0.3, publish_timeout_s=2.0,
                close_timeout_s=3.0)
    base.update(kw)
    return MqttConfig(**base)


class Script(Source):
    """Plays a list of events (narrations, statuses) with a pause between them, then ends."""

    def __init__(self, events: list[Event], *, pause: float = 0.02):
        super().__init__(name="script")
        self.events, self.pause = events, pause

    async def frames(self):
        for ev in self.events:
            if self.stopping.is_set():
                return
            yield ev
            await asyncio.sleep(self.pause)


def narration(text: str, i: int) -> Narration:
    return Narration(text=text, stream_id=STREAM, seq=i, pts=float(i), pts_start=i - 0.5, pts_end=float(i))


def packet_size(n: Narration, protocol: str) -> int:
    client = BusClient(parse_mqtt_url("mqtt://127.0.0.1:1"), client_id="size", protocol=protocol)
    return client.packet_size(BusMessage(topic("narration"), n.to_json().encode(), qos=1, retain=True,
                                         content_type="application/json"))


def mixed_narrations(protocol: str, n: int = 12) -> tuple[list[Narration], set[str], set[str]]:
    """Every third narration is too large for LIMIT, the rest fit (checked, not assumed)."""
    events, small, large = [], set(), set()
    for i in range(n):
        nar = narration("x" * 80 if i % 3 == 1 else f"n{i}", i)
        (large if i % 3 == 1 else small).add(nar.narration_id)
        assert (packet_size(nar, protocol) > LIMIT) == (nar.narration_id in large)
        events.append(nar)
    return events, small, large


# ---------------------------------------------------------------- 1. a broker packet limit


@pytest.mark.parametrize("protocol,configured", [("5", None), ("3.1.1", LIMIT), ("3.1.1", None)],
                         ids=["v5-announced", "v311-configured", "v311-unknown-limit"])
def test_messages_over_the_broker_packet_limit_are_dropped_counted_and_never_block(tmp_path, capsys, protocol,
                                                                                   configured):
    """The broker's limit comes from the MQTT 5 CONNACK, from `mqtt.max_packet_size`, or (3.1.1,
    not configured) from the broker closing the connection on the same message POISON_LIMIT
    times. Either way every message that fits is delivered, in order, and each one that cannot
    is dropped, counted and announced once."""
    b = Broker(tmp_path / "b", extra=[f"max_packet_size {LIMIT}"]).start()
    rec = Recorder(b.port, [f"{P}/#"])
    events, small, large = mixed_narrations(protocol)
    bus = MqttStage(bus_cfg(b.url, protocol=protocol, max_packet_size=configured), stream_id=STREAM)
    runtime = Runtime(Script([Status(state="running", text="script"), *events]), [bus], stream_id=STREAM)
    try:
        result = asyncio.run(asyncio.wait_for(runtime.run(handle_signals=False), 60))
        assert result.exit_code == 0, result.errors
        assert rec.wait_for(lambda ms: {m.json()["narration_id"] for m in ms if m.topic == topic("narration")} >= small, 5)
        got = [m.json()["narration_id"] for m in rec.on(topic("narration"))]
        assert set(got) == small and got == [e.narration_id for e in events if e.narration_id in small]
        m = result.metrics["mqtt"]
        reason = "refused" if (protocol == "3.1.1" and configured is None) else "too_large"
        assert m[f"outbox_drops_{reason}"] == len(large) and m["undelivered"] == len(large)
        if reason == "too_large":
            assert m["reconnects"] == 0  # refused before sending: the connection never suffers
        else:
            assert m["reconnects"] <= POISON_LIMIT * len(large)
        err = capsys.readouterr().err.splitlines()
        warnings = [ln for ln in err if "dropped a" in ln]
        assert len(warnings) == 1 and "narration" in warnings[0], warnings
        # and at exit one line with the count (nothing else: a dropped connection that comes
        # straight back is counted in `reconnects`, not announced)
        assert len(err) == 2 and err[1].startswith(f"framecast: mqtt: {len(large)} messages not delivered"), err
        # the last stream status says how many were not delivered
        final = rec.on(topic("status"))[-1].json()
        assert final["state"] == "eof" and final["undelivered"] == len(large)
    finally:
        rec.close()
        b.stop()


# ---------------------------------------------------------------- 2. a broker that comes up late


def test_late_broker_gets_each_retained_state_once_in_order_and_a_first_connection_line(tmp_path, capsys):
    """framecast starts with no broker; the run ends (eof) before the broker comes up; the
    queued messages go out during the bounded flush at exit. A subscriber whose session the
    broker kept (persistence) sees every message the broker took, in order."""
    b = Broker(tmp_path / "b", persistence=True).start()
    rec = Recorder(b.port, [f"{P}/#"], client_id="late-watch", persistent=True)
    rec.close()
    b.stop()  # down: the recorder's session (its subscription) is kept on disk
    events = [Status(state="running", text="script", stream_id=STREAM, seq=0)]
    events += [narration(f"n{i}", i) for i in range(5)]
    bus = MqttStage(bus_cfg(b.url, close_timeout_s=8.0), stream_id=STREAM, first_connect_wait_s=0.2)
    runtime = Runtime(Script(events, pause=0.1), [bus], stream_id=STREAM)

    async def scenario():
        task = asyncio.create_task(runtime.run(handle_signals=False))
        await asyncio.sleep(1.5)  # the run has ended by now; close() is flushing
        await asyncio.to_thread(b.start)
        return await task

    try:
        result = asyncio.run(asyncio.wait_for(scenario(), 30))
        assert result.exit_code == 0
        rec = Recorder(b.port, [f"{P}/#"], client_id="late-watch", persistent=True)
        assert rec.wait_for(lambda ms: any(m.topic == f"{P}/status" and m.json()["state"] == "offline" for m in ms), 10)
        err = capsys.readouterr().err
        # (the recorder re-subscribing also replays the retained messages: not what framecast sent)
        statuses = [m.json() for m in rec.on(topic("status")) if not m.retain]
        seqs = [s["seq"] for s in statuses]
        assert seqs == sorted(seqs) and seqs[0] > 0, (seqs, err)  # in order, numbered
        # each state once: a repeat is only ever a re-publish after a reconnect (same message)
        distinct = {s["seq"]: s for s in statuses}
        assert all(s == distinct[s["seq"]] for s in statuses), (statuses, err)
        states = [s["state"] for s in distinct.values()]
        assert states.count("eof") == 1 and states[-1] == "eof" and len(states) == len(set(states)), (states, err)
        ts = [s["ts"] for s in distinct.values()]
        assert ts == sorted(ts)  # in time order
        got = [m.json()["narration_id"] for m in rec.on(topic("narration")) if not m.retain]
        # all, in order (at least once: a message on the wire when a connection drops is sent again)
        assert list(dict.fromkeys(got)) == [e.narration_id for e in events[1:]], err
        assert len(got) == len(set(got)) or result.metrics["mqtt"]["reconnects"] > 0, err
        assert f"connected to {b.url}\n" in err, err  # the first connection is not "again"
        if not result.metrics["mqtt"]["reconnects"]:
            assert len(statuses) == len(distinct) and "again" not in err, (statuses, err)
        assert "not delivered" not in err
    finally:
        rec.close()
        b.stop()


# ---------------------------------------------------------------- 3. queued at exit


def test_messages_queued_for_a_broker_that_never_came_are_reported_at_exit(tmp_path, capsys):
    b = Broker(tmp_path / "never")  # never started
    events = [narration(f"n{i}", i) for i in range(4)]
    bus = MqttStage(bus_cfg(b.url, close_timeout_s=0.3), stream_id=STREAM, first_connect_wait_s=0.1)
    result = asyncio.run(Runtime(Script(events), [bus], stream_id=STREAM).run(handle_signals=False))
    assert result.exit_code == 0  # the run itself is complete; the line says what the bus lost
    m = result.metrics["mqtt"]
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "not delivered" in ln]
    assert m["undelivered"] == m["outbox_drops_unsent_at_close"] >= 5  # 4 narrations + the status
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"framecast: mqtt: {m['undelivered']:.0f} messages not delivered to {b.url}")
    assert "4 narration" in lines[0] and "never connected" in lines[0]


# ---------------------------------------------------------------- status numbering


def test_status_republished_after_a_broker_restart_keeps_its_own_nonzero_seq(tmp_path):
    b = Broker(tmp_path / "b").start()  # no persistence: after a restart the retained status is gone
    rec = Recorder(b.port, [topic("status")])
    source = make_source(SourceConfig(uri="demo", stream_id=STREAM, fps=20.0, width=32, height=32, realtime=True))
    bus = MqttStage(bus_cfg(b.url), stream_id=STREAM)
    runtime = Runtime(source, [bus], stream_id=STREAM)

    async def scenario():
        task = asyncio.create_task(runtime.run(handle_signals=False))
        await asyncio.to_thread(rec.wait_for, lambda ms: any(m.json()["state"] == "running" for m in ms), 10)
        before = len(rec.messages)
        await asyncio.to_thread(b.restart, 0.2)
        await asyncio.to_thread(rec.wait_for, lambda ms: len(ms) > before and bus._connected.is_set(), 10)
        runtime.request_stop("stop")
        return await task, before

    try:
        (result, before), = [asyncio.run(asyncio.wait_for(scenario(), 30))]
        assert result.exit_code == 0
        statuses = [m.json() for m in rec.messages]
        assert all(s["seq"] > 0 for s in statuses), [s["seq"] for s in statuses]
        seqs = [s["seq"] for s in statuses]
        assert seqs == sorted(seqs)  # a re-publish repeats its state's number, never goes back to 0
        assert statuses[before]["seq"] >= statuses[before - 1]["seq"]
    finally:
        rec.close()
        b.stop()


# ---------------------------------------------------------------- 6. files and bus: one stream


class Narrator(Stage):
    """Stands in for the decoder: narrations with partials, questions recorded then answered."""

    name = "narrator"
    answers_questions = True

    def __init__(self):
        super().__init__()
        self.frames = 0

    async def process(self, item):
        yield item
        if isinstance(item, SceneChange):
            n = Narration(text=f"change at {item.pts}", stream_id=STREAM, pts=item.pts)
            yield NarrationDelta(text=n.text, narration_id=n.narration_id, stream_id=STREAM, pts=item.pts)
            yield n

    async def on_control(self, msg):
        if not isinstance(msg, Question):
            yield msg
            return
        # as the decode stage: the question is consumed, outputs get its record, then the answer
        yield QuestionRecord(text=msg.text, request_id=msg.request_id, stream_id=STREAM, ts=msg.ts)
        yield Answer(text=f"you asked: {msg.text}", request_id=msg.request_id, question=msg.text, stream_id=STREAM)


def test_jsonl_and_bus_see_the_same_event_stream(tmp_path):
    b = Broker(tmp_path / "b").start()
    rec = Recorder(b.port, [f"{P}/#"])
    out = tmp_path / "o.jsonl"
    bus = MqttStage(bus_cfg(b.url, max_question_bytes=64), stream_id=STREAM)
    source = make_source(SourceConfig(uri="demo", stream_id=STREAM, fps=20.0, width=64, height=64, realtime=True))
    stages = [ChangeDetector(ChangeConfig()), Narrator(), JsonlOutput(str(out)), bus]
    runtime = Runtime(source, stages, stream_id=STREAM, metrics_interval=0.3)

    async def scenario():
        task = asyncio.create_task(runtime.run(handle_signals=False))
        while not bus._connected.is_set():
            await asyncio.sleep(0.02)
        rec.publish(topic("ask"), json.dumps({"text": "what is red?", "request_id": "good-1"}))
        rec.publish(topic("ask"), "{not json")  # rejected: its answer must reach the JSONL too
        rec.publish(topic("ask"), json.dumps({"request_id": "big-1", "text": "x" * 100}))
        rec.publish(topic("ask"), json.dumps({"text": "again?", "request_id": "good-2"}))
        await asyncio.to_thread(rec.wait_for, lambda ms: len([m for m in ms if m.topic == topic("answer")]) >= 4, 10)
        await asyncio.sleep(0.5)
        runtime.request_stop("stop")
        return await task

    try:
        result = asyncio.run(asyncio.wait_for(scenario(), 40))
        assert result.exit_code == 0
        assert rec.wait_for(lambda ms: any(m.topic == f"{P}/status" and m.json()["state"] == "offline" for m in ms), 5)
        lines = [json.loads(ln) for ln in out.read_text().splitlines()]
        assert lines[-1]["type"] == "eos" and lines[-1]["text"] == "stop"
        bus_events = [m.json() for m in rec.messages
                      if m.topic in (topic("narration"), topic("event"), topic("answer"), topic("metrics"))]
        compared = ("narration", "change", "answer", "question", "error", "metrics")
        in_file = [d for d in lines if d["type"] in compared]
        on_bus = [d for d in bus_events if d["type"] in compared]
        key = lambda d: (d["type"], d["seq"], d["ts"], d.get("text"), d.get("request_id"))  # noqa: E731
        assert sorted(map(json.dumps, in_file)) == sorted(map(json.dumps, on_bus))
        assert len(in_file) == len({key(d) for d in in_file})
        kinds = {d["type"] for d in in_file}
        assert {"narration", "change", "answer", "question", "metrics"} <= kinds
        answers = {d["request_id"]: d for d in in_file if d["type"] == "answer"}
        assert answers["good-1"]["error"] is None and "too large" in answers["big-1"]["error"]
        assert sum(1 for d in answers.values() if d["error"] and "JSON" in d["error"]) == 1
        assert [d["request_id"] for d in in_file if d["type"] == "question"] == ["good-1", "good-2"]
        # the source's statuses reach the bus too (as the bus's own numbered states)
        file_states = [(d["state"], d["text"]) for d in lines if d["type"] == "status"]
        bus_states = [(d["state"], d["text"]) for d in (m.json() for m in rec.on(topic("status")))]
        assert set(file_states) <= set(bus_states)
    finally:
        rec.close()
        b.stop()


def test_a_stream_without_a_model_rejects_questions_at_once(tmp_path):
    b = Broker(tmp_path / "b").start()
    rec = Recorder(b.port, [topic("answer")])
    source = make_source(SourceConfig(uri="demo", stream_id=STREAM, fps=20.0, width=32, height=32, realtime=True))
    bus = MqttStage(bus_cfg(b.url), stream_id=STREAM)
    runtime = Runtime(source, [bus], stream_id=STREAM)

    async def scenario():
        task = asyncio.create_task(runtime.run(handle_signals=False))
        while not bus._connected.is_set():
            await asyncio.sleep(0.02)
        t0 = time.monotonic()
        rec.publish(topic("ask"), json.dumps({"text": "anyone?", "request_id": "q1"}))
        ok = await asyncio.to_thread(rec.wait_for, lambda ms: len(ms) >= 1, 5)
        took = time.monotonic() - t0
        runtime.request_stop("stop")
        await task
        return ok, took

    try:
        ok, took = asyncio.run(scenario())
        assert ok and took < 2
        a = rec.messages[0].json()
        assert a["request_id"] == "q1" and "capture only" in a["error"]
    finally:
        rec.close()
        b.stop()


# ---------------------------------------------------------------- a negative PUBACK


class RefusingBroker:
    """A minimal MQTT 5 broker (asyncio) that refuses, with PUBACK reason 0x99 (payload format
    invalid), every QoS 1 PUBLISH whose payload contains b"BAD", and accepts the rest. mosquitto
    never sends a negative PUBACK, other brokers do (quotas, ACLs, payload checks)."""

    def __init__(self):
        self.accepted: list[tuple[str, bytes]] = []
        self.refused: list[tuple[str, bytes]] = []
        self.port = 0

    async def start(self) -> "RefusingBroker":
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @staticmethod
    async def _packet(reader) -> tuple[int, bytes]:
        head = (await reader.readexactly(1))[0]
        length, shift = 0, 0
        while True:
            b = (await reader.readexactly(1))[0]
            length += (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        return head, await reader.readexactly(length)

    @staticmethod
    def _skip_props(body: bytes, i: int) -> int:
        length, shift = 0, 0
        while True:
            b = body[i]
            i += 1
            length += (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return i + length

    async def _client(self, reader, writer) -> None:
        try:
            while True:
                head, body = await self._packet(reader)
                kind = head >> 4
                if kind == 1:  # CONNECT -> CONNACK, success, no properties
                    writer.write(b"\x20\x03\x00\x00\x00")
                elif kind == 3:  # PUBLISH
                    qos = (head >> 1) & 3
                    n = int.from_bytes(body[:2], "big")
                    topic, i = body[2:2 + n].decode(), 2 + n
                    pid = body[i:i + 2]
                    i = self._skip_props(body, i + (2 if qos else 0))
                    payload = body[i:]
                    bad = b"BAD" in payload
                    (self.refused if bad else self.accepted).append((topic, payload))
                    if qos == 1:
                        writer.write(b"\x40\x04" + pid + (b"\x99" if bad else b"\x00") + b"\x00")
                elif kind == 8:  # SUBSCRIBE -> SUBACK granting QoS 1 to each filter
                    pid, i = body[:2], self._skip_props(body, 2)
                    filters = 0
                    while i < len(body):
                        i += 2 + int.from_bytes(body[i:i + 2], "big") + 1
                        filters += 1
                    writer.write(bytes([0x90, 3 + filters]) + pid + b"\x00" + b"\x01" * filters)
                elif kind == 12:  # PINGREQ
                    writer.write(b"\xd0\x00")
                elif kind == 14:  # DISCONNECT
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        self._server.close()


def test_a_message_refused_in_its_puback_is_dropped_and_the_rest_flow(capsys):
    async def scenario():
        broker = await RefusingBroker().start()
        events = [narration("BAD" if i == 2 else f"n{i}", i) for i in range(6)]
        bus = MqttStage(bus_cfg(f"mqtt://127.0.0.1:{broker.port}", protocol="5"), stream_id=STREAM)
        result = await Runtime(Script(events), [bus], stream_id=STREAM).run(handle_signals=False)
        await broker.stop()
        return broker, events, result

    broker, events, result = asyncio.run(asyncio.wait_for(scenario(), 30))
    got = [json.loads(p)["narration_id"] for t, p in broker.accepted if t == topic("narration")]
    assert got == [e.narration_id for i, e in enumerate(events) if i != 2]  # in order, none blocked
    m = result.metrics["mqtt"]
    assert m["outbox_drops_refused"] == 1 and m["undelivered"] == 1 and m["reconnects"] == 0
    err = capsys.readouterr().err
    assert err.count("dropped a") == 1 and "reason code 0x99" in err, err


def test_each_stream_state_is_published_once_on_a_connected_run(tmp_path):
    """The source says `running` and `eof`; the bus stage must not repeat them (its own end of
    stream `eof`, its close) — each state once, numbered."""
    b = Broker(tmp_path / "b").start()
    rec = Recorder(b.port, [topic("status")])
    source = make_source(SourceConfig(uri="demo", stream_id=STREAM, fps=20.0, width=32, height=32, max_frames=10,
                                      realtime=True))
    bus = MqttStage(bus_cfg(b.url), stream_id=STREAM)
    try:
        result = asyncio.run(asyncio.wait_for(Runtime(source, [bus], stream_id=STREAM).run(handle_signals=False), 30))
        assert result.exit_code == 0
        assert rec.wait_for(lambda ms: any(m.json()["state"] == "eof" for m in ms), 5)
        time.sleep(0.2)
        statuses = [m.json() for m in rec.messages if not m.retain]
        states = [s["state"] for s in statuses]
        # (a state still waiting when the next one comes is replaced by it: at most once each)
        assert len(states) == len(set(states)) and states[-1] == "eof", states
        assert [s["seq"] for s in statuses] == sorted({s["seq"] for s in statuses})
    finally:
        rec.close()
        b.stop()


def test_ask_with_a_question_too_large_for_the_broker_says_so_in_one_line(tmp_path, capsys):
    from framecast.stages.mqtt.ask import ask_over_mqtt

    b = Broker(tmp_path / "b", extra=[f"max_packet_size {LIMIT}"]).start()
    try:
        rc = ask_over_mqtt(b.url, STREAM, "why? " * 100, prefix=P, timeout=2)
        err = capsys.readouterr().err.strip()
        assert rc == 1 and len(err.splitlines()) == 1 and "maximum packet size" in err, err
    finally:
        b.stop()
