"""`framecast worker`: take recorded-video jobs from an MQTT 5 shared subscription and run each
through the usual graph, with one model loaded once per worker process.

How a job is held (see README "Workers"): the worker reads `$share/<group>/<prefix>/jobs` with
a persistent session, Receive Maximum 1 and manual acknowledgements. For each job it first opens
a *lease*: a second connection whose Last Will is the job itself (attempt + 1) published back to
the queue. Only then does it PUBACK the job. So the broker always holds the job: in the worker's
session until the PUBACK, then as the lease's will until the lease is closed cleanly after the
`done` marker. A worker killed mid-job loses its lease connection, the broker publishes the will,
and another member of the group takes the job. (A delayed PUBACK alone is not enough: mosquitto
keeps an unacknowledged shared-subscription message in the dead member's session instead of
handing it to another member.)

Exactly once, seen from outside: every result carries the job id and its `index` among the
job's results of its type, and is published retained on `<prefix>/jobs/<id>/<type>`; the last
thing a job publishes is the retained `<prefix>/jobs/<id>/done`. A worker that gets a job reads
those retained topics first: `done` present -> acknowledge and publish nothing; otherwise skip,
per type, the results whose index an earlier attempt already published (narrations, scene
changes, chapters come in media-time order for a given input and settings).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import sys
import time
from typing import Any, AsyncIterator

from framecast.config import RunConfig
from framecast.errors import UserError
from framecast.events import EndOfStream, Error, Event, Frame, Metrics, NarrationDelta, Status
from framecast.redact import redact_text, redact_url
from framecast.runtime import Runtime, Stage
from framecast.stages.mqtt.client import BusClient, BusDisconnected, BusMessage, BusPublishRefused, TlsFiles
from framecast.stages.mqtt.fleet import FleetMember, default_worker_id, read_retained
from framecast.stages.mqtt.jobs import (DEFAULT_MAX_ATTEMPTS, Job, JobRejected, check_worker_outputs, job_config,
                                        job_done, job_status, parse_job, result_payload)
from framecast.stages.mqtt.reaper import DEFAULT_GRACE_S, Reaper
from framecast.stages.mqtt.topics import JSON

PROGRESS_INTERVAL_S = 1.0  # retained job status refresh while a job runs


class JobSink(Stage):
    """The last stage of a job's graph: results go to `<prefix>/jobs/<id>/<type>` (retained, with
    its index among the job's results of its type; the first `skip[type]` were published by an
    earlier attempt), progress (frames, pts in media seconds) to the retained job status."""

    name = "jobs"

    def __init__(self, worker: "JobWorker", job: Job, *, skip: dict[str, int]):
        super().__init__()
        self.worker, self.job, self.skip = worker, job, skip
        self.counts: collections.Counter[str] = collections.Counter()  # results seen per type (published or skipped)
        self.published = 0
        self.frames = 0
        self.pts: float | None = None
        self.duration: float | None = None
        self.aborted = ""
        self.refused = 0  # results the broker can never take (too large, refused for good): dropped
        self._last_progress = 0.0

    async def process(self, item: Event) -> AsyncIterator[Event]:
        if isinstance(item, Frame):
            self.frames += 1
            self.pts = item.pts
            if time.monotonic() - self._last_progress >= PROGRESS_INTERVAL_S:
                await self._send(self.worker.topics.job(self.job.job_id, "status"), self.progress("running"))
        elif isinstance(item, Status):
            self.duration = getattr(item, "duration", None) or self.duration
        elif isinstance(item, (NarrationDelta, Metrics, EndOfStream)) or item.control:
            pass
        elif not (isinstance(item, Error) and item.fatal):  # a fatal error ends the job: the done marker says it
            leaf = item.type.replace(".", "_")
            self.counts[leaf] += 1
            index = self.counts[leaf]
            if index > self.skip.get(leaf, 0):
                topic = self.worker.topics.job(self.job.job_id, leaf)
                if await self._send(topic, result_payload(item, self.job, index, self.worker.worker_id)):
                    self.published += 1
        yield item

    def progress(self, state: str) -> bytes:
        self._last_progress = time.monotonic()
        return job_status(self.job.job_id, state, worker=self.worker.worker_id, attempt=self.job.attempt,
                          frames=self.frames, pts=self.pts, duration=self.duration, results=self.results)

    @property
    def results(self) -> int:
        return sum(self.counts.values())

    async def _send(self, topic: str, payload: bytes) -> bool:
        if self.aborted:
            return False
        try:
            await self.worker.publish(topic, payload)
            return True
        except BusDisconnected as e:  # results must not go missing: give the job back
            self.aborted = f"bus lost while publishing: {e}"
            self.worker.stop_job()
            return False
        except BusPublishRefused as e:  # it can never be delivered: drop and count it, the rest still flow
            self.refused += 1
            if self.refused == 1:
                print(f"framecast: worker: job {self.job.job_id}: {topic}: {e}; dropped (later ones are only counted)",
                      file=sys.stderr, flush=True)
            return False


class JobWorker(FleetMember):
    """Runs jobs from `$share/<group>/<prefix>/jobs` one at a time, held by a lease (see module doc)."""

    role = "worker"

    def __init__(self, base: RunConfig, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS, output_dir: str | None = None,
                 reap_after_s: float = DEFAULT_GRACE_S, **kw: Any):
        super().__init__(base, **kw)
        check_worker_outputs(base)
        self.max_attempts = max_attempts
        self.output_dir = output_dir
        self.reaper = Reaper(self, grace_s=reap_after_s) if reap_after_s > 0 else None
        self._reaper_task: asyncio.Task | None = None
        self.job: Job | None = None
        self._runtime: Runtime | None = None
        self._lease_lost = False
        self._give_back: Job | None = None
        self._model: Any = None
        self.jobs_done = 0

    def client_options(self) -> dict[str, Any]:
        # persistent: a job sent while this worker is away waits in its session; Receive Maximum
        # 1 + manual acks: the broker hands it one job at a time and keeps it until the lease holds it
        return {"persistent_session": True, "session_expiry_s": self.session_expiry_s, "receive_maximum": 1,
                "manual_ack": True}

    def presence(self) -> dict[str, Any]:
        return {"job": self.job.job_id if self.job else None, "jobs_done": self.jobs_done}

    def load_model(self) -> None:
        """Load the worker's model once, up front (a bad --model fails before any job is taken)."""
        if not self.base.runtime.capture_only:
            from framecast.stages.app import load_run_model

            self._model = load_run_model(self.base)

    def _model_loader(self, cfg: RunConfig) -> Any:
        return self._model

    async def on_connected(self, client: BusClient) -> None:
        if self._give_back is not None:
            await self._return_job(client, self._give_back)
            self._give_back = None
        await client.subscribe(self.topics.shared_queue(self.group), qos=1)
        if self.reaper is not None and self._reaper_task is None:
            self._reaper_task = asyncio.ensure_future(self.reaper.run())

    async def _return_job(self, client: BusClient, job: Job) -> None:
        """After losing the broker mid-job: the lease's will may not have been published (a
        broker that restarts forgets wills), so put the job back ourselves, unless its retained
        state shows it done or taken by a later attempt."""
        probe = self._probe_client()  # not the worker's own connection: its queue may already be flowing
        await probe.connect()
        try:
            done, _, status = await self._job_state(probe, job)
        finally:
            await probe.disconnect(timeout_s=1.0)
        if done or int(status.get("attempt") or 0) > job.attempt:
            return
        await client.publish(BusMessage(self.topics.queue, job.next_attempt().payload(), qos=1, content_type=JSON))
        self.log(f"job {job.job_id} put back on the queue (attempt {job.attempt + 1})")

    async def on_stop(self) -> None:
        if self._runtime is not None:
            self._runtime.request_stop("signal")
        if self._reaper_task is not None and self.stopping.is_set():
            self._reaper_task.cancel()
            await asyncio.gather(self._reaper_task, return_exceptions=True)

    async def on_message(self, client: BusClient, m: BusMessage) -> None:
        if m.topic != self.topics.queue:
            client.ack(m)
            return
        try:
            job = parse_job(m.payload)
        except JobRejected as e:
            await self._reject(e)
            client.ack(m)
            return
        lease = BusClient(self.address, client_id=f"framecast-lease-{self.worker_id}", protocol="5", tls=self.tls,
                          keepalive_s=self.keepalive_s,
                          will=BusMessage(self.topics.queue, job.next_attempt().payload(), qos=1, content_type=JSON))
        await lease.connect()  # BusDisconnected: the job stays unacknowledged in our session
        try:
            done, seen, status = await self._job_state(lease, job)
            # A copy is redundant when another live worker runs this attempt or a later one. A
            # lease's will always carries a later attempt than the one its dead holder ran, so
            # it is never dropped on the word of a presence the broker has not updated yet.
            runner = (status.get("worker") if status.get("state") == "running"
                      and int(status.get("attempt") or 0) >= job.attempt else None)
            busy = runner not in (None, self.worker_id) and await self._runs(lease, runner, job.job_id)
        except BaseException:
            await lease.disconnect(timeout_s=1.0)
            raise
        if done or busy:
            client.ack(m)
            await lease.disconnect(timeout_s=1.0)
            self.log(f"job {job.job_id} is " + ("already done" if done else f"running on {runner}") +
                     ": this copy is dropped, nothing published")
            return
        if job.attempt > self.max_attempts:
            await self._finish(job, ok=False, results=sum(seen.values()), t0=time.monotonic(),
                               error=f"gave up after {self.max_attempts} attempts (a worker was lost during each)")
            client.ack(m)
            await lease.disconnect(timeout_s=1.0)
            return
        client.ack(m)  # from here the lease's will holds the job
        await self._run_leased(job, lease, skip=seen)

    async def _reject(self, e: JobRejected) -> None:
        self.log(f"job {e.job_id or '(no valid job_id)'} rejected: {e}")
        if e.job_id:
            await self._finish(Job(job_id=e.job_id, source="?"), ok=False, results=0, t0=time.monotonic(),
                               error=str(e))

    async def _job_state(self, client: BusClient, job: Job) -> tuple[bool, dict[str, int], dict]:
        """(done marker present, highest index published per result type, retained status)."""
        state = await read_retained(client, self.topics.job_all(job.job_id))
        done, seen, status = False, {}, {}
        for topic, payload in state.items():
            leaf = topic.rsplit("/", 1)[-1]
            try:
                obj = json.loads(payload)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if not isinstance(obj, dict):
                continue
            if leaf == "done":
                done = True
            elif leaf == "status":
                status = obj
            elif isinstance(obj.get("index"), int):
                seen[leaf] = max(seen.get(leaf, 0), obj["index"])
        return done, seen, status

    async def _runs(self, client: BusClient, worker_id: str, job_id: str) -> bool:
        """Is `worker_id` online and running `job_id` now (a second copy of a job that is alive)?"""
        topic = self.topics.worker(worker_id)
        seen = (await read_retained(client, topic)).get(topic)
        try:
            info = json.loads(seen) if seen else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
        return isinstance(info, dict) and info.get("state") == "online" and info.get("job") == job_id

    async def _run_leased(self, job: Job, lease: BusClient, *, skip: dict[str, int]) -> None:
        self.job, self._lease_lost = job, False
        t0 = time.monotonic()
        await self.announce()
        self.log(f"job {job.job_id}: {job.source} (attempt {job.attempt}" + (f", {sum(skip.values())} results already out)" if skip else ")"))
        watch = asyncio.ensure_future(self._watch_lease(lease))
        outcome, error, sink = "error", None, None
        try:
            await self.publish(self.topics.job(job.job_id, "status"),
                               job_status(job.job_id, "running", worker=self.worker_id, attempt=job.attempt))
            outcome, error, sink = await self._run_job(job, skip=skip)
        except BusDisconnected as e:
            outcome, error = "aborted", str(e)
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        if self._lease_lost:
            outcome, error = "aborted", "lease connection lost"
        results = sink.results if sink else sum(skip.values())
        try:
            if outcome == "aborted":
                raise BusDisconnected(error or "stopped")
            await self._finish(job, ok=outcome == "done", results=results, t0=t0, error=error,
                               undelivered=sink.refused if sink else 0)
        except BusDisconnected as e:
            # give the job back: the lease's will puts it on the queue again (attempt + 1)
            await lease.drop()
            self.log(f"job {job.job_id} given back ({e})")
            if not self.stopping.is_set():
                self._give_back = job  # checked again once we are connected (the will may be lost)
        else:
            await lease.disconnect(timeout_s=1.0)  # clean: the broker discards the will
            self.jobs_done += 1
        finally:
            self.job = None
            await self.announce()

    def stop_job(self) -> None:
        """End the job's run early (it is given back, not finished)."""
        if self._runtime is not None:
            self._runtime.request_stop("stop")

    async def _watch_lease(self, lease: BusClient) -> None:
        try:
            async for _ in lease.messages():
                pass
        except BusDisconnected:
            pass
        self._lease_lost = True
        self.stop_job()

    async def _run_job(self, job: Job, *, skip: dict[str, int]) -> tuple[str, str | None, JobSink | None]:
        """Run the job's graph; ("done" | "error" | "aborted", error text, sink)."""
        from framecast.stages.app import build_graph

        try:
            cfg = job_config(self.base, job, output_dir=self.output_dir)
            source, stages = build_graph(cfg, model_loader=self._model_loader)
        except (JobRejected, UserError) as e:
            return "error", str(e), None
        src = cfg.source
        endless = getattr(source, "endless", source.live) or src.uri == "demo"
        if endless and not (src.max_frames or src.end or src.duration):
            # it would hold this worker for ever: a camera is a stream, not a job (a file paced in
            # real time still ends with the file)
            return "error", (f"{redact_url(src.uri)}: a live source without an end; give source.max_frames, source.end or "
                             "source.duration, or run it with `framecast worker --streams`"), None
        sink = JobSink(self, job, skip=skip)
        errors: list[str] = []
        runtime = Runtime(source, [*stages, sink], edge_size=cfg.runtime.edge_size,
                          stop_timeout=cfg.runtime.stop_timeout_s, stream_id=job.job_id,
                          on_error=lambda err: errors.append(err.text))
        self._runtime = runtime
        if self.stopping.is_set():  # a signal came while the job was being set up
            runtime.request_stop("signal")
        try:
            result = await runtime.run(handle_signals=False)
        finally:
            self._runtime = None
        if sink.aborted or self._lease_lost or result.stopped_by in ("signal", "stop"):
            return "aborted", sink.aborted or "stopped", sink
        if result.exit_code != 0:
            fatal = [e.text for e in result.errors if e.fatal] or errors or [f"exit code {result.exit_code}"]
            return "error", fatal[0], sink
        return "done", None, sink

    async def _finish(self, job: Job, *, ok: bool, results: int, t0: float, error: str | None,
                      undelivered: int = 0) -> None:
        """The done marker first (the exactly-once guard), then the final status."""
        elapsed = time.monotonic() - t0
        await self.publish(self.topics.job(job.job_id, "done"),
                           job_done(job.job_id, ok=ok, results=results, worker=self.worker_id,
                                    attempt=job.attempt, elapsed_s=elapsed,
                                    error=redact_text(error) if error else error, undelivered=undelivered))
        await self.publish(self.topics.job(job.job_id, "status"),
                           job_status(job.job_id, "done" if ok else "error", worker=self.worker_id,
                                      attempt=job.attempt, results=results, error=error))
        self.log(f"job {job.job_id} {'done' if ok else 'failed: ' + (error or '')} ({results} results, {elapsed:.1f} s)")


def worker_main(base: RunConfig, *, url: str, group: str, worker_id: str | None, prefix: str, streams: bool,
                tls: TlsFiles, max_attempts: int, session_expiry_s: int, keepalive_s: int,
                run_args: list[str], output_dir: str | None = None, reap_after_s: float = DEFAULT_GRACE_S) -> int:
    """`framecast worker`: returns the exit code (0 after SIGINT/SIGTERM)."""
    kw = dict(url=url, group=group, worker_id=worker_id or default_worker_id(), prefix=prefix, tls=tls,
              keepalive_s=keepalive_s, session_expiry_s=session_expiry_s)
    if streams:
        from framecast.stages.mqtt.streams import StreamWorker

        member: FleetMember = StreamWorker(base, run_args=run_args, **kw)
    else:
        if output_dir and not os.path.isdir(output_dir):
            raise UserError(f"--output-dir {output_dir!r}: no such directory")
        member = JobWorker(base, max_attempts=max_attempts, output_dir=output_dir, reap_after_s=reap_after_s, **kw)
        member.load_model()
    return asyncio.run(member.run())
