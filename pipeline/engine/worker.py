"""The one thread per model that runs all of its MLX compute (encoder and every session).

Stages and sessions `await worker.run(fn, ...)`: the event loop never blocks on MLX, and work
for one model runs strictly in submission order on one thread (MLX streams and caches are not
shared across threads).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import queue
import threading
from typing import Any, Callable

WORKER_EXIT_WAIT_S = 30.0
_WAKE = (None, None)  # an empty job: wakes the loop for an urgent one  # at interpreter exit, wait this long for a worker to go idle


class ModelWorker:
    """The one thread that runs a model's MLX compute (encoder and every session on it).

    A daemon thread that never exits, instead of a ThreadPoolExecutor: with mlx 0.32 on Linux
    a thread that used MLX aborts the process ("terminate called without an active exception")
    in roughly half of the runs when it exits, which an executor's threads do at interpreter
    shutdown. A parked daemon thread never exits; at exit we only wait (bounded) until it is
    idle, so it is not cut off in the middle of a step.
    """

    def __init__(self, name: str = "model", *, exit_wait_s: float = WORKER_EXIT_WAIT_S):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._urgent: collections.deque = collections.deque()  # e.g. a question's turn
        self._pending = 0
        self._lock = threading.Condition()
        self._closed = False
        self.exit_wait_s = exit_wait_s
        self._thread = threading.Thread(target=self._loop, name=f"framecast-{name}", daemon=True)
        self._thread.start()
        atexit.register(self.wait_idle)

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            while self._urgent:  # urgent jobs go ahead of every job not yet started
                self._run_job(self._urgent.popleft())
            if job is not _WAKE:
                self._run_job(job)

    def _run_job(self, job: tuple[Callable, concurrent.futures.Future]) -> None:
        fn, fut = job
        try:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # delivered to the awaiting coroutine
                    fut.set_exception(e)
        finally:
            with self._lock:
                self._pending -= 1
                self._lock.notify_all()

    def submit_sync(self, fn: Callable, *args: Any, **kw: Any) -> concurrent.futures.Future:
        if self._closed:
            raise RuntimeError("model worker is closed")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._pending += 1
        self._jobs.put((lambda: fn(*args, **kw), fut))
        return fut

    def submit_urgent(self, fn: Callable, *args: Any, **kw: Any) -> concurrent.futures.Future:
        """Like `submit_sync`, but ahead of every job not yet started (urgent jobs keep their
        own order): the steps of a question's turn overtake other streams' narrations."""
        if self._closed:
            raise RuntimeError("model worker is closed")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._pending += 1
        self._urgent.append((lambda: fn(*args, **kw), fut))
        self._jobs.put(_WAKE)  # wakes the loop; it runs urgent jobs first
        return fut

    def submit(self, fn: Callable, *args: Any, **kw: Any) -> asyncio.Future:
        return asyncio.wrap_future(self.submit_sync(fn, *args, **kw))

    async def run(self, fn: Callable, *args: Any, **kw: Any) -> Any:
        return await self.submit(fn, *args, **kw)

    @property
    def queued(self) -> int:
        """Jobs waiting behind the running one: a long job (a turn) hands the thread over
        between its steps while this is non-zero (several streams share one worker)."""
        return self._jobs.qsize() + len(self._urgent)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no job is queued or running (True), or `timeout` (default exit_wait_s)."""
        with self._lock:
            return self._lock.wait_for(lambda: self._pending == 0,
                                       self.exit_wait_s if timeout is None else timeout)

    def close(self) -> None:
        """Refuse new work and wait for queued work; the thread stays parked (see above)."""
        self._closed = True
        self.wait_idle()


_WORKERS: dict[int, tuple[Any, ModelWorker]] = {}
_WORKERS_LOCK = threading.Lock()


def worker_for(model: Any) -> ModelWorker:
    """The shared worker of `model` (created on first use; the model is kept alive with it)."""
    with _WORKERS_LOCK:
        entry = _WORKERS.get(id(model))
        if entry is None or entry[0] is not model:
            entry = _WORKERS[id(model)] = (model, ModelWorker(type(model).__name__))
        return entry[1]
