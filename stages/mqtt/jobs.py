"""The wire contract of the worker fleet (issue 18): topics, the job schema, what a job may
set, result and status payloads, and who owns which live stream. Pure data and functions, no
I/O: `framecast worker` (worker.py, streams.py) and `framecast submit` (submit.py) share them.

Topics under `<prefix>` (default `framecast`):

    <prefix>/jobs                      the queue: job JSON, QoS 1; workers read it through the
                                       MQTT 5 shared subscription `$share/<group>/<prefix>/jobs`
    <prefix>/jobs/<job_id>/status      retained job status: queued, running (+ progress), done, error
    <prefix>/jobs/<job_id>/<type>      retained results (narration, change, chapter, summary, error),
                                       each with its `index` (1, 2, …) among the job's results of its type
    <prefix>/jobs/<job_id>/done        retained final marker (state done | error): written last
    <prefix>/workers/<worker_id>       retained worker presence (online; `offline` is its Last Will)
    <prefix>/streams                   retained list of live streams the `--streams` workers split
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from framecast.config import PER_STREAM_PATHS, ConfigError, RunConfig, build_config, deep_merge
from framecast.events import Event, iso_utc, utc_now

JOB_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # also the job's stream id: same alphabet
GROUP_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
DEFAULT_GROUP = "framecast"
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_RETAIN_S = 7 * 24 * 3600  # MQTT 5 message expiry of retained job topics (a week)
MAX_JOB_BYTES = 64 * 1024

# What a job may set on top of the worker's config, as `group.key` (or a whole `group.`).
# Not the model (one model is loaded once per worker), not the bus, not the terminal views.
_ALLOWED = ("source.", "change.", "narration.", "outputs.", "session.", "runtime.capture_only")
_FORBIDDEN = ("source.uri", "source.stream_id", "outputs.console", "outputs.progress", "outputs.metrics",
              "session.state_file")


class JobRejected(ValueError):
    """A job that cannot run (bad JSON, bad id, a setting it may not change …)."""

    def __init__(self, reason: str, job_id: str | None = None):
        super().__init__(reason)
        self.job_id = job_id


def validate_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not GROUP_RE.match(value):
        from framecast.errors import UserError

        raise UserError(f"{what} {value!r}: use 1-64 of [A-Za-z0-9_.-]")
    return value


class Job(BaseModel):
    """One recorded video to analyse. `settings` are dotted config keys (`narration.interval_s`)
    or nested groups; `attempt` counts deliveries after a worker loss (its lease's will)."""

    model_config = ConfigDict(extra="forbid")

    v: int = 1
    job_id: str = Field(pattern=JOB_ID_RE.pattern)
    source: str = Field(min_length=1, max_length=4096)
    settings: dict[str, Any] = Field(default_factory=dict)
    attempt: int = Field(default=1, ge=1)
    submitted: str | None = None

    def payload(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    def next_attempt(self) -> "Job":
        return self.model_copy(update={"attempt": self.attempt + 1})


def parse_job(payload: bytes) -> Job:
    """A `Job` from the queue, or `JobRejected` naming what is wrong (and the id when it has one)."""
    if len(payload) > MAX_JOB_BYTES:
        raise JobRejected(f"job too large: {len(payload)} bytes > {MAX_JOB_BYTES}")
    try:
        obj = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JobRejected(f"job is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise JobRejected("job JSON must be an object")
    rid = obj.get("job_id")
    job_id = rid if isinstance(rid, str) and JOB_ID_RE.match(rid) else None
    try:
        job = Job.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "job"
        raise JobRejected(f"job key {where!r}: {err['msg']}", job_id) from None
    flat_settings(job.settings, job.job_id)  # reject bad keys before any work
    return job


def flat_settings(settings: dict[str, Any], job_id: str | None = None) -> dict[str, Any]:
    """`{"narration": {"interval_s": 1}}` and `{"narration.interval_s": 1}` -> dotted keys,
    each checked against what a job may set."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and prefix.count(".") < 1:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = value

    walk("", settings)
    for key in out:
        if "." not in key:
            raise JobRejected(f"job setting {key!r}: expected group.key, e.g. narration.interval_s", job_id)
        if key in _FORBIDDEN or not key.startswith(_ALLOWED):
            raise JobRejected(f"job setting {key!r} is the worker's to choose (a job may set source.*, change.*, "
                              "narration.*, outputs.*, session.* and runtime.capture_only, except "
                              f"{', '.join(sorted(_FORBIDDEN))})", job_id)
    return out


#: every config key that names a file a job writes (`framecast.config.OUTPUT_PATHS`): all of them
#: are confined to the worker's output directory
OUTPUT_FILES = tuple(f"{group}.{key}" for group, key in PER_STREAM_PATHS)
JOB_FIELDS = ("{job_id}", "{stream_id}")  # a job's stream id is its job id


def check_worker_outputs(base: RunConfig) -> None:
    """A worker config that names an output file must make it per job (`{job_id}`): otherwise
    every job would write over the last one."""
    from framecast.errors import UserError

    for dotted in OUTPUT_FILES:
        group, _, key = dotted.partition(".")
        path = getattr(getattr(base, group), key)
        if path and not any(field in path for field in JOB_FIELDS):
            raise UserError(f"{dotted} = {path!r}: a worker writes one file per job; put {{job_id}} in "
                            f"the name, e.g. {{job_id}}.{key}")


def _inside(path: str, folder: str) -> bool:
    """Whether `path` (symbolic links resolved) lies inside `folder`."""
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def job_config(base: RunConfig, job: Job, *, output_dir: str | None = None) -> RunConfig:
    """The run config of `job`: the worker's config, the job's settings, the job's source and id
    (the job id is the stream id), no terminal views and no bus stage (the worker publishes).

    Every output file (`OUTPUT_FILES`: outputs.jsonl|srt|vtt|chapters|summary|session|annotate|
    report and session.state_file) is a path relative to the worker's `output_dir` (default: its
    working directory) with `{job_id}` (and `{stream_id}`) replaced; a job may not name an
    absolute path, leave the directory with `..`, or reach out of it through a symbolic link.
    """
    nested: dict[str, Any] = {}
    for key, value in flat_settings(job.settings, job.job_id).items():
        group, _, leaf = key.partition(".")
        if key in OUTPUT_FILES and value is not None:
            if not isinstance(value, str) or value.startswith(("/", "~")) or ".." in Path(value).parts:
                raise JobRejected(f"job setting '{key}' = {value!r}: give a file name relative to the "
                                  "worker's output directory", job.job_id)
        nested.setdefault(group, {})[leaf] = value
    fixed: dict[str, Any] = {"source": {"uri": job.source, "stream_id": job.job_id},
                             "outputs": {"console": False, "progress": False, "metrics": False}, "mqtt": {"url": None}}
    merged = deep_merge(base.model_dump(), nested)
    top = output_dir or "."
    for dotted in OUTPUT_FILES:
        group, _, leaf = dotted.partition(".")
        path = merged[group].get(leaf)
        if isinstance(path, str) and path:
            for field in JOB_FIELDS:
                path = path.replace(field, job.job_id)
            if output_dir and not Path(path).is_absolute():  # (an absolute path here is the worker's own)
                path = str(Path(output_dir) / path)
            if key_from_job(job, dotted) and not _inside(path, top):
                raise JobRejected(f"job setting '{dotted}' = {path!r}: leaves the worker's output directory",
                                  job.job_id)
            fixed.setdefault(group, {})[leaf] = path
    data = deep_merge(merged, fixed)
    try:
        return build_config(data, origin=f"job {job.job_id}")
    except ConfigError as e:
        raise JobRejected(str(e), job.job_id) from None


def key_from_job(job: Job, dotted: str) -> bool:
    """Whether the job itself set `dotted` (the worker's own settings are trusted)."""
    return dotted in flat_settings(job.settings, job.job_id)


@dataclass(frozen=True)
class FleetTopics:
    prefix: str

    @property
    def queue(self) -> str:
        return f"{self.prefix}/jobs"

    def shared_queue(self, group: str) -> str:
        return f"$share/{group}/{self.prefix}/jobs"

    def job(self, job_id: str, leaf: str) -> str:
        return f"{self.prefix}/jobs/{job_id}/{leaf}"

    def job_all(self, job_id: str) -> str:
        return f"{self.prefix}/jobs/{job_id}/+"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}/workers/{worker_id}"

    @property
    def workers(self) -> str:
        return f"{self.prefix}/workers/+"

    @property
    def streams(self) -> str:
        return f"{self.prefix}/streams"


def _now() -> str:
    return iso_utc(utc_now())


def result_payload(event: Event, job: Job, index: int, worker_id: str) -> bytes:
    """A result event (narration, change, chapter, summary, error) with its index (1, 2, …)
    among the job's results of its type."""
    d = event.to_dict()
    d.update(job_id=job.job_id, index=index, attempt=job.attempt, worker=worker_id)
    return json.dumps(d).encode()


def job_status(job_id: str, state: str, **fields: Any) -> bytes:
    """Retained `<prefix>/jobs/<id>/status`: queued | running | requeued | done | error, with
    `worker`, `attempt`, progress (`frames`, `pts`, `duration` in media seconds), `results`."""
    return json.dumps({"v": 1, "type": "job.status", "job_id": job_id, "state": state, "ts": _now(), **fields}).encode()


def job_done(job_id: str, *, ok: bool, results: int, worker: str, attempt: int, elapsed_s: float,
             error: str | None = None, undelivered: int = 0) -> bytes:
    """Retained `<prefix>/jobs/<id>/done`: written once a job is over; a worker that gets the job
    again sees it first and publishes nothing."""
    return json.dumps({"v": 1, "type": "job.done", "job_id": job_id, "state": "done" if ok else "error",
                       "error": error, "results": results, "undelivered": undelivered, "worker": worker,
                       "attempt": attempt, "elapsed_s": round(elapsed_s, 3), "ts": _now()}).encode()


def worker_status(worker_id: str, state: str, **fields: Any) -> bytes:
    """Retained `<prefix>/workers/<id>`: online (group, role, host, pid, job, streams) or
    offline (`text` `stopped`, or `connection lost` from the Last Will)."""
    return json.dumps({"v": 1, "type": "worker.status", "worker_id": worker_id, "state": state, "ts": _now(),
                       "t": time.time(), **fields}).encode()


# ---------------------------------------------------------------- live streams


class StreamSpec(BaseModel):
    """One live stream of the `<prefix>/streams` list: its id, source and run settings."""

    model_config = ConfigDict(extra="forbid")

    stream_id: str = Field(pattern=JOB_ID_RE.pattern)
    source: str = Field(min_length=1, max_length=4096)
    settings: dict[str, Any] = Field(default_factory=dict)


class StreamList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    v: int = 1
    streams: list[StreamSpec] = Field(default_factory=list)


def parse_streams(payload: bytes) -> StreamList:
    """The retained stream list; an empty payload (retained message cleared) is no streams."""
    if not payload.strip():
        return StreamList()
    try:
        out = StreamList.model_validate_json(payload)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "streams"
        raise JobRejected(f"stream list key {where!r}: {err['msg']}") from None
    ids = [s.stream_id for s in out.streams]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise JobRejected(f"stream list: stream id {dupes[0]!r} appears twice")
    for s in out.streams:
        flat_settings(s.settings, s.stream_id)
    return out


def _weight(stream_id: str, worker_id: str) -> bytes:
    return hashlib.sha256(f"{stream_id}\0{worker_id}".encode()).digest()


def assign(stream_ids: list[str], workers: list[str]) -> dict[str, str]:
    """Stream id -> worker id, the same on every worker that sees the same lists.

    Rendezvous (highest random weight) hashing with bounded load: each stream, in id order,
    goes to the first worker of its own hash ranking that has fewer than ceil(streams/workers),
    so the split is even and a worker leaving moves its streams and few others.
    """
    workers = sorted(set(workers))
    if not workers:
        return {}
    cap = -(-len(stream_ids) // len(workers))
    load = dict.fromkeys(workers, 0)
    out: dict[str, str] = {}
    for s in sorted(stream_ids):
        for w in sorted(workers, key=lambda w: _weight(s, w), reverse=True):
            if load[w] < cap:
                out[s] = w
                load[w] += 1
                break
    return out
