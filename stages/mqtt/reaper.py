"""Give the jobs held by a departed worker's session back to the queue.

A broker may hand a shared-subscription message to a member whose persistent session is
offline, and keep it there: mosquitto 2.0 does (measured: a killed member of two went on
receiving every second job, delivered only when it came back), and EMQX queues for offline
persistent sessions too. So a worker that leaves for good would sit on the jobs assigned to it
until its session expires, and then they would be dropped.

Every job worker watches the retained presence of the others. When a job worker of its group
has been offline for `grace_s` (long enough for a restart to bring it back), one live worker,
the same one in every worker's eyes (`jobs.assign`), takes the departed worker's session over:
it connects with the departed worker's client id (MQTT resumes that session), unsubscribes it
from the queue so nothing new is assigned to it, publishes every job the session held back to
the queue, acknowledges it, and leaves with session expiry 0 so the broker deletes the session.
Its presence is then marked `reaped`. If the departed worker comes back meanwhile, it takes its
session back (the broker closes the reaper's connection) and resubscribes; a job published
twice this way runs once (the done marker, and the check for a live worker running it).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from framecast.stages.mqtt.client import BusClient, BusDisconnected, BusMessage, BusProtocolRejected, BusRefused
from framecast.stages.mqtt.fleet import member_info
from framecast.stages.mqtt.jobs import assign, worker_status
from framecast.stages.mqtt.topics import JSON

if TYPE_CHECKING:
    from framecast.stages.mqtt.worker import JobWorker

DEFAULT_GRACE_S = 60.0
SWEEP_S = 1.0
DRAIN_IDLE_S = 1.0  # the session's messages come right after CONNACK: this long without one = drained
DRAIN_MAX_S = 30.0


class Reaper:
    def __init__(self, worker: "JobWorker", *, grace_s: float = DEFAULT_GRACE_S):
        self.worker = worker
        self.grace_s = grace_s
        self.members: dict[str, dict] = {}
        self._offline_since: dict[str, float] = {}
        self.reaped = 0

    async def run(self) -> None:
        """The worker's lifetime: watch presence on a connection of its own, sweep every second."""
        w = self.worker
        while not w.stopping.is_set():
            watch = BusClient(w.address, client_id=f"framecast-watch-{w.worker_id}", protocol="5", tls=w.tls,
                              keepalive_s=w.keepalive_s)
            try:
                await watch.connect()
                await watch.subscribe(w.topics.workers, qos=1)
                listen = asyncio.ensure_future(self._listen(watch))
                try:
                    while not listen.done() and not w.stopping.is_set():
                        await asyncio.sleep(SWEEP_S)
                        await self._sweep()
                    if listen.done():
                        listen.result()  # BusDisconnected
                finally:
                    listen.cancel()
                    await asyncio.gather(listen, return_exceptions=True)
            except (BusDisconnected, BusRefused, BusProtocolRejected):
                pass  # the worker's main loop reports the broker's state; try again shortly
            finally:
                await watch.disconnect(timeout_s=1.0)
            try:
                await asyncio.wait_for(w.stopping.wait(), timeout=2.0)
            except asyncio.TimeoutError:
                pass

    async def _listen(self, watch: BusClient) -> None:
        async for m in watch.messages():
            wid = m.topic.rsplit("/", 1)[-1]
            self.members[wid] = member_info(m.payload)
            if self.members[wid].get("state") != "offline":
                self._offline_since.pop(wid, None)

    def _peers(self) -> tuple[list[str], list[str]]:
        """(online job workers of this group incl. us, departed ones not reaped yet)."""
        w = self.worker
        mine = {wid: i for wid, i in self.members.items() if i.get("role") == w.role and i.get("group") == w.group}
        online = sorted({*(wid for wid, i in mine.items() if i.get("state") == "online"), w.worker_id})
        gone = sorted(wid for wid, i in mine.items()
                      if i.get("state") == "offline" and not i.get("reaped") and wid != w.worker_id)
        return online, gone

    async def _sweep(self) -> None:
        now = time.monotonic()
        online, gone = self._peers()
        for wid in gone:
            since = self._offline_since.setdefault(wid, now)
            if now - since >= self.grace_s and assign([wid], online).get(wid) == self.worker.worker_id:
                await self.reap(wid)

    async def reap(self, departed: str) -> int:
        """Move the jobs of `departed`'s session back to the queue; the number moved."""
        w = self.worker
        # clean start off + session expiry 0: resume its session, which the broker deletes when we leave
        session = BusClient(w.address, client_id=f"framecast-{w.role}-{departed}", protocol="5", tls=w.tls,
                            keepalive_s=w.keepalive_s, persistent_session=True, session_expiry_s=0,
                            manual_ack=True, receive_maximum=16)
        moved = 0
        try:
            await session.connect()
            await session.unsubscribe(w.topics.shared_queue(w.group))  # nothing new lands there
            messages = session.messages()
            deadline = time.monotonic() + DRAIN_MAX_S
            while time.monotonic() < deadline:
                try:
                    m = await asyncio.wait_for(messages.__anext__(), timeout=DRAIN_IDLE_S)
                except asyncio.TimeoutError:
                    break
                if m.topic == w.topics.queue and m.payload:
                    await session.publish(BusMessage(w.topics.queue, m.payload, qos=1, content_type=JSON))
                    moved += 1
                session.ack(m)
            await session.publish(BusMessage(
                w.topics.worker(departed),
                worker_status(departed, "offline", group=w.group, role=w.role, reaped=True,
                              text=f"session reaped by {w.worker_id}: {moved} jobs back on the queue"),
                qos=1, retain=True, content_type=JSON))
        except (BusDisconnected, StopAsyncIteration) as e:  # it came back and took its session over
            w.log(f"reaping {departed} stopped: {e}")
            return moved
        finally:
            await session.disconnect(timeout_s=1.0)
        self.members.setdefault(departed, {})["reaped"] = True
        self.reaped += moved
        w.log(f"departed worker {departed}: {moved} jobs from its session back on the queue")
        return moved
