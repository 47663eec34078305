"""`framecast submit`: put recorded videos on the job queue of a worker group, and with `--wait`
follow them to the end; `--stream ID=SOURCE` instead publishes the retained list of live
streams that `framecast worker --streams` split.

stdout, one line per fact, tab-separated: `<job_id> queued <source>` at submission; with --wait
`<job_id> <type> <pts> <text>` per result and `<job_id> done|error <results> <detail>` at the
end. Progress (which worker, attempt, media time) goes to stderr. Exit 0 when every job is done,
1 when one failed, a wait timed out or the broker cannot be used, 2 for bad arguments.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from framecast.errors import UserError
from framecast.events import iso_utc, utc_now
from framecast.redact import redact_url
from framecast.stages.mqtt.client import (BrokerAddress, BusClient, BusDisconnected, BusMessage, BusProtocolRejected,
                                          BusPublishRefused,
                                          BusRefused, TlsFiles, parse_mqtt_url)
from framecast.stages.mqtt.jobs import DEFAULT_RETAIN_S, FleetTopics, Job, JobRejected, flat_settings, job_status
from framecast.stages.mqtt.topics import JSON, validate_prefix
from framecast.stages.mqtt.fleet import read_retained



def make_job_id(source: str) -> str:
    """`<file stem>-<8 hex>`: readable in logs, unique across submissions."""
    stem = Path(source.rstrip("/")).stem if "://" not in source else source.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.")[:40] or "job"
    return f"{stem}-{uuid.uuid4().hex[:8]}"


def job_source(item: str, *, as_is: bool) -> str:
    """A local file becomes an absolute path (workers share the file system, see README);
    `demo` and URLs go as they are."""
    if item == "demo" or "://" in item or as_is:
        return item
    path = Path(item)
    if path.is_dir():
        raise UserError(f"{item}: is a directory, not a video file")
    if not path.is_file():
        raise UserError(f"{item}: no such file (use --as-is for paths that exist only on the workers)")
    return str(path.resolve())


def submit_main(url: str, files: list[str], *, prefix: str, wait: bool, timeout: float,
                settings: dict[str, Any], tls: TlsFiles, as_is: bool = False, streams: list[str] | None = None,
                require_worker: bool = True) -> int:
    topics = FleetTopics(validate_prefix(prefix, "--prefix"))
    address = parse_mqtt_url(url)
    if address.tls:
        tls.check()
    if streams is not None:
        if files:
            raise UserError("give either files (jobs) or --stream ID=SOURCE (live streams), not both")
        from framecast.stages.mqtt.streams import stream_list_payload

        payload = stream_list_payload(streams)
        return asyncio.run(_publish_streams(address, tls, topics, payload))
    if not files:
        raise UserError("nothing to submit: give one or more video files (or --stream ID=SOURCE)")
    try:
        flat_settings(settings)
    except JobRejected as e:
        raise UserError(str(e)) from None
    now = iso_utc(utc_now())
    jobs = [Job(job_id=make_job_id(f), source=job_source(f, as_is=as_is), settings=settings, submitted=now)
            for f in files]
    try:
        return asyncio.run(_submit(address, tls, topics, jobs, wait=wait, timeout=timeout,
                                   require_worker=require_worker))
    except KeyboardInterrupt:
        return 130


async def _connect(address: BrokerAddress, tls: TlsFiles) -> BusClient | None:
    client = BusClient(address, client_id=f"framecast-submit-{uuid.uuid4().hex[:8]}", protocol="5", tls=tls)
    try:
        await client.connect()
    except BusProtocolRejected:
        print(f"framecast: mqtt: {address.display()} does not speak MQTT 5 (shared subscriptions need it)",
              file=sys.stderr)
        return None
    except BusRefused as e:  # its text names the broker already ("mqtt://host:1883 refused ...")
        print(f"framecast: mqtt: {e}", file=sys.stderr)
        return None
    except BusDisconnected as e:
        print(f"framecast: mqtt: cannot connect to {address.display()}: {e}", file=sys.stderr)
        return None
    return client


async def _publish_streams(address: BrokerAddress, tls: TlsFiles, topics: FleetTopics, payload: bytes) -> int:
    client = await _connect(address, tls)
    if client is None:
        return 1
    try:
        await client.publish(BusMessage(topics.streams, payload, qos=1, retain=True, content_type=JSON))
    except BusDisconnected as e:
        print(f"framecast: mqtt: {e}", file=sys.stderr)
        return 1
    finally:
        await client.disconnect(timeout_s=1.0)
    n = len(json.loads(payload)["streams"])
    print(f"{topics.streams}: {n} stream{'s' * (n != 1)}", flush=True)
    return 0


async def _submit(address: BrokerAddress, tls: TlsFiles, topics: FleetTopics, jobs: list[Job], *,
                  wait: bool, timeout: float, require_worker: bool) -> int:
    client = await _connect(address, tls)
    if client is None:
        return 1
    try:
        if require_worker:
            known = await read_retained(client, topics.workers)
            members = [_json(p) for p in known.values()]
            if not any(m.get("role") == "worker" and not m.get("reaped") for m in members):
                # the broker drops a message nobody subscribed to: a job sent now would be lost
                print(f"framecast: no job worker has joined {topics.queue} at {address.display()}: the broker keeps "
                      f"jobs only for the sessions of workers it knows; start `framecast worker --mqtt URL"
                      f"{'' if topics.prefix == 'framecast' else ' --prefix ' + topics.prefix}` first (or --force)",
                      file=sys.stderr)
                return 1
        if wait:
            for job in jobs:
                await client.subscribe(topics.job_all(job.job_id), qos=1)
        for job in jobs:
            await client.publish(BusMessage(topics.job(job.job_id, "status"), job_status(job.job_id, "queued"),
                                            qos=1, retain=True, content_type=JSON, expiry_s=DEFAULT_RETAIN_S))
            await client.publish(BusMessage(topics.queue, job.payload(), qos=1, content_type=JSON))
            print(f"{job.job_id}\tqueued\t{redact_url(job.source)}", flush=True)
        if not wait:
            return 0
        open_jobs = {j.job_id for j in jobs}
        try:
            return await asyncio.wait_for(_follow(client, jobs, open_jobs), timeout=timeout)
        except asyncio.TimeoutError:
            print(f"framecast: {len(open_jobs)} of {len(jobs)} jobs not done within {timeout:g} s: "
                  f"{', '.join(sorted(open_jobs))}", file=sys.stderr)
            return 1
    except BusDisconnected as e:
        print(f"framecast: mqtt: {e}", file=sys.stderr)
        return 1
    except BusPublishRefused as e:  # a job the broker will never take (over its packet limit, say)
        print(f"framecast: mqtt: a job could not be submitted: {e}", file=sys.stderr)
        return 1
    finally:
        await client.disconnect(timeout_s=1.0)


async def _follow(client: BusClient, jobs: list[Job], open_jobs: set[str]) -> int:
    """Print results and progress until every job has its done marker (removed from `open_jobs`)."""
    seen: set[tuple[str, str, int]] = set()
    last_status: dict[str, tuple] = {}
    failed = 0
    t0 = time.monotonic()
    async for m in client.messages():
        parts = m.topic.split("/")
        if len(parts) < 3 or parts[-2] not in open_jobs:
            continue
        job_id, leaf = parts[-2], parts[-1]
        try:
            obj = json.loads(m.payload)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if leaf == "done":
            ok = obj.get("state") == "done"
            failed += not ok
            detail = f"{obj.get('elapsed_s')} s on {obj.get('worker')}" if ok else (obj.get("error") or "failed")
            print(f"{job_id}\t{obj.get('state')}\t{obj.get('results')}\t{detail}", flush=True)
            open_jobs.discard(job_id)
            if not open_jobs:
                print(f"framecast: {len(jobs) - failed} of {len(jobs)} jobs done in {time.monotonic() - t0:.1f} s",
                      file=sys.stderr, flush=True)
                return 1 if failed else 0
        elif leaf == "status":
            key = (obj.get("state"), obj.get("worker"), obj.get("attempt"))
            if obj.get("state") == "running" and last_status.get(job_id) != key:
                print(f"framecast: {job_id}: running on {obj.get('worker')} (attempt {obj.get('attempt')})",
                      file=sys.stderr, flush=True)
            last_status[job_id] = key
        elif isinstance(obj.get("index"), int) and (job_id, leaf, obj["index"]) not in seen:
            seen.add((job_id, leaf, obj["index"]))
            pts = obj.get("pts")
            text = str(obj.get("text", "")).replace("\n", " ").replace("\t", " ")
            print(f"{job_id}\t{obj.get('type', leaf)}\t{'' if pts is None else pts}\t{text}", flush=True)
    raise BusDisconnected("connection closed while waiting")


def _json(payload: bytes) -> dict:
    try:
        obj = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}
