"""Typed, versioned events: the only things that travel between stages and leave the process.

Every event serialises to one JSON envelope (`to_json`) with at least
`v`, `type`, `stream_id`, `seq`, `ts` (ISO-8601 UTC), `pts` and, where it carries text, `text`.
That JSON form is the public contract (README, MQTT payloads, JSONL files); bump
`SCHEMA_VERSION` on any incompatible change.

Control messages (`Stop`, `Flush`, `Question`, `EndOfStream`) are events too: the runtime gives
the first three a lane of their own that overtakes data; `EndOfStream` travels in data order so
that every output sees all data before it closes.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from datetime import datetime, timezone
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from framecast.redact import redact_text


def plural(n: int | float, noun: str) -> str:
    """`1 frame`, `2 frames`, `0 chapters` (English count wording for messages)."""
    return f"{n:g} {noun}" if n == 1 else f"{n:g} {noun}s"

SCHEMA_VERSION = 1


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def iso_utc(dt: datetime) -> str:
    """ISO-8601 UTC with milliseconds and a `Z`, e.g. 2026-11-26T08:29:36.123Z."""
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


class Event(BaseModel):
    """Base of every event. `seq` counts per stream and event producer; `pts` is media time (s)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    v: int = SCHEMA_VERSION
    type: str
    stream_id: str = "default"
    seq: int = 0
    ts: datetime = Field(default_factory=utc_now)
    pts: float | None = None

    #: fields never written to JSON (large or process-local)
    _private_fields: ClassVar[frozenset[str]] = frozenset()
    #: control messages overtake data on every edge
    control: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        d = self.model_dump(exclude=set(self._private_fields), mode="python")
        d["ts"] = iso_utc(self.ts)
        return {k: _jsonable(v) for k, v in d.items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))


def _jsonable(v: Any) -> Any:
    if isinstance(v, float):  # NaN/inf are not JSON: null, like any unknown value
        return round(v, 6) if math.isfinite(v) else None
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, datetime):
        return iso_utc(v)
    return v


# ---------------------------------------------------------------- data


class Frame(Event):
    """One decoded video frame. `pixels` is RGB uint8 [H, W, 3] and never serialised."""

    type: Literal["frame"] = "frame"
    pixels: np.ndarray
    width: int = 0
    height: int = 0
    wall_time: float = Field(default_factory=time.time)
    #: set by the change detector: None = not scored yet
    changed: bool | None = None
    change_score: float | None = None
    #: set by the encoder stage (process-local vision features, never serialised)
    features: Any = None
    _private_fields: ClassVar[frozenset[str]] = frozenset({"pixels", "features"})

    def model_post_init(self, __context: Any) -> None:
        if not self.width or not self.height:
            self.height, self.width = int(self.pixels.shape[0]), int(self.pixels.shape[1])


class SceneChange(Event):
    """The change detector saw a new scene (score above threshold)."""

    type: Literal["change"] = "change"
    score: float
    text: str = "scene change"


class NarrationDelta(Event):
    """A piece of narration text while it is being generated (partial)."""

    type: Literal["narration.partial"] = "narration.partial"
    text: str
    narration_id: str = ""


class Narration(Event):
    """A finished narration of what the stream shows around `pts`.

    `pts_start`/`pts_end` bound the media time it describes (subtitles use them).
    Timings: `first_token_ms` (frame arrival to first token), `tokens_per_s`, `cache_tokens`.
    """

    type: Literal["narration"] = "narration"
    text: str
    narration_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    pts_start: float | None = None
    pts_end: float | None = None
    trigger: str = "interval"  # interval | change | end (closing narration at end of input) | question
    first_token_ms: float | None = None
    tokens_per_s: float | None = None
    tokens: int | None = None
    cache_tokens: int | None = None


class Answer(Event):
    """The answer to a `Question`, carrying the question's `request_id`. `error` set = failed."""

    type: Literal["answer"] = "answer"
    text: str
    request_id: str
    question: str = ""
    error: str | None = None
    first_token_ms: float | None = None
    tokens_per_s: float | None = None
    tokens: int | None = None
    cache_tokens: int | None = None
    #: the media time the answer draws on, and from what (`cache` | `narration log`), when known
    pts_start: float | None = None
    pts_end: float | None = None
    basis: str | None = None


class Chapter(Event):
    """A finished chapter of a recording: scene segments merged to at least `chapters.min_s`
    seconds. `text` is its title, written by the model from what it narrated in
    [`pts_start`, `pts_end`) (media seconds); `index` counts from 1; `narrations` is how many
    narrations the title was written from."""

    type: Literal["chapter"] = "chapter"
    text: str
    index: int
    pts_start: float
    pts_end: float
    narrations: int = 0


class Summary(Event):
    """The summary of a whole recording (end of file), written by the model from its chapters
    (titles and narrations) in text-only turns. `levels` = 1 when all chapters fitted one
    prompt, 2+ when groups of chapters were summarised first. `realtime` = media seconds
    processed per wall-clock second (above 1 = faster than real time)."""

    type: Literal["summary"] = "summary"
    text: str
    pts_start: float | None = None
    pts_end: float | None = None
    chapters: int = 0
    narrations: int = 0
    levels: int = 1
    realtime: float | None = None


class Status(Event):
    """Stream state: starting, running, reconnecting, eof, stopped, error.

    `duration` (media seconds) is known for recorded files: progress bars use it. An `eof`
    status has `pts` = the media time where the input ended, when the source knows it, and
    `discontinuities` = how often the source's timestamps jumped back (recorded files, streams).
    `undelivered` (the MQTT stage's statuses only) counts messages that never reached the broker.
    """

    type: Literal["status"] = "status"
    state: str
    text: str = ""
    fps: float | None = None
    drops: int | None = None
    reconnects: int | None = None
    bad_frames: int | None = None
    duration: float | None = None
    discontinuities: int | None = None
    #: set by the bus: messages it could not deliver so far (too large, refused, evicted, unsent)
    undelivered: int | None = None

    _no_passwords = field_validator("text")(lambda cls, v: redact_text(v))  # a source URL's password


class Metrics(Event):
    """Per-stage figures: {stage: {items, drops, queue_depth, latency_ms_p50, ...}}."""

    type: Literal["metrics"] = "metrics"
    stages: dict[str, dict[str, float]]


class Error(Event):
    """An error that travelled as a message. `fatal` = the run cannot continue."""

    type: Literal["error"] = "error"
    text: str
    stage: str = ""
    fatal: bool = False

    _no_passwords = field_validator("text")(lambda cls, v: redact_text(v))  # FFmpeg repeats the URL


# ---------------------------------------------------------------- control


class Question(Event):
    """A question about the stream, answered from cached context. Overtakes frames."""

    type: Literal["question"] = "question"
    text: str
    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    reply_to: str | None = None  # transport detail (e.g. MQTT response topic)
    correlation: bytes | None = None
    _private_fields: ClassVar[frozenset[str]] = frozenset({"correlation", "reply_to"})
    control: ClassVar[bool] = True


class QuestionRecord(Event):
    """What outputs record of a question the decoder took: the same JSON as `Question`
    (`type` "question"), but data, in order just before its `Answer`. The control `Question`
    itself is consumed by the decoder."""

    type: Literal["question"] = "question"
    text: str
    request_id: str


class Stop(Event):
    """Stop producing; downstream drains what is queued and closes."""

    type: Literal["stop"] = "stop"
    text: str = ""
    control: ClassVar[bool] = True


class Flush(Event):
    """Write out anything buffered (files, subtitles) without stopping."""

    type: Literal["flush"] = "flush"
    control: ClassVar[bool] = True


class EndOfStream(Event):
    """The source has no more frames. Travels in data order (never overtakes data)."""

    type: Literal["eos"] = "eos"
    text: str = ""


EVENT_TYPES: dict[str, type[Event]] = {
    cls.model_fields["type"].default: cls
    for cls in (Frame, SceneChange, NarrationDelta, Narration, Answer, Chapter, Summary, Status, Metrics, Error,
                Question, Stop, Flush, EndOfStream)
}  # ("question" parses as the control `Question`; a `QuestionRecord` has the same fields)


def event_from_dict(d: dict[str, Any]) -> Event:
    """Parse a serialised event (not Frame: its pixels never leave the process)."""
    cls = EVENT_TYPES.get(d.get("type", ""))
    if cls is None or cls is Frame:
        raise ValueError(f"unknown event type {d.get('type')!r}")
    return cls.model_validate(d)
