"""The MQTT bus stage: publish the stream's events, take questions, survive broker faults.

Topics under `<prefix>` (default `framecast`), payloads are the events' JSON (`to_json()`):

    <prefix>/status                    retained Status online; the Last Will sets it offline
    <prefix>/<stream>/status           retained Status (starting, running, reconnecting, eof, …)
    <prefix>/<stream>/narration        Narration, QoS 1, last one retained
    <prefix>/<stream>/narration/partial  NarrationDelta, QoS 0, message expiry (MQTT 5)
    <prefix>/<stream>/event            SceneChange, Error and any other event, QoS 1
    <prefix>/<stream>/ask              questions in (JSON {"text", "request_id"} or plain text)
    <prefix>/<stream>/answer           Answer, QoS 1 (also sent to the MQTT 5 response topic)
    <prefix>/<stream>/metrics          Metrics, QoS 0, every metrics interval

Capture never waits for the broker: `process` only serialises the event into a bounded
outbox (`outbox.py`) and returns; a background task drains it while connected.
When the outbox is full, partial narrations go first, then superseded periodic messages
(metrics, status), then the oldest finals; every drop is counted in this stage's metrics
(`outbox_drops_<kind>`). An item leaves the outbox only after the broker acknowledged it, so
a broker restart loses no final narration (it may deliver one twice: deduplicate on
`narration_id`).

Files: this stage; mqtt_topics.py (topic layout, name and question validation, Home
Assistant discovery); mqtt_outbox.py; mqtt_client.py (the only file that touches aiomqtt);
mqtt_ask.py (`framecast ask`).
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import sys
import time
import uuid
from typing import AsyncIterator

from framecast import __version__
from framecast.config import MqttConfig
from framecast.errors import FatalError, UserError
from framecast.events import (Answer, EndOfStream, Error, Event, Frame, Metrics, Narration, NarrationDelta, Question,
                             Status, Stop, utc_now)
from framecast.runtime import Stage
from framecast.stages.mqtt.ask import ask_over_mqtt  # noqa: F401  (`framecast ask` imports it from here)
from framecast.stages.mqtt.client import (BrokerAddress, BusClient, BusDisconnected, BusMessage, BusProtocolRejected,
                                BusRefused, TlsFiles, parse_mqtt_url)
from framecast.stages.mqtt.outbox import FINAL, PARTIAL, PERIODIC, Outbox, Outgoing
from framecast.stages.mqtt.topics import (JSON, REQUEST_ID_RE, QuestionRejected, Topics, ha_discovery, parse_question,
                                valid_response_topic, validate_prefix, validate_stream_id)

FIRST_CONNECT_WAIT_S = 2.0  # start() waits this long for a verdict (auth errors fail fast)
FPS_WINDOW_S = 5.0


class MqttStage(Stage):
    """Publishes events to MQTT and injects questions from `<prefix>/<stream>/ask`."""

    name = "mqtt"

    def __init__(self, cfg: MqttConfig, *, stream_id: str, name: str | None = None,
                 first_connect_wait_s: float = FIRST_CONNECT_WAIT_S):
        super().__init__(name=name)
        if not cfg.url:
            raise UserError("mqtt.url is not set")
        self.cfg = cfg
        self.topics = Topics(validate_prefix(cfg.prefix), validate_stream_id(stream_id))
        validate_prefix(cfg.ha_prefix, "mqtt.ha_prefix")
        self.address: BrokerAddress = parse_mqtt_url(cfg.url)
        self.tls = TlsFiles(cfg.ca_file, cfg.cert_file, cfg.key_file, cfg.insecure)
        if self.address.tls:
            self.tls.check()
        self.client_id = cfg.client_id or f"framecast-{stream_id}-{uuid.uuid4().hex[:6]}"
        self.first_connect_wait_s = first_connect_wait_s
        self.outbox = Outbox(cfg.outbox_size)
        self._protocol = cfg.protocol
        self._client: BusClient | None = None
        self._connected = asyncio.Event()
        self._verdict = asyncio.Event()  # first connect attempt finished (either way)
        self._wake = asyncio.Event()  # cuts a backoff sleep short (at close)
        self._fatal: str | None = None
        self._conn_task: asyncio.Task | None = None
        self._closing = False
        self._started = False
        self._stopped = False
        self._pending: collections.OrderedDict[str, tuple[str | None, bytes | None, float]] = collections.OrderedDict()
        self._frame_times: collections.deque[float] = collections.deque()
        self._stream_status = Status(state="starting", stream_id=stream_id)
        self._counters = collections.Counter({"published": 0, "connects": 0, "questions": 0,
                                              "questions_rejected": 0, "answers": 0})
        self._last_error = ""

    # -- lifecycle

    async def start(self) -> None:
        self._conn_task = asyncio.create_task(self._connection_loop(), name="mqtt-connection")
        try:
            await asyncio.wait_for(self._verdict.wait(), timeout=self.first_connect_wait_s)
        except asyncio.TimeoutError:
            pass  # a slow broker: keep trying in the background, capture must not wait
        if self._fatal:
            raise FatalError(self._fatal)
        self._started = True
        self._update_metrics()

    async def process(self, item: Event) -> AsyncIterator[Event]:
        self._publish_event(item)
        yield item

    async def on_control(self, msg: Event) -> AsyncIterator[Event]:
        if isinstance(msg, Stop):
            self._stopped = True
        yield msg

    async def on_end(self) -> AsyncIterator[Event]:
        # `stopping` is set for every stop from outside (signal, Stop, fatal); a natural end is eof
        stopped = self._stopped or (self.handle is not None and self.handle.stopping.is_set())
        self._set_stream_status("stopped" if stopped else "eof")
        return
        yield  # pragma: no cover

    async def close(self) -> None:
        """Flush finals (bounded), publish `offline`, disconnect cleanly."""
        self._closing = True
        self._wake.set()  # a reconnect sleeping in backoff tries again now
        deadline = time.monotonic() + self.cfg.close_timeout_s
        # finals still queued get until the deadline, even across a reconnect
        while self.outbox and not self._fatal and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        client = self._client if self._connected.is_set() else None
        if client is not None:
            offline = Status(state="offline", text="stopped", stream_id=self.topics.stream)
            try:
                await client.publish(self._status_message(self._stream_status), timeout_s=1.0)
                await client.publish(self._global_status_message(offline), timeout_s=1.0)
            except BusDisconnected:
                pass
        if self._conn_task is not None:
            self._conn_task.cancel()
            await asyncio.gather(self._conn_task, return_exceptions=True)
        self.outbox.discard_all("unsent_at_close")  # what could not be sent in time is counted, not hidden
        self._update_metrics()

    # -- events -> outbox

    def _publish_event(self, item: Event) -> None:
        t = self.topics
        if isinstance(item, Frame):
            self._on_frame()
        elif isinstance(item, NarrationDelta):
            self._enqueue(t.partial, item, "partial", PARTIAL, qos=0, expiry_s=self.cfg.partial_expiry_s)
        elif isinstance(item, Narration):
            self._enqueue(t.narration, item, "narration", FINAL, qos=1, retain=True)
        elif isinstance(item, Answer):
            self._send_answer(item)
        elif isinstance(item, Status):
            self._stream_status = item
            self._enqueue(t.stream_status, item, "status", PERIODIC, qos=1, retain=True)
        elif isinstance(item, Metrics):
            self._expire_questions()
            self._update_metrics()
            self._enqueue(t.metrics, item, "metrics", PERIODIC, qos=0)
            self._set_stream_status(self._stream_status.state)  # refresh fps / drops
        elif isinstance(item, EndOfStream) or item.control:
            pass
        else:  # SceneChange, Error and whatever else the graph grows
            if isinstance(item, Error) and item.fatal:
                self._set_stream_status("error", text=item.text)
            self._enqueue(t.event, item, "event", FINAL, qos=1)
        self._update_metrics()

    def _enqueue(self, topic: str, event: Event, kind: str, priority: int, *, qos: int, retain: bool = False,
                 expiry_s: int | None = None) -> None:
        msg = BusMessage(topic, event.to_json().encode(), qos=qos, retain=retain, content_type=JSON, expiry_s=expiry_s)
        self.outbox.put(Outgoing(msg, kind, priority))

    def _on_frame(self) -> None:
        now = time.monotonic()
        self._frame_times.append(now)
        while self._frame_times and now - self._frame_times[0] > FPS_WINDOW_S:
            self._frame_times.popleft()
        if self._stream_status.state in ("starting", "reconnecting"):
            self._set_stream_status("running")

    def _fps(self) -> float | None:
        if len(self._frame_times) < 2:
            return None
        span = self._frame_times[-1] - self._frame_times[0]
        return round((len(self._frame_times) - 1) / span, 2) if span > 0 else None

    def _set_stream_status(self, state: str, *, text: str = "") -> None:
        drops = self.handle.frames_dropped() if self.handle else None
        prev = self._stream_status
        # keep what the source said (duration, reconnects, …); refresh state, rate, drops, time
        self._stream_status = prev.model_copy(update={
            "state": state, "text": text or (prev.text if prev.state == state else ""), "fps": self._fps(),
            "drops": drops, "ts": utc_now(), "stream_id": self.topics.stream})
        self._enqueue(self.topics.stream_status, self._stream_status, "status", PERIODIC, qos=1, retain=True)

    def _status_message(self, status: Status) -> BusMessage:
        return BusMessage(self.topics.stream_status, status.to_json().encode(), qos=1, retain=True, content_type=JSON)

    def _global_status_message(self, status: Status) -> BusMessage:
        return BusMessage(self.topics.status, status.to_json().encode(), qos=1, retain=True, content_type=JSON)

    def _update_metrics(self) -> None:
        ex = self.metrics.extra
        ex["outbox_depth"] = len(self.outbox)
        ex["outbox_max_depth"] = self.outbox.max_depth
        ex["outbox_drops"] = sum(v for k, v in self.outbox.drops.items() if k != "expired")
        for kind, n in self.outbox.drops.items():
            ex[f"outbox_drops_{kind}"] = n
        ex["connected"] = 1 if self._connected.is_set() else 0
        ex["reconnects"] = max(0, self._counters["connects"] - 1)
        for k in ("published", "questions", "questions_rejected", "answers"):
            ex[k] = self._counters[k]
        ex["questions_pending"] = len(self._pending)

    # -- questions and answers

    async def _on_question(self, m: BusMessage) -> None:
        if m.retain:  # a retained question would be re-asked on every reconnect
            return
        reply_to = m.response_topic if valid_response_topic(m.response_topic) else None
        corr = m.correlation
        fallback_id = None
        if corr is not None:
            text = corr.decode("ascii", "replace")
            fallback_id = text if REQUEST_ID_RE.match(text) else None
        self._counters["questions"] += 1
        try:
            text, request_id = parse_question(m.payload, max_bytes=self.cfg.max_question_bytes)
        except QuestionRejected as e:
            self._reject(e.request_id or fallback_id, str(e), reply_to, corr)
            return
        request_id = request_id or fallback_id or uuid.uuid4().hex[:12]
        if request_id in self._pending:
            self._reject(request_id, f"request_id {request_id!r} is already pending", reply_to, corr, text)
            return
        if len(self._pending) >= self.cfg.max_pending_questions:
            self._reject(request_id, f"busy: {len(self._pending)} questions pending", reply_to, corr, text)
            return
        if self.handle is None or self._closing:
            self._reject(request_id, "stream is stopping", reply_to, corr, text)
            return
        self._pending[request_id] = (reply_to, corr, time.monotonic())
        await self.handle.inject(Question(text=text, request_id=request_id, reply_to=reply_to, correlation=corr,
                                           stream_id=self.topics.stream))

    def _reject(self, request_id: str | None, reason: str, reply_to: str | None, corr: bytes | None,
                question: str = "") -> None:
        self._counters["questions_rejected"] += 1
        rid = request_id or uuid.uuid4().hex[:12]
        self._send_answer(Answer(text="", error=reason, request_id=rid, question=question[:200],
                                 stream_id=self.topics.stream), route=(reply_to, corr))

    def _send_answer(self, answer: Answer, route: tuple[str | None, bytes | None] | None = None) -> None:
        if route is None:
            reply_to, corr, _ = self._pending.pop(answer.request_id, (None, None, 0.0))
        else:
            reply_to, corr = route
        payload = answer.to_json().encode()
        self._counters["answers"] += 1
        self.outbox.put(Outgoing(BusMessage(self.topics.answer, payload, qos=1, content_type=JSON,
                                            correlation=corr), "answer", FINAL))
        if reply_to and reply_to != self.topics.answer:
            self.outbox.put(Outgoing(BusMessage(reply_to, payload, qos=1, content_type=JSON, correlation=corr),
                                     "answer", FINAL))
        self._update_metrics()

    def _expire_questions(self) -> None:
        now = time.monotonic()
        while self._pending:
            rid, (reply_to, corr, t0) = next(iter(self._pending.items()))
            if now - t0 < self.cfg.question_timeout_s:
                break
            del self._pending[rid]
            self._reject(rid, f"not answered within {self.cfg.question_timeout_s:g} s", reply_to, corr)

    # -- connection

    def _backoff(self, attempt: int) -> float:
        # exponential with "equal jitter": never hammers a recovering broker in lockstep
        base = min(self.cfg.reconnect_max_s, self.cfg.reconnect_initial_s * (2 ** min(attempt, 16)))
        return base / 2 + random.uniform(0, base / 2)

    async def _connection_loop(self) -> None:
        attempt = 0
        while not self._fatal:
            protocol = "3.1.1" if self._protocol == "3.1.1" else "5"
            will = Status(state="offline", text="connection lost", stream_id=self.topics.stream)
            client = BusClient(self.address, client_id=self.client_id, protocol=protocol, tls=self.tls,
                               keepalive_s=self.cfg.keepalive_s, will=self._global_status_message(will),
                               timeout_s=self.cfg.publish_timeout_s)
            try:
                await client.connect()
                if self._protocol == "auto":
                    self._protocol = protocol  # remember what this broker speaks
                attempt = 0
                await self._serve(client)
            except BusProtocolRejected as e:
                if self._protocol == "auto" and protocol == "5":
                    self._protocol = "3.1.1"  # an MQTT 3.1.1 broker: retry at once in its dialect
                    continue
                self._fail(f"mqtt: {e}")
                return
            except BusRefused as e:
                self._fail(f"mqtt: {e}")
                return
            except BusDisconnected as e:
                if not self._last_error and not self._closing:  # one line per outage, not per attempt
                    print(f"framecast: mqtt: {self.address.display()}: {e}; retrying in the background",
                          file=sys.stderr, flush=True)
                self._last_error = str(e)
            except UserError as e:  # TLS files that cannot be loaded
                self._fail(str(e))
                return
            except Exception as e:  # a bug must stop the run loudly, not leave a silent dead bus
                self._fail(f"mqtt: unexpected {type(e).__name__}: {e}")
                return
            finally:
                self._connected.clear()
                self._client = None
                self._update_metrics()
                await client.disconnect(timeout_s=1.0 if self._closing else None)
            self._verdict.set()
            if self._closing and not self.outbox:
                return
            if self._closing:  # flushing at exit: retry briskly until close() gives up
                await asyncio.sleep(0.1)
            else:
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=self._backoff(attempt))
                except asyncio.TimeoutError:
                    pass
            attempt += 1

    def _fail(self, message: str) -> None:
        self._fatal = message
        self._verdict.set()
        if self._started and self.handle is not None:  # before that, start() raises it
            self.handle.fail(message)

    async def _serve(self, client: BusClient) -> None:
        """One connected session: announce, subscribe, then drain and listen until it drops."""
        online = Status(state="online", text=f"framecast {__version__}", stream_id=self.topics.stream)
        await client.publish(self._global_status_message(online))
        await client.publish(self._status_message(self._stream_status))
        if self.cfg.ha_discovery:
            topic, config = ha_discovery(self.topics, self.cfg.ha_prefix)
            await client.publish(BusMessage(topic, json.dumps(config).encode(), qos=1, retain=True, content_type=JSON))
        await client.subscribe(self.topics.ask, qos=1)
        self._client = client
        if self._last_error:
            print(f"framecast: mqtt: connected to {self.address.display()} again", file=sys.stderr, flush=True)
            self._last_error = ""
        self._counters["connects"] += 1
        self._connected.set()
        self._verdict.set()
        self._update_metrics()
        tasks = [asyncio.create_task(self._drain(client)), asyncio.create_task(self._listen(client))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()  # re-raise BusDisconnected / BusRefused
            raise BusDisconnected("session ended")
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _drain(self, client: BusClient) -> None:
        while True:
            item = await self.outbox.head()
            now = time.monotonic()
            remaining = item.remaining_expiry(now)
            if remaining is not None and remaining < 1:
                self.outbox.discard(item, "expired")  # a stale partial is worse than none
                continue
            msg = item.msg
            if remaining is not None and remaining != msg.expiry_s:
                msg = BusMessage(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain, content_type=msg.content_type,
                                 expiry_s=remaining, response_topic=msg.response_topic, correlation=msg.correlation)
            await client.publish(msg, timeout_s=self.cfg.publish_timeout_s)
            self.outbox.done(item)
            self._counters["published"] += 1

    async def _listen(self, client: BusClient) -> None:
        async for m in client.messages():
            if m.topic == self.topics.ask:
                try:
                    await self._on_question(m)
                except Exception as e:  # one bad question must never end the session
                    print(f"framecast: mqtt: question handling failed: {type(e).__name__}: {e}", file=sys.stderr)
                self._update_metrics()
