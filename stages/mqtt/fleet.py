"""What every fleet worker shares (`framecast worker`, jobs and `--streams`): one MQTT 5
connection with backoff, a retained presence under `<prefix>/workers/<id>` whose Last Will says
`offline`, signal handling, a refusal to run twice under one id, and reading retained state.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import sys
import uuid
from typing import Any

from framecast.config import RunConfig
from framecast.errors import UserError
from framecast.stages.mqtt.client import (BrokerAddress, BusClient, BusDisconnected, BusMessage, BusProtocolRejected,
                                          BusPublishRefused,
                                          BusRefused, TlsFiles, parse_mqtt_url)
from framecast.stages.mqtt.jobs import DEFAULT_RETAIN_S, FleetTopics, validate_name, worker_status
from framecast.stages.mqtt.topics import JSON, validate_prefix

RETAINED_READ_TIMEOUT_S = 5.0
DEFAULT_SESSION_EXPIRY_S = 3600
DEFAULT_KEEPALIVE_S = 10  # a worker lost without a FIN is noticed after 1.5 x this


async def read_retained(client: BusClient, topic_filter: str) -> dict[str, bytes]:
    """The retained messages under `topic_filter` now (topic -> payload). The broker sends them
    right after the SUBACK, so a probe published after it arrives after all of them."""
    probe = f"framecast-probe/{uuid.uuid4().hex}"
    await client.subscribe(topic_filter, qos=1)
    await client.subscribe(probe, qos=0)
    await client.publish(BusMessage(probe, b"", qos=1))
    out: dict[str, bytes] = {}

    async def read() -> None:
        async for m in client.messages():
            if m.topic == probe:
                return
            if m.retain and m.payload:
                out[m.topic] = m.payload

    try:
        await asyncio.wait_for(read(), timeout=RETAINED_READ_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise BusDisconnected(f"the broker did not return the retained state of {topic_filter} in time") from None
    await client.unsubscribe(topic_filter)
    await client.unsubscribe(probe)
    return out


def member_info(payload: bytes) -> dict[str, Any]:
    """A retained `<prefix>/workers/<id>` payload as a dict ({} when cleared or unreadable)."""
    try:
        info = json.loads(payload) if payload else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def default_worker_id() -> str:
    host = "".join(c if c.isalnum() or c in "_.-" else "-" for c in socket.gethostname())[:48] or "worker"
    return host


class FleetMember:
    """What jobs and stream workers share: one MQTT 5 connection with backoff, a retained
    presence under `<prefix>/workers/<id>` whose Last Will says `offline`, signal handling."""

    role = "member"

    def __init__(self, base: RunConfig, *, url: str, group: str, worker_id: str, prefix: str,
                 tls: TlsFiles | None = None, keepalive_s: int = DEFAULT_KEEPALIVE_S,
                 session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S, retain_s: int = DEFAULT_RETAIN_S):
        self.base = base
        self.url = url
        self.address: BrokerAddress = parse_mqtt_url(url)
        self.tls = tls or TlsFiles()
        if self.address.tls:
            self.tls.check()
        self.group = validate_name(group, "--group")
        self.worker_id = validate_name(worker_id, "--worker-id")
        self.topics = FleetTopics(validate_prefix(prefix, "--prefix"))
        self.keepalive_s = keepalive_s
        self.session_expiry_s = session_expiry_s
        self.retain_s = retain_s
        self.client: BusClient | None = None
        self.stopping = asyncio.Event()
        self.signal: int | None = None
        self._outage = ""

    # -- to override

    def client_options(self) -> dict[str, Any]:
        return {}

    async def on_connected(self, client: BusClient) -> None:
        """Subscribe (after every reconnect)."""

    async def on_message(self, client: BusClient, m: BusMessage) -> None:
        """One incoming message."""

    async def on_stop(self) -> None:
        """Stop what runs (first signal)."""

    def presence(self) -> dict[str, Any]:
        return {}

    # -- shared machinery

    def log(self, text: str) -> None:
        print(f"framecast: worker {self.worker_id}: {text}", file=sys.stderr, flush=True)

    def _presence_message(self, state: str, text: str = "") -> BusMessage:
        fields = {"group": self.group, "role": self.role, "host": socket.gethostname(), "pid": os.getpid(),
                  "session_expiry_s": self.session_expiry_s, "text": text}
        if state == "online":
            fields.update(self.presence())
        return BusMessage(self.topics.worker(self.worker_id), worker_status(self.worker_id, state, **fields),
                          qos=1, retain=True, content_type=JSON)

    async def announce(self) -> None:
        """Refresh the retained presence (job or streams changed); never raises."""
        if self.client is not None:
            try:
                await self.client.publish(self._presence_message("online"))
            except (BusDisconnected, BusPublishRefused):  # presence is advisory: the next refresh tries again
                pass

    async def publish(self, topic: str, payload: bytes, *, retain: bool = True) -> None:
        if self.client is None:
            raise BusDisconnected("not connected")
        await self.client.publish(BusMessage(topic, payload, qos=1, retain=retain, content_type=JSON,
                                             expiry_s=self.retain_s if retain else None))

    def _on_signal(self, sig: int) -> None:
        if self.signal is None:
            self.signal = sig
            self.stopping.set()
            asyncio.ensure_future(self.on_stop())
        else:  # a second signal: stop waiting for anything
            os._exit(128 + sig)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        attempt, announced = 0, False
        try:
            try:
                await self._check_unique()
            except UserError as e:
                print(f"framecast: {e}", file=sys.stderr, flush=True)
                return 2
            while not self.stopping.is_set():
                will = self._presence_message("offline", "connection lost")
                client = BusClient(self.address, client_id=f"framecast-{self.role}-{self.worker_id}", protocol="5",
                                   tls=self.tls, keepalive_s=self.keepalive_s, will=will, **self.client_options())
                try:
                    await client.connect()
                    self.client = client
                    await client.publish(self._presence_message("online"))
                    await self.on_connected(client)
                    if not announced:
                        self.log(f"online in group {self.group!r} at {self.address.display()} ({self.role})")
                        announced = True
                    elif self._outage:
                        self.log(f"connected to {self.address.display()} again")
                    self._outage, attempt = "", 0
                    await self._serve(client)
                except BusProtocolRejected:
                    self.log(f"{self.address.display()} does not speak MQTT 5 (shared subscriptions need it)")
                    return 1
                except BusRefused as e:
                    print(f"framecast: mqtt: {e}", file=sys.stderr, flush=True)
                    return 1
                except BusDisconnected as e:
                    if not self._outage:
                        self.log(f"{self.address.display()}: {e}; retrying in the background")
                    self._outage = str(e)
                finally:
                    if self.stopping.is_set() and self.client is client:
                        await self.on_stop()  # what this worker runs ends before it says offline
                        try:
                            await client.publish(self._presence_message("offline", "stopped"), timeout_s=1.0)
                        except BusDisconnected:
                            pass
                    self.client = None
                    await client.disconnect(timeout_s=1.0)
                if not self.stopping.is_set():
                    base = min(10.0, 0.5 * 2 ** min(attempt, 8))
                    try:
                        await asyncio.wait_for(self.stopping.wait(), timeout=base / 2 + random.uniform(0, base / 2))
                    except asyncio.TimeoutError:
                        pass
                    attempt += 1
        finally:
            await self.on_stop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        self.log("stopped")
        return 0

    def _probe_client(self) -> BusClient:
        """A short-lived connection for reading retained state."""
        return BusClient(self.address, client_id=f"framecast-probe-{uuid.uuid4().hex[:8]}", protocol="5", tls=self.tls)

    async def _check_unique(self) -> None:
        """Two live workers with one id would take each other's session over and over: refuse
        to start when this host already runs a worker of this id. Asked on a connection of its
        own (connecting with the worker's client id would already take the session over)."""
        probe = self._probe_client()
        try:
            await probe.connect()
            topic = self.topics.worker(self.worker_id)
            seen = (await read_retained(probe, topic)).get(topic)
        except (BusDisconnected, BusRefused, BusProtocolRejected):
            return  # the main loop reports what is wrong with the broker
        finally:
            await probe.disconnect(timeout_s=1.0)
        try:
            info = json.loads(seen) if seen else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            return
        pid = info.get("pid") if isinstance(info, dict) else None
        if (info.get("state") == "online" and info.get("host") == socket.gethostname() and isinstance(pid, int)
                and pid != os.getpid() and _alive(pid)):
            raise UserError(f"worker id {self.worker_id!r} is already running on this host (pid {pid}); "
                            "give each worker its own --worker-id")

    async def _serve(self, client: BusClient) -> None:
        messages = client.messages()
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            while True:
                nxt = asyncio.ensure_future(messages.__anext__())
                done, _ = await asyncio.wait({nxt, stop}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    await asyncio.gather(nxt, return_exceptions=True)
                    return
                try:
                    m = nxt.result()
                except StopAsyncIteration:
                    raise BusDisconnected("connection closed") from None
                await self.on_message(client, m)
                if self.stopping.is_set():
                    return
        finally:
            stop.cancel()
