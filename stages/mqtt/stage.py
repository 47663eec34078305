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

Faults of the bus itself: a message the broker can never take (larger than its Maximum
Packet Size — announced in the MQTT 5 CONNACK, or `max_packet_size` for 3.1.1 — or refused in
a PUBACK) is dropped and counted, one warning line, and never blocks the ones behind it; a
message on which the broker closed the connection `POISON_LIMIT` times in a row counts as
refused too. The retained stream status is coalesced in the outbox (only its latest state
waits) and carries the stage's own `seq`. What is still queued at exit is counted in one
stderr line and in `undelivered` (metrics, and the final status).

Files and bus see one event stream: the decoder's record of each question (`question`, on
`event`) and every answer, including the error answers to refused questions, pass through the
graph, so JSONL records them too.

Files: this stage; topics.py (topic layout, name and question validation, Home Assistant
discovery); questions.py (checks, timeouts and answer routes); outbox.py; client.py (the only
file that touches aiomqtt); ask.py (`framecast ask`).
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import sys
import time
import uuid
from typing import AsyncIterator, Callable

from framecast import __version__
from framecast.config import MqttConfig
from framecast.errors import FatalError, UserError
from framecast.events import (Answer, EndOfStream, Error, Event, Frame, Metrics, Narration, NarrationDelta, Question,
                             Status, Stop, utc_now)
from framecast.runtime import Stage
from framecast.stages.mqtt.ask import ask_over_mqtt  # noqa: F401  (`framecast ask` imports it from here)
from framecast.stages.mqtt.client import (BrokerAddress, BusClient, BusDisconnected, BusMessage, BusProtocolRejected,
                                          BusPublishRefused, BusRefused, TlsFiles, parse_mqtt_url)
from framecast.stages.mqtt.outbox import FINAL, PARTIAL, PERIODIC, Outbox, Outgoing
from framecast.stages.mqtt.questions import QuestionDesk, Route
from framecast.stages.mqtt.topics import JSON, Topics, ha_discovery, validate_prefix, validate_stream_id

FIRST_CONNECT_WAIT_S = 2.0  # start() waits this long for a verdict (auth errors fail fast)
FPS_WINDOW_S = 5.0
POISON_LIMIT = 3  # the broker dropped the connection this often on one message: it refuses it
CLOSE_CANCEL_GRACE_S = 1.5  # the connection task's clean disconnect at exit

# why a message was not delivered, as the exit line says it (outbox drop reason -> words)
_DROP_WORDS = {"too_large": "too large for the broker", "refused": "refused by the broker",
               "unsent_at_close": "still queued at exit"}


class MqttStage(Stage):
    """Publishes events to MQTT and injects questions from `<prefix>/<stream>/ask`."""

    name = "mqtt"
    #: several streams in one process share `<prefix>/status`: the composition root sets this
    #: (True while another stream's connection is still up) so only the last one says offline
    others_running: Callable[[], bool] | None = None

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
        self.questions = QuestionDesk(cfg, stream_id, post=self._post_answer)
        self._frame_times: collections.deque[float] = collections.deque()
        self._stream_status = Status(state="starting", stream_id=stream_id)
        self._counters = collections.Counter({"published": 0, "connects": 0})
        self._last_error = ""  # the outage reported on stderr (cleared once connected)
        self._dropped = ""  # why the last session ended (reported only if the outage lasts)
        self._status_seq = 0  # this stage's own numbering of <prefix>/<stream>/status
        self._publishing: Outgoing | None = None  # the message on the wire (poison detection)
        self._poison: tuple[Outgoing | None, int] = (None, 0)
        self._warned: set[str] = set()

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
        if isinstance(item, Metrics):
            await self.questions.expire(self.handle)
        self._publish_event(item)
        yield item

    async def on_control(self, msg: Event) -> AsyncIterator[Event]:
        if isinstance(msg, Stop):
            self._stopped = True
        elif isinstance(msg, Question):  # the files record it (JSONL): so does the bus
            self._enqueue(self.topics.event, msg, "event", FINAL, qos=1)
            self._update_metrics()
        yield msg

    async def on_end(self) -> AsyncIterator[Event]:
        self.questions.close()
        # `stopping` is set for every stop from outside (signal, Stop, fatal); a natural end is eof
        stopped = self._stopped or (self.handle is not None and self.handle.stopping.is_set())
        if self._stream_status.state != "error":  # a fatal error's status stays the last word
            self._set_stream_status("stopped" if stopped else "eof")
        return
        yield  # pragma: no cover

    async def close(self) -> None:
        """Flush what is queued (bounded by `close_timeout_s`), publish `offline`, disconnect
        cleanly; count what could not be sent (one stderr line, `undelivered`). Safe to cancel:
        the counting and the disconnect happen on the way out either way."""
        self._closing = True
        self._wake.set()  # a reconnect sleeping in backoff tries again now
        self.questions.close()
        try:
            deadline = time.monotonic() + self.cfg.close_timeout_s
            for _ in range(2):  # the final status, with its counts up to date once the flush is done
                if not self._fatal:
                    self._set_stream_status(self._stream_status.state)  # no message if nothing changed
                # what is queued gets until the deadline, even across a reconnect
                while self.outbox and not self._fatal and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
            client = self._client if self._connected.is_set() else None
            # several streams share <prefix>/status: the last one to close says offline
            last_stream = self.others_running is None or not self.others_running()
            if client is not None and not self.outbox and last_stream:
                offline = Status(state="offline", text="stopped", stream_id=self.topics.stream)
                try:
                    await client.publish(self._global_status_message(offline), timeout_s=1.0)
                except (BusDisconnected, BusPublishRefused):
                    pass
        finally:
            waiting = self.outbox.kinds()
            self.outbox.discard_all("unsent_at_close")  # what could not be sent in time is counted, not hidden
            self._report_undelivered(waiting)
            self._update_metrics()
            if self._conn_task is not None:
                self._conn_task.cancel()
                await asyncio.wait([self._conn_task], timeout=CLOSE_CANCEL_GRACE_S)

    def _undelivered(self) -> int:
        """Messages that will never reach the broker (expired partials are not counted: they
        are worthless by then, which is why they expire)."""
        return sum(v for k, v in self.outbox.drops.items() if k != "expired")

    def _report_undelivered(self, waiting: collections.Counter[str]) -> None:
        total = self._undelivered()
        if not total:
            return
        parts = []
        for reason, n in sorted(self.outbox.drops.items(), key=lambda kv: -kv[1]):
            if reason == "expired" or not n:
                continue
            words = _DROP_WORDS.get(reason, f"{reason} dropped from the full outbox")
            if reason == "unsent_at_close":
                what = ", ".join(f"{c} {k}" for k, c in waiting.most_common())
                why = "never connected" if not self._counters["connects"] else "not connected at exit"
                words += f" ({what}; {why})" if what else f" ({why})"
            parts.append(f"{n} {words}")
        sent = self._counters["published"]
        print(f"framecast: mqtt: {total} message{'s' if total != 1 else ''} not delivered to "
              f"{self.address.display()} ({sent} delivered): {'; '.join(parts)}", file=sys.stderr, flush=True)

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
            self.questions.send(item)
        elif isinstance(item, Status):
            self._put_status(item.model_copy(update={"undelivered": self._undelivered()}))
        elif isinstance(item, Metrics):
            self._update_metrics()
            self._enqueue(t.metrics, item, "metrics", PERIODIC, qos=0)
            self._set_stream_status(self._stream_status.state, refresh=True)  # fresh fps / drops
        elif isinstance(item, EndOfStream) or item.control:
            pass
        else:  # SceneChange, Error and whatever else the graph grows
            if isinstance(item, Error) and item.fatal:
                self._set_stream_status("error", text=item.text)
            self._enqueue(t.event, item, "event", FINAL, qos=1)
        self._update_metrics()

    def _enqueue(self, topic: str, event: Event, kind: str, priority: int, *, qos: int, retain: bool = False,
                 expiry_s: int | None = None, key: str | None = None) -> None:
        msg = BusMessage(topic, event.to_json().encode(), qos=qos, retain=retain, content_type=JSON, expiry_s=expiry_s)
        self.outbox.put(Outgoing(msg, kind, priority, key=key))

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

    def _set_stream_status(self, state: str, *, text: str = "", refresh: bool = False) -> None:
        """A new stream status when the state, its text or `undelivered` changes; the rate and
        drops alone only on a `refresh` (each metrics interval). So each state is published once
        (the source's `eof` is not repeated by ours) and figures stay fresh."""
        drops = self.handle.frames_dropped() if self.handle else None
        prev = self._stream_status
        # keep what the source said (duration, reconnects, …); refresh state, rate, drops, time
        update = {"state": state, "text": text or (prev.text if prev.state == state else ""), "fps": self._fps(),
                  "drops": drops, "undelivered": self._undelivered()}
        changed = {k for k, v in update.items() if getattr(prev, k) != v}
        if prev.seq and not (changed & {"state", "text", "undelivered"} or (refresh and changed)):
            return
        self._put_status(prev.model_copy(update={**update, "ts": utc_now()}))

    def _put_status(self, status: Status) -> None:
        """Number it (this stage's own `seq`: the topic merges the source's states and ours) and
        queue it; a status still waiting in the outbox is replaced (retained: latest state only)."""
        self._status_seq += 1
        self._stream_status = status.model_copy(update={"seq": self._status_seq, "stream_id": self.topics.stream})
        self._queue_stream_status()

    def _queue_stream_status(self) -> None:
        t = self.topics.stream_status
        self._enqueue(t, self._stream_status, "status", PERIODIC, qos=1, retain=True, key=t)

    def _will_message(self) -> BusMessage:
        """The Last Will: `offline` on `<prefix>/status`, compact — no `ts` (the broker sends it
        later, at a time we cannot know) and no unset fields. It travels inside every CONNECT,
        which must stay under small broker packet limits (mosquitto `max_packet_size 330`)."""
        will = Status(state="offline", text="connection lost", stream_id=self.topics.stream).to_dict()
        compact = {k: v for k, v in will.items() if v is not None and k != "ts"}
        return BusMessage(self.topics.status, json.dumps(compact, separators=(",", ":")).encode(), qos=1, retain=True,
                          content_type=JSON)

    def _global_status_message(self, status: Status) -> BusMessage:
        return BusMessage(self.topics.status, status.to_json().encode(), qos=1, retain=True, content_type=JSON)

    def _update_metrics(self) -> None:
        ex = self.metrics.extra
        ex["outbox_depth"] = len(self.outbox)
        ex["outbox_max_depth"] = self.outbox.max_depth
        ex["outbox_drops"] = ex["undelivered"] = self._undelivered()
        ex["outbox_superseded"] = self.outbox.superseded
        for kind, n in self.outbox.drops.items():
            ex[f"outbox_drops_{kind}"] = n
        ex["connected"] = 1 if self._connected.is_set() else 0
        ex["reconnects"] = max(0, self._counters["connects"] - 1)
        ex["published"] = self._counters["published"]
        ex.update(self.questions.counts)
        ex["questions_pending"] = len(self.questions.pending)

    # -- answers

    def _post_answer(self, answer: Answer, route: Route) -> None:
        """Publish an answer (the desk decides the route): the stream's answer topic, and the
        question's MQTT 5 response topic with its correlation data."""
        reply_to, corr = route
        payload = answer.to_json().encode()
        self.outbox.put(Outgoing(BusMessage(self.topics.answer, payload, qos=1, content_type=JSON,
                                            correlation=corr), "answer", FINAL))
        if reply_to and reply_to != self.topics.answer:
            self.outbox.put(Outgoing(BusMessage(reply_to, payload, qos=1, content_type=JSON, correlation=corr),
                                     "answer", FINAL))
        self._update_metrics()

    # -- connection

    def _backoff(self, attempt: int) -> float:
        # exponential with "equal jitter": never hammers a recovering broker in lockstep
        base = min(self.cfg.reconnect_max_s, self.cfg.reconnect_initial_s * (2 ** min(attempt, 16)))
        return base / 2 + random.uniform(0, base / 2)

    async def _connection_loop(self) -> None:
        attempt = 0
        while not self._fatal:
            protocol = "3.1.1" if self._protocol == "3.1.1" else "5"
            client = BusClient(self.address, client_id=self.client_id, protocol=protocol, tls=self.tls,
                               keepalive_s=self.cfg.keepalive_s, will=self._will_message(),
                               timeout_s=self.cfg.publish_timeout_s)
            client.max_packet_size = self.cfg.max_packet_size
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
                self._check_poison()
                if self._connected.is_set():
                    # a session ended: a line only if reconnecting fails too (an outage, not a blip
                    # such as a broker closing the connection on a message; `reconnects` counts all)
                    self._dropped = str(e)
                else:
                    if not self._last_error and not self._closing:  # one line per outage, not per attempt
                        print(f"framecast: mqtt: {self.address.display()}: {self._dropped or e}; "
                              "retrying in the background", file=sys.stderr, flush=True)
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
        if self._closing:  # the run has ended already: what it produced stands, say why the rest did not go
            print(f"framecast: {message} (while sending what was queued at exit)", file=sys.stderr, flush=True)
        elif self._started and self.handle is not None:  # before that, start() raises it
            self.handle.fail(message)

    def _check_poison(self) -> None:
        """The connection dropped while a message was on the wire. The same message, POISON_LIMIT
        times in a row: the broker refuses it (e.g. an MQTT 3.1.1 broker's packet limit, which
        it does not announce) — drop it so that the ones behind it go."""
        item, self._publishing = self._publishing, None
        if item is None:
            return
        last, n = self._poison
        n = n + 1 if item is last else 1
        self._poison = (item, n)
        if n >= POISON_LIMIT:
            self._poison = (None, 0)
            self.outbox.discard(item, "refused")
            self._warn_drop("refused", item, f"the broker closed the connection {n} times while taking it "
                                             "(a packet size limit? set mqtt.max_packet_size)")

    def _warn_drop(self, reason: str, item: Outgoing, why: str) -> None:
        """One line for the first message dropped for `reason`; later ones are only counted."""
        self._update_metrics()
        if reason in self._warned:
            return
        self._warned.add(reason)
        print(f"framecast: mqtt: dropped a {len(item.msg.payload)}-byte {item.kind} message to {item.msg.topic}: "
              f"{why}; further ones are counted (outbox_drops_{reason}, undelivered)", file=sys.stderr, flush=True)

    async def _serve(self, client: BusClient) -> None:
        """One connected session: announce, subscribe, then drain and listen until it drops."""
        online = Status(state="online", text=f"framecast {__version__}", stream_id=self.topics.stream)
        await self._publish_now(client, Outgoing(self._global_status_message(online), "status", PERIODIC))
        # the stream's retained status goes through the outbox: it replaces a waiting older one,
        # and leaves after what was queued before it (states arrive once and in order)
        if self._stream_status.seq:
            self._queue_stream_status()
        else:
            self._put_status(self._stream_status)
        if self.cfg.ha_discovery:
            topic, config = ha_discovery(self.topics, self.cfg.ha_prefix)
            await self._publish_now(client, Outgoing(BusMessage(topic, json.dumps(config).encode(), qos=1, retain=True,
                                                                content_type=JSON), "discovery", PERIODIC))
        await client.subscribe(self.topics.ask, qos=1)
        self._client = client
        if self._last_error:  # a first connection after failures, or a reconnection: say which
            again = " again" if self._counters["connects"] else ""
            print(f"framecast: mqtt: connected to {self.address.display()}{again}", file=sys.stderr, flush=True)
            self._last_error = ""
        self._dropped = ""
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

    async def _publish_now(self, client: BusClient, item: Outgoing) -> None:
        """Publish outside the outbox (connection announcements); one the broker refuses for good
        is counted and skipped like any other."""
        try:
            await client.publish(item.msg, timeout_s=self.cfg.publish_timeout_s)
            self._counters["published"] += 1
        except BusPublishRefused as e:
            self.outbox.drops[e.kind] += 1
            self._warn_drop(e.kind, item, str(e))

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
            self._publishing = item
            try:
                await client.publish(msg, timeout_s=self.cfg.publish_timeout_s)
            except BusPublishRefused as e:  # never deliverable: it must not block the ones behind it
                self._publishing = None
                self.outbox.discard(item, e.kind)
                self._warn_drop(e.kind, item, str(e))
                continue
            self._publishing = None
            if self._poison[0] is item:
                self._poison = (None, 0)
            self.outbox.done(item)
            self._counters["published"] += 1

    async def _listen(self, client: BusClient) -> None:
        async for m in client.messages():
            if m.topic == self.topics.ask:
                try:
                    await self.questions.take(m, self.handle)
                except Exception as e:  # one bad question must never end the session
                    print(f"framecast: mqtt: question handling failed: {type(e).__name__}: {e}", file=sys.stderr)
                self._update_metrics()
