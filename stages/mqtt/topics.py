"""The bus's wire contract: topic layout, name validation, the question schema, and Home
Assistant discovery. Pure functions and data, no I/O (the stage and `framecast ask` share them).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from framecast.errors import UserError

JSON = "application/json"
STREAM_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_REQUEST_ID_PEEK = re.compile(rb'"request_id"\s*:\s*"([A-Za-z0-9_.:-]{1,64})"')


def validate_stream_id(stream_id: str) -> str:
    if not isinstance(stream_id, str) or not STREAM_ID_RE.match(stream_id):
        raise UserError(f"stream id {stream_id!r}: use 1-64 of [A-Za-z0-9_.-] (no '/', '+', '#')")
    return stream_id


def validate_prefix(prefix: str, key: str = "mqtt.prefix") -> str:
    """Levels separated by '/', none empty, no wildcards, no `$` (broker-reserved topics)."""
    bad = (not prefix or len(prefix) > 128 or prefix.startswith("$") or any(c in prefix for c in "+#\0")
           or any(not level for level in prefix.split("/")))
    if bad:
        raise UserError(f"{key} = {prefix!r}: topic prefix must be '/'-separated non-empty levels "
                        "without '+', '#', '$' or NUL")
    return prefix


@dataclass(frozen=True)
class Topics:
    prefix: str
    stream: str

    @property
    def status(self) -> str:
        return f"{self.prefix}/status"

    def _s(self, leaf: str) -> str:
        return f"{self.prefix}/{self.stream}/{leaf}"

    @property
    def stream_status(self) -> str:
        return self._s("status")

    @property
    def narration(self) -> str:
        return self._s("narration")

    @property
    def partial(self) -> str:
        return self._s("narration/partial")

    @property
    def event(self) -> str:
        return self._s("event")

    @property
    def ask(self) -> str:
        return self._s("ask")

    @property
    def answer(self) -> str:
        return self._s("answer")

    @property
    def metrics(self) -> str:
        return self._s("metrics")


class QuestionRejected(ValueError):
    def __init__(self, reason: str, request_id: str | None = None):
        super().__init__(reason)
        self.request_id = request_id


def parse_question(payload: bytes, *, max_bytes: int) -> tuple[str, str | None]:
    """(text, request_id or None) from `{"text": …, "request_id": …}` or plain UTF-8 text."""
    if len(payload) > max_bytes:
        # not parsed (bounded work), but a request_id near the start still routes the error
        m = _REQUEST_ID_PEEK.search(payload[:max_bytes])
        raise QuestionRejected(f"question too large: {len(payload)} bytes > {max_bytes}",
                               m.group(1).decode() if m else None)
    try:
        raw = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise QuestionRejected("question is not valid UTF-8") from None
    request_id = None
    if raw.lstrip()[:1] in ("{", "["):  # looks like JSON: hold it to the schema
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise QuestionRejected(f"question is not valid JSON: {e.msg} at char {e.pos}") from None
        if not isinstance(obj, dict):
            raise QuestionRejected("question JSON must be an object")
        rid = obj.get("request_id")
        if rid is not None and (not isinstance(rid, str) or not REQUEST_ID_RE.match(rid)):
            raise QuestionRejected("request_id must be 1-64 of [A-Za-z0-9_.:-]")
        request_id = rid
        unknown = sorted(set(obj) - {"text", "request_id"})
        if unknown:
            raise QuestionRejected(f"unknown key {unknown[0]!r} (allowed: text, request_id)", request_id)
        text = obj.get("text")
        if not isinstance(text, str):
            raise QuestionRejected("question JSON needs a string 'text'", request_id)
    else:
        text = raw
    text = text.strip()
    if not text:
        raise QuestionRejected("question text is empty", request_id)
    if any(ord(c) < 32 and c not in "\n\t" for c in text):
        raise QuestionRejected("question text contains control characters", request_id)
    return text, request_id


def valid_response_topic(topic: str | None) -> bool:
    return bool(topic) and len(topic) <= 256 and not any(c in topic for c in "+#\0") and not topic.startswith("$")


def ha_discovery(topics: Topics, ha_prefix: str) -> tuple[str, dict]:
    """Home Assistant MQTT discovery: (config topic, config) of one sensor for the stream
    whose state is the last narration and whose availability follows the status topics."""
    t = topics
    uid = re.sub(r"[^A-Za-z0-9_-]", "_", f"framecast_{t.prefix}_{t.stream}")
    config = {
        "name": f"{t.stream} narration",
        "unique_id": f"{uid}_narration",
        "object_id": uid,
        "state_topic": t.narration,
        # HA states hold at most 255 characters; the full event stays in the attributes
        "value_template": "{{ value_json.text[:255] }}",
        "json_attributes_topic": t.narration,
        "availability": [
            {"topic": t.status, "value_template": "{{ value_json.state }}"},
            {"topic": t.stream_status,
             "value_template": "{{ 'offline' if value_json.state in ('error', 'eof', 'stopped') else 'online' }}"},
        ],
        "availability_mode": "all",
        "payload_available": "online",
        "payload_not_available": "offline",
        "icon": "mdi:cctv",
        "device": {"identifiers": [uid], "name": f"framecast {t.stream}", "manufacturer": "framecast"},
    }
    node = re.sub(r"[^A-Za-z0-9_-]", "_", t.prefix)
    return f"{ha_prefix}/sensor/{node}/{re.sub(r'[^A-Za-z0-9_-]', '_', t.stream)}/config", config
