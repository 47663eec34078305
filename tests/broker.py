"""A real mosquitto broker for the bus tests, plus a small recording subscriber.

`Broker` writes a config into a temporary directory and runs Debian's /usr/sbin/mosquitto on a
free loopback port: optionally with a password file (via `mosquitto_passwd`), a TLS listener
with a CA, server and client certificates made on the spot (`cryptography`), and persistence
(so a restart keeps sessions and retained messages, as a production broker would).
`extra` adds config lines (`max_packet_size 330`); a broker made but not yet started is a
broker that comes up late (its port is fixed at construction).
`Recorder` is a paho-mqtt subscriber on its own thread that records what arrives.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


# ---------------------------------------------------------------- certificates


@dataclass
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certs(directory: Path) -> TlsFiles:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate (EC P-256)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: Any, path: Path) -> None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (x509.CertificateBuilder().subject_name(name("framecast test CA")).issuer_name(name("framecast test CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False),
                              critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage: Any, san: list | None) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return key, b.sign(ca_key, hashes.SHA256())

    srv_key, srv_cert = leaf("localhost", ExtendedKeyUsageOID.SERVER_AUTH,
                             [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cli_key, cli_cert = leaf("framecast-client", ExtendedKeyUsageOID.CLIENT_AUTH, None)
    files = TlsFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key",
                     directory / "client.crt", directory / "client.key")
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(srv_cert.public_bytes(serialization.Encoding.PEM))
    files.client_cert.write_bytes(cli_cert.public_bytes(serialization.Encoding.PEM))
    write_key(srv_key, files.server_key)
    write_key(cli_key, files.client_key)
    return files


# ---------------------------------------------------------------- the broker


class Broker:
    """One mosquitto process; `restart()` keeps the port (and, with persistence, the state)."""

    def __init__(self, directory: Path, *, users: dict[str, str] | None = None, tls: bool = False,
                 persistence: bool = False, extra: list[str] | None = None):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self.tls = make_certs(self.dir / "certs") if tls else None
        self.users = users
        self.persistence = persistence
        self.extra = list(extra or [])  # more mosquitto.conf lines, e.g. "max_packet_size 330"
        self.proc: subprocess.Popen | None = None
        self.conf = self.dir / "mosquitto.conf"
        self.log = self.dir / "mosquitto.log"
        self._write_config()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        lines = [
            "user root",  # mosquitto drops privileges when started as root: it must still read tmp files
            f"listener {self.port} 127.0.0.1",
            f"log_dest file {self.log}",
            "log_type error", "log_type warning", "log_type notice",
            "max_queued_messages 10000",
            *self.extra,
        ]
        if self.users:
            if MOSQUITTO_PASSWD is None:
                raise RuntimeError("mosquitto_passwd is not installed")
            pw = self.dir / "passwd"
            pw.write_text("")
            for user, password in self.users.items():
                subprocess.run([MOSQUITTO_PASSWD, "-b", str(pw), user, password], check=True, capture_output=True)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines += ["allow_anonymous true"]
        if self.persistence:
            lines += ["persistence true", f"persistence_location {self.dir}/", "autosave_interval 1"]
        if self.tls:
            lines += [f"listener {self.tls_port} 127.0.0.1", f"cafile {self.tls.ca}", f"certfile {self.tls.server_cert}",
                      f"keyfile {self.tls.server_key}", "require_certificate true"]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> "Broker":
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        try:
            wait_port(self.port)
            if self.tls_port:
                wait_port(self.tls_port)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"mosquitto did not start: {self.log.read_text() if self.log.exists() else ''}")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a paused broker must be able to exit
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


# ---------------------------------------------------------------- a subscriber that records


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int
    props: dict[str, Any] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.payload)


class Recorder:
    """paho-mqtt on its own thread: subscribes (again after every reconnect) and records."""

    def __init__(self, port: int, topics: list[str], *, client_id: str | None = None, persistent: bool = False,
                 v5: bool = True, username: str | None = None, password: str | None = None):
        self.messages: list[Received] = []
        self._lock = threading.Condition()
        self.topics = topics
        protocol = paho.MQTTv311 if (persistent or not v5) else paho.MQTTv5
        kw: dict[str, Any] = {"clean_session": not persistent} if protocol == paho.MQTTv311 else {}
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or "", protocol=protocol, **kw)
        if username:
            self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(0.05, 0.5)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self._subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        if not self._subscribed.wait(5):
            raise TimeoutError("recorder could not subscribe")

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        for t in self.topics:
            client.subscribe(t, qos=1)

    def _on_message(self, client: paho.Client, userdata: Any, m: paho.MQTTMessage) -> None:
        props = {}
        p = getattr(m, "properties", None)
        if p is not None:
            for key in ("ContentType", "MessageExpiryInterval", "CorrelationData", "ResponseTopic"):
                if hasattr(p, key):
                    props[key] = getattr(p, key)
        with self._lock:
            self.messages.append(Received(m.topic, bytes(m.payload), bool(m.retain), m.qos, props))
            self._lock.notify_all()

    def on(self, topic: str) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def wait_for(self, pred: Callable[[list[Received]], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._lock:
            while not pred(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
            return True

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1, props: Any = None) -> None:
        self.client.publish(topic, payload, qos=qos, properties=props).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Mqtt311OnlyProxy:
    """Makes the real broker look like an MQTT 3.1.1-only one (as old brokers are): an MQTT 5
    CONNECT gets the 3.1.1 CONNACK "unacceptable protocol version"; anything else is piped
    through unchanged. Runs on the caller's asyncio loop."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.rejected = 0
        self._server = None
        self.port = 0

    async def start(self) -> "Mqtt311OnlyProxy":
        import asyncio

        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader, writer) -> None:
        import asyncio

        first = await reader.read(4096)
        i = 1  # skip the variable-length "remaining length" field
        while first[i] & 0x80:
            i += 1
        name_len = int.from_bytes(first[i + 1:i + 3], "big")
        level = first[i + 3 + name_len]
        if level == 5:
            self.rejected += 1
            writer.write(b"\x20\x02\x00\x01")
            await writer.drain()
            writer.close()
            return
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        up_w.write(first)

        async def pipe(r, w):
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
