"""The one place that talks to the MQTT client library (aiomqtt 2.x on paho-mqtt 2.x).

Everything above this file speaks `BrokerAddress`, `BusMessage`, `BusClient` and three
exceptions, so changing the client library later touches only this file:

- `BusRefused`: the broker (or TLS) said no for a reason retrying cannot fix (bad user or
  password, not authorised, certificate rejected) — the caller treats it as fatal;
- `BusProtocolRejected`: the broker does not speak the MQTT version we offered (the caller
  falls back from 5 to 3.1.1);
- `BusDisconnected`: anything transient (refused socket, reset, timeout) — retry later;
- `BusPublishRefused`: this one message can never be delivered (larger than the broker's
  Maximum Packet Size, or an MQTT 5 PUBACK reason code >= 0x80); the connection is fine and
  the caller drops the message and goes on with the next.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Literal
from urllib.parse import unquote, urlsplit

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from framecast.errors import UserError
from framecast.redact import redact_url

DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
DEFAULT_TIMEOUT_S = 5.0  # CONNACK / SUBACK / PUBACK wait

# MQTT 5 CONNACK/SUBACK reason codes and MQTT 3.1.1 CONNACK return codes we must not retry.
_V5_REFUSED = {134: "bad user name or password", 135: "not authorised (check the user name and password)", 138: "banned",
               140: "bad authentication method", 133: "client identifier not valid"}
_V5_PROTOCOL = {132}  # unsupported protocol version
_V3_REFUSED = {2: "client identifier rejected", 4: "bad user name or password",
               5: "not authorised (check the user name and password)"}
_V3_PROTOCOL = {1}  # unacceptable protocol version

Protocol = Literal["5", "3.1.1"]

# paho logs every dropped socket as a warning; with no logging configured Python would print
# those on stderr. Connection state is reported by the stage (one line per outage) instead.
LOG = logging.getLogger("framecast.mqtt")
LOG.addHandler(logging.NullHandler())


class BusRefused(Exception):
    """Permanent refusal (credentials, authorisation, TLS trust): retrying will not help."""


class BusProtocolRejected(Exception):
    """The broker rejected the MQTT protocol version we offered."""


class BusDisconnected(Exception):
    """The connection failed or dropped for a transient reason."""


class BusPublishRefused(Exception):
    """The broker will never take this message. `kind`: `too_large` (checked before sending,
    against the broker's Maximum Packet Size) or `refused` (a negative MQTT 5 PUBACK)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def _varint_len(n: int) -> int:
    """Bytes of MQTT's variable byte integer encoding of n."""
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


# the mid of the last PUBLISH paho sent from the current asyncio task (to find its PUBACK)
_LAST_MID: contextvars.ContextVar[int | None] = contextvars.ContextVar("framecast_mqtt_last_mid", default=None)


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None

    def display(self) -> str:
        """The URL without the password (safe to print and log)."""
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def parse_mqtt_url(url: str) -> BrokerAddress:
    """`mqtt://[user[:pass]@]host[:port]` or `mqtts://…`; user and password may be %-escaped."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise UserError(f"mqtt url {_redact(url)!r}: {e}") from None
    if parts.scheme not in ("mqtt", "mqtts"):
        raise UserError(f"mqtt url {_redact(url)!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise UserError(f"mqtt url {_redact(url)!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UserError(f"mqtt url {_redact(url)!r}: unexpected path or query (use mqtt://user:pass@host:port)")
    tls = parts.scheme == "mqtts"
    return BrokerAddress(
        host=parts.hostname,
        port=port or (DEFAULT_TLS_PORT if tls else DEFAULT_PORT),
        tls=tls,
        username=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def _redact(url: str) -> str:
    """Hide the password of a URL in error messages (the one rule: framecast.redact)."""
    return redact_url(url)


@dataclass(frozen=True)
class TlsFiles:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False  # skip certificate and host name checks (testing only)

    def check(self) -> None:
        """Fail early, with the file named, instead of deep inside a connect attempt."""
        for key, path in (("mqtt.ca_file", self.ca_file), ("mqtt.cert_file", self.cert_file),
                          ("mqtt.key_file", self.key_file)):
            if path and not Path(path).is_file():
                raise UserError(f"{key} = {path!r}: file not found")
        if self.key_file and not self.cert_file:
            raise UserError("mqtt.key_file is set but mqtt.cert_file is not")

    def context(self) -> ssl.SSLContext:
        self.check()
        try:
            ctx = ssl.create_default_context(cafile=self.ca_file)
            if self.cert_file:
                ctx.load_cert_chain(self.cert_file, self.key_file)
        except (ssl.SSLError, OSError) as e:
            raise UserError(f"mqtt TLS files (ca={self.ca_file}, cert={self.cert_file}): {e}") from None
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


@dataclass(frozen=True)
class BusMessage:
    """One MQTT message, library-neutral. MQTT 5 properties are ignored on 3.1.1."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    content_type: str | None = None
    expiry_s: int | None = None
    response_topic: str | None = None
    correlation: bytes | None = None
    mid: int | None = None  # packet id of a received QoS 1 message (for `BusClient.ack`)


def _properties(msg: BusMessage, packet: int) -> Properties | None:
    props = Properties(packet)
    empty = True
    if msg.content_type:
        props.ContentType, empty = msg.content_type, False
    if msg.expiry_s is not None:
        props.MessageExpiryInterval, empty = max(1, int(msg.expiry_s)), False
    if msg.response_topic:
        props.ResponseTopic, empty = msg.response_topic, False
    if msg.correlation is not None:
        props.CorrelationData, empty = msg.correlation, False
    return None if empty else props


def _drop_socket(client: aiomqtt.Client) -> None:
    """Close the socket of a connect attempt that failed after TCP connected (no or a negative
    CONNACK): aiomqtt leaves it open and registered with the loop, which leaks one socket per
    attempt against a hung broker (measured: +1 fd per retry)."""
    paho_client = client._client  # noqa: SLF001  (the wrapper is the one place that knows aiomqtt)
    if paho_client.socket() is not None:
        paho_client._sock_close()  # noqa: SLF001  (fires on_socket_close: aiomqtt unregisters it)


def _reason(rc: object) -> tuple[int, str]:
    """(numeric code, text) for a paho ReasonCode (MQTT 5) or an int return code (3.1.1)."""
    value = getattr(rc, "value", rc)
    try:
        return int(value), str(getattr(rc, "getName", lambda: rc)())
    except (TypeError, ValueError):
        return -1, str(rc)


class BusClient:
    """One connection to a broker: connect, publish, subscribe, iterate incoming messages.

    Not reusable across connections: make a new one per attempt (the caller's reconnect loop
    owns backoff). `will` is published by the broker if this connection dies uncleanly.
    """

    def __init__(
        self,
        address: BrokerAddress,
        *,
        client_id: str,
        protocol: Protocol = "5",
        tls: TlsFiles | None = None,
        keepalive_s: int = 30,
        will: BusMessage | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        persistent_session: bool = False,
        session_expiry_s: int = 3600,
        receive_maximum: int | None = None,
        manual_ack: bool = False,
    ):
        self.address = address
        self.client_id = client_id
        self.protocol: Protocol = protocol
        self.tls = tls or TlsFiles()
        self.keepalive_s = keepalive_s
        self.will = will
        self.timeout_s = timeout_s
        # a subscriber that must not miss QoS 1 messages while it reconnects (the broker
        # queues them for its client id); the stage itself always starts clean
        self.persistent_session = persistent_session
        self.session_expiry_s = session_expiry_s
        # MQTT 5: at most this many unacknowledged QoS 1 messages in flight to us (job workers: 1)
        self.receive_maximum = receive_maximum
        # acknowledge received QoS 1 messages only when `ack` is called (the broker keeps them
        # in the session until then and sends them again after a reconnect)
        self.manual_ack = manual_ack
        self._client: aiomqtt.Client | None = None
        #: the broker's Maximum Packet Size from its MQTT 5 CONNACK (None: not announced)
        self.broker_max_packet_size: int | None = None
        #: a limit the caller knows (config; the only source for MQTT 3.1.1 brokers)
        self.max_packet_size: int | None = None
        self._pubacks: dict[int, object] = {}  # mid -> PUBACK reason code

    @property
    def packet_limit(self) -> int | None:
        """The largest PUBLISH packet (bytes) this broker takes, if known."""
        limits = [x for x in (self.broker_max_packet_size, self.max_packet_size) if x]
        return min(limits) if limits else None

    def packet_size(self, msg: BusMessage) -> int:
        """Size in bytes of the PUBLISH packet for `msg` (fixed header included): what a
        broker's Maximum Packet Size is compared with (MQTT 5 section 3.1.2.11.4)."""
        size = 2 + len(msg.topic.encode()) + (2 if msg.qos else 0) + len(msg.payload)
        if self.is_v5:
            props = _properties(msg, PacketTypes.PUBLISH)
            size += len(props.pack()) if props is not None else 1  # pack() includes its length
        return 1 + _varint_len(size) + size

    def _hook(self, client: aiomqtt.Client) -> None:
        """aiomqtt drops the CONNACK properties and PUBACK reason codes: catch them on the way."""
        paho_client = client._client  # noqa: SLF001
        on_connect, on_publish, publish = paho_client.on_connect, paho_client.on_publish, paho_client.publish

        def connect_hook(c, userdata, flags, rc, props=None):  # type: ignore[no-untyped-def]
            size = getattr(props, "MaximumPacketSize", None) if props is not None else None
            self.broker_max_packet_size = int(size) if size else None
            return on_connect(c, userdata, flags, rc, props)

        def publish_hook(c, userdata, mid, rc, props):  # type: ignore[no-untyped-def]
            if len(self._pubacks) > 1024:  # answers nobody waited for (QoS 0, timeouts)
                self._pubacks.clear()
            self._pubacks[mid] = rc
            return on_publish(c, userdata, mid, rc, props)

        def publish_wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            info = publish(*args, **kwargs)
            _LAST_MID.set(info.mid)
            return info

        paho_client.on_connect = connect_hook
        paho_client.on_publish = publish_hook
        paho_client.publish = publish_wrapper

    @property
    def is_v5(self) -> bool:
        return self.protocol == "5"

    async def connect(self) -> None:
        version = aiomqtt.ProtocolVersion.V5 if self.is_v5 else aiomqtt.ProtocolVersion.V311
        will = None
        if self.will is not None:
            will = aiomqtt.Will(self.will.topic, self.will.payload, self.will.qos, self.will.retain,
                                _properties(self.will, PacketTypes.WILLMESSAGE) if self.is_v5 else None)
        connect_props = None
        if self.is_v5 and (self.persistent_session or self.receive_maximum):
            connect_props = Properties(PacketTypes.CONNECT)
            if self.persistent_session:
                connect_props.SessionExpiryInterval = self.session_expiry_s
            if self.receive_maximum:
                connect_props.ReceiveMaximum = self.receive_maximum
        client = aiomqtt.Client(
            self.address.host, self.address.port,
            username=self.address.username, password=self.address.password,
            identifier=self.client_id, protocol=version, will=will,
            keepalive=self.keepalive_s, timeout=self.timeout_s, logger=LOG,
            # Without it, a QoS 0 message (no reply) followed by a QoS 1 one stalls on Nagle +
            # delayed ACK: ~20 ms per message instead of ~0.1 ms (measured: 45 vs 8000 msg/s).
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            tls_context=self.tls.context() if self.address.tls else None,
            # by default a fresh session each time: questions are answered live, never replayed
            clean_session=None if self.is_v5 else not self.persistent_session,
            clean_start=(not self.persistent_session) if self.is_v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=connect_props,
        )
        self._hook(client)
        if self.manual_ack:  # aiomqtt 2.5 does not pass paho's manual_ack through
            client._client.manual_ack_set(True)  # noqa: SLF001
        try:
            await client.__aenter__()
        except aiomqtt.MqttCodeError as e:
            _drop_socket(client)
            raise self._classify_refusal(e.rc) from None
        except aiomqtt.MqttError as e:
            _drop_socket(client)
            text = str(e)
            if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
                raise BusRefused(f"TLS certificate of {self.address.host} not trusted ({text.split(':')[-1].strip()});"
                                 " set the CA file (--mqtt-ca / mqtt.ca_file)") from None
            raise BusDisconnected(text or "connection failed") from None
        self._client = client

    def _classify_refusal(self, rc: object) -> Exception:
        code, text = _reason(rc)
        refused, protocol = (_V5_REFUSED, _V5_PROTOCOL) if self.is_v5 else (_V3_REFUSED, _V3_PROTOCOL)
        if code in protocol:
            return BusProtocolRejected(f"broker rejected MQTT {self.protocol} ({text})")
        if code in refused:
            who = f" for user {self.address.username!r}" if self.address.username else " (no user given)"
            return BusRefused(f"{self.address.display()} refused the connection{who}: {refused[code]}")
        return BusDisconnected(f"connection refused: {text}")

    async def disconnect(self, *, timeout_s: float | None = None) -> None:
        """Clean DISCONNECT (the broker then discards the will); never raises."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            await asyncio.wait_for(client.__aexit__(None, None, None), timeout=timeout_s or self.timeout_s)
        except Exception:  # already gone: nothing to clean up
            pass

    def ack(self, msg: BusMessage) -> None:
        """Send the PUBACK of a message received with `manual_ack` (no-op for QoS 0)."""
        if self._client is None:
            raise BusDisconnected("not connected")
        if msg.qos > 0 and msg.mid is not None:
            self._client._client.ack(msg.mid, msg.qos)  # noqa: SLF001

    async def drop(self) -> None:
        """Close the connection without DISCONNECT, as a crash would: the broker publishes the
        will. Never raises."""
        client, self._client = self._client, None
        if client is None:
            return
        _drop_socket(client)
        try:
            await asyncio.wait_for(client.__aexit__(None, None, None), timeout=0.5)
        except Exception:  # the socket is gone: nothing left to say to the broker
            pass

    async def publish(self, msg: BusMessage, *, timeout_s: float | None = None) -> None:
        """Send one message; QoS 1 waits for the broker's acknowledgement.

        Raises `BusPublishRefused` (nothing sent) for a message larger than `packet_limit`, or
        after a negative MQTT 5 PUBACK; `BusDisconnected` when the connection fails."""
        if self._client is None:
            raise BusDisconnected("not connected")
        limit = self.packet_limit
        if limit is not None:
            size = self.packet_size(msg)
            if size > limit:
                raise BusPublishRefused(f"{size} bytes > the broker's maximum packet size ({limit} bytes)", "too_large")
        props = _properties(msg, PacketTypes.PUBLISH) if self.is_v5 else None
        _LAST_MID.set(None)
        try:
            await self._client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain,
                                       properties=props, timeout=timeout_s or self.timeout_s)
        except aiomqtt.MqttError as e:
            raise BusDisconnected(f"publish to {msg.topic} failed: {e}") from None
        mid = _LAST_MID.get()
        rc = self._pubacks.pop(mid, None) if mid is not None else None
        code, text = _reason(rc) if rc is not None else (0, "")
        if code >= 0x80:
            raise BusPublishRefused(f"refused by the broker: {text} (reason code 0x{code:02x})", "refused")

    async def subscribe(self, topic: str, *, qos: int = 1) -> None:
        if self._client is None:
            raise BusDisconnected("not connected")
        try:
            granted = await self._client.subscribe(topic, qos=qos)
        except aiomqtt.MqttError as e:
            raise BusDisconnected(f"subscribe to {topic} failed: {e}") from None
        for rc in granted:
            code, text = _reason(rc)
            if code >= 0x80:
                raise BusRefused(f"{self.address.display()} refused the subscription to {topic}: "
                                 f"{'not authorised' if code in (0x80, 0x87) else text}")

    async def unsubscribe(self, topic: str) -> None:
        if self._client is None:
            raise BusDisconnected("not connected")
        try:
            await self._client.unsubscribe(topic)
        except aiomqtt.MqttError as e:
            raise BusDisconnected(f"unsubscribe from {topic} failed: {e}") from None

    async def messages(self) -> AsyncIterator[BusMessage]:
        """Incoming messages until the connection drops (then `BusDisconnected`)."""
        if self._client is None:
            raise BusDisconnected("not connected")
        try:
            async for m in self._client.messages:
                props = m.properties
                corr = getattr(props, "CorrelationData", None) if props is not None else None
                yield BusMessage(
                    topic=m.topic.value,
                    payload=bytes(m.payload) if isinstance(m.payload, (bytes, bytearray)) else str(m.payload).encode(),
                    qos=m.qos,
                    retain=bool(m.retain),
                    content_type=getattr(props, "ContentType", None) if props is not None else None,
                    response_topic=getattr(props, "ResponseTopic", None) if props is not None else None,
                    correlation=bytes(corr) if corr is not None else None,
                    mid=m.mid,
                )
        except aiomqtt.MqttError as e:
            raise BusDisconnected(f"connection lost: {e}") from None
