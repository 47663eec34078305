"""`framecast worker --streams`: a fleet of workers splits the live streams listed in the
retained `<prefix>/streams` topic; each stream runs as its own `framecast run` child process
publishing under `<prefix>/<stream>/…` as a single run does.

Every worker sees the same inputs (the retained list and the retained presence of the others
under `<prefix>/workers/+`) and computes the same split (`jobs.assign`). A worker that leaves
publishes `offline` (or the broker does, as its Last Will) and the others take its streams at
once. Children die with their worker (PR_SET_PDEATHSIG) and are restarted with backoff when
they exit on their own (a camera that stayed away longer than `source.reconnect_max`).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from framecast.config import RunConfig
from framecast.stages.mqtt.client import BusClient, BusDisconnected, BusMessage
from framecast.stages.mqtt.jobs import JobRejected, StreamList, StreamSpec, assign, flat_settings, parse_streams
from framecast.stages.mqtt.fleet import FleetMember, member_info

CHILD_STOP_S = 15.0  # a `framecast run` exits within stop_timeout (10 s) + its MQTT close (3 s)
RESTART_MAX_S = 30.0
MONITOR_S = 0.5


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Child:
    spec: StreamSpec
    proc: asyncio.subprocess.Process
    started: float
    restarts: int = 0
    restart_at: float | None = None  # exited: start again at this monotonic time


class StreamWorker(FleetMember):
    role = "streams"

    def __init__(self, base: RunConfig, *, run_args: list[str], **kw: Any):
        super().__init__(base, **kw)
        self.run_args = run_args
        self.specs: dict[str, StreamSpec] = {}
        self.members: dict[str, dict] = {}
        self.children: dict[str, Child] = {}
        self._stopping_children: set[asyncio.Task] = set()
        self._monitor: asyncio.Task | None = None

    def presence(self) -> dict[str, Any]:
        return {"streams": sorted(self.children)}

    async def on_connected(self, client: BusClient) -> None:
        await client.subscribe(self.topics.streams, qos=1)
        await client.subscribe(self.topics.workers, qos=1)
        if self._monitor is None:
            self._monitor = asyncio.create_task(self._watch_children())

    async def on_message(self, client: BusClient, m: BusMessage) -> None:
        if m.topic == self.topics.streams:
            try:
                streams = parse_streams(m.payload)
            except JobRejected as e:
                self.log(f"{self.topics.streams}: {e} (keeping the previous list)")
                return
            self.specs = {s.stream_id: s for s in streams.streams}
        elif m.topic.startswith(self.topics.workers[:-1]):
            wid = m.topic.rsplit("/", 1)[-1]
            self.members[wid] = member_info(m.payload)
        else:
            return
        await self.reconcile()

    def fleet(self) -> list[str]:
        alive = [w for w, p in self.members.items()
                 if p.get("state") == "online" and p.get("role") == self.role and p.get("group") == self.group]
        return sorted({*alive, self.worker_id})

    async def reconcile(self) -> None:
        if self.stopping.is_set():
            return
        split = assign(list(self.specs), self.fleet())
        mine = {s for s, w in split.items() if w == self.worker_id}
        changed = False
        for sid, child in list(self.children.items()):
            if sid not in mine or child.spec != self.specs.get(sid):
                self._stop_child(sid)
                changed = True
        for sid in sorted(mine - set(self.children)):
            await self._start_child(self.specs[sid])
            changed = True
        if changed:
            self.log(f"streams: {', '.join(sorted(self.children)) or '(none)'}")
            await self.announce()

    def _command(self, spec: StreamSpec) -> list[str]:
        """The child's command line. The broker URL is not on it (it may hold a password, and any
        user can read a process's arguments): it travels in the child's environment (`_env`)."""
        sets = [f"--set={k}={json.dumps(v)}" for k, v in flat_settings(spec.settings, spec.stream_id).items()]
        return [sys.executable, "-m", "framecast", "run", "--source", spec.source, "--stream-id", spec.stream_id,
                "--mqtt-prefix", self.topics.prefix, "--no-console", *self.run_args, *sets]

    def _env(self) -> dict[str, str]:
        """The child's environment: ours plus FRAMECAST_MQTT__URL (readable by its owner only)."""
        return {**os.environ, "FRAMECAST_MQTT__URL": self.url}

    async def _start_child(self, spec: StreamSpec, restarts: int = 0) -> None:
        proc = await asyncio.create_subprocess_exec(*self._command(spec), stdin=subprocess.DEVNULL,
                                                    stdout=subprocess.DEVNULL, env=self._env(),
                                                    preexec_fn=_die_with_parent)
        self.children[spec.stream_id] = Child(spec, proc, time.monotonic(), restarts)

    def _stop_child(self, sid: str) -> None:
        child = self.children.pop(sid)
        if child.proc.returncode is None:
            child.proc.send_signal(signal.SIGTERM)  # now, not when the task first runs
        task = asyncio.ensure_future(self._terminate(child.proc))
        self._stopping_children.add(task)
        task.add_done_callback(self._stopping_children.discard)

    @staticmethod
    async def _terminate(proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:  # SIGTERM sent: the run publishes `stopped` and leaves cleanly
            try:
                await asyncio.wait_for(proc.wait(), timeout=CHILD_STOP_S)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()

    async def _watch_children(self) -> None:
        """Restart a stream whose run exited on its own (backoff doubling to 30 s)."""
        while True:
            await asyncio.sleep(MONITOR_S)
            now = time.monotonic()
            for sid, child in list(self.children.items()):
                if child.proc.returncode is None or self.stopping.is_set():
                    continue
                if child.restart_at is None:
                    # a run that stayed up a minute starts the backoff over
                    n = 0 if now - child.started > 60 else child.restarts + 1
                    delay = min(RESTART_MAX_S, 2.0 ** n)
                    child.restarts, child.restart_at = n, now + delay
                    self.log(f"stream {sid} exited with status {child.proc.returncode}; restarting in {delay:g} s")
                elif now >= child.restart_at:
                    await self._start_child(child.spec, child.restarts)

    async def on_stop(self) -> None:
        """Leaving: SIGTERM every run, say `offline` at once (the others start their copies while
        ours close: a camera read twice for a moment beats one not read), then wait for them."""
        for sid in list(self.children):
            self._stop_child(sid)
        if self.stopping.is_set() and self.client is not None:
            try:
                await self.client.publish(self._presence_message("offline", "stopped"), timeout_s=1.0)
            except BusDisconnected:
                pass
        if self._stopping_children:
            await asyncio.gather(*self._stopping_children, return_exceptions=True)
        if self._monitor is not None and self.stopping.is_set():
            self._monitor.cancel()


def stream_list_payload(pairs: list[str]) -> bytes:
    """`ID=SOURCE` pairs (from `framecast submit --stream`) as the retained list's JSON."""
    specs = []
    for item in pairs:
        sid, sep, src = item.partition("=")
        if not sep or not src:
            from framecast.errors import UserError

            raise UserError(f"--stream {item!r}: expected ID=SOURCE, e.g. frontdoor=rtsp://cam1/stream")
        specs.append({"stream_id": sid.strip(), "source": src.strip()})
    try:
        parsed = parse_streams(json.dumps({"streams": specs}).encode())
    except JobRejected as e:
        from framecast.errors import UserError

        raise UserError(str(e)) from None
    return StreamList.model_validate(parsed).model_dump_json().encode()
