"""The async runtime: stages joined by bounded edges, a control lane, signals, metrics.

A graph is a chain `source -> stage -> ... -> stage`. Each edge is a bounded queue with a
policy: live sources drop the oldest *frame* when the consumer lags (latest frame wins, every
drop counted); recorded sources block the producer (backpressure, nothing lost). Only `Frame`s
are ever dropped: narrations, answers and status events are small and always delivered.

Control messages (`event.control`: Stop, Flush, Question) go to a lane of their own on every
edge and overtake queued data. `EndOfStream` travels in data order, so a stage sees all data
before it. A stage that raises reports an `Error` event downstream and keeps going; a
`FatalError` stops the graph with a non-zero exit code. Stopping (SIGINT/SIGTERM, `Stop`, end of
input) drains the edges within `stop_timeout` seconds, then cancels, then closes every stage
(outputs flush there) — so nothing already produced is lost.

Every wait on the way out has a bound: the source gets `SOURCE_GRACE_S` to notice a stop, the
stages `stop_timeout` to drain, each `close` `DEFAULT_CLOSE_TIMEOUT`. A second SIGINT/SIGTERM
hurries all of it (cancel at once, `HURRY_CLOSE_S` per close); a third exits at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, Literal

from framecast.errors import FatalError
from framecast.events import EndOfStream, Error, Event, Frame, Metrics, Stop

__all__ = ["Edge", "FatalError", "Runtime", "RunResult", "Source", "Stage", "StageHandle", "StageMetrics",
           "run_graph"]

EdgePolicy = Literal["block", "drop_oldest"]

DEFAULT_EDGE_SIZE = 8
DEFAULT_STOP_TIMEOUT = 10.0
DEFAULT_CLOSE_TIMEOUT = 5.0
SOURCE_GRACE_S = 2.0  # a stopped source gets this long to end by itself before it is cancelled
CANCEL_GRACE_S = 1.0  # a cancelled task gets this long to unwind before the runtime moves on
HURRY_CLOSE_S = 0.5  # after a second signal: each stage's close gets this long
LATENCY_WINDOW = 256


# ---------------------------------------------------------------- edges


class Edge:
    """A bounded queue with a control lane that overtakes data."""

    def __init__(self, name: str, *, maxsize: int = DEFAULT_EDGE_SIZE, policy: EdgePolicy = "block"):
        self.name = name
        self.maxsize = maxsize
        self.policy = policy
        self._data: collections.deque[Event] = collections.deque()
        self._control: collections.deque[Event] = collections.deque()
        self._changed = asyncio.Condition()
        self.drops = 0
        self.max_depth = 0

    @property
    def depth(self) -> int:
        return len(self._data)

    async def put(self, item: Event, *, force: bool = False) -> None:
        """Queue `item`. Full edge: drop_oldest evicts the oldest queued frame (for any item:
        events other than frames are never dropped), block waits. `force` never waits (shutdown
        uses it so that a hung consumer cannot block the end-of-stream marker)."""
        async with self._changed:
            if item.control:
                self._control.append(item)
            else:
                while len(self._data) >= self.maxsize and not force:
                    if self.policy == "drop_oldest" and self._drop_oldest_frame():
                        break
                    await self._changed.wait()
                self._data.append(item)
                self.max_depth = max(self.max_depth, len(self._data))
            self._changed.notify_all()

    def _drop_oldest_frame(self) -> bool:
        for i, queued in enumerate(self._data):
            if isinstance(queued, Frame):
                del self._data[i]
                self.drops += 1
                return True
        return False

    async def get(self) -> Event:
        async with self._changed:
            while not self._control and not self._data:
                await self._changed.wait()
            item = self._control.popleft() if self._control else self._data.popleft()
            self._changed.notify_all()
            return item


# ---------------------------------------------------------------- stages


@dataclass
class StageMetrics:
    items_in: int = 0
    items_out: int = 0
    errors: int = 0
    started: float = field(default_factory=time.monotonic)
    latencies: collections.deque = field(default_factory=lambda: collections.deque(maxlen=LATENCY_WINDOW))
    extra: dict[str, float] = field(default_factory=dict)  # stage-specific counters

    def snapshot(self, edge: Edge | None) -> dict[str, float]:
        lat = sorted(self.latencies)
        elapsed = max(time.monotonic() - self.started, 1e-9)
        out = {
            "items_in": self.items_in,
            "items_out": self.items_out,
            "errors": self.errors,
            "throughput_per_s": round(self.items_in / elapsed, 3),
            "latency_ms_p50": round(lat[len(lat) // 2] * 1e3, 3) if lat else 0.0,
            "latency_ms_p95": round(lat[int(len(lat) * 0.95)] * 1e3, 3) if lat else 0.0,
            "queue_depth": edge.depth if edge else 0,
            "queue_max_depth": edge.max_depth if edge else 0,
            "drops": edge.drops if edge else 0,
        }
        out.update(self.extra)
        return out


class StageHandle:
    """What a stage may ask of the graph it runs in, and nothing more (pipecat's narrow frame
    processor view): inject an event at the head, fail the run, report an error, see that the
    run is stopping (and why), read the stream id and the frames dropped so far."""

    def __init__(self, runtime: Runtime, stage: Stage):
        self._runtime = runtime
        self._stage = stage

    @property
    def stopping(self) -> asyncio.Event:
        """Set once the run is stopping (signal, Stop, fatal error, end of input)."""
        return self._runtime.source.stopping

    @property
    def stopped_by(self) -> str:
        """Why the run is ending: eos | signal | fatal | stop."""
        return self._runtime.stopped_by

    @property
    def stream_id(self) -> str:
        return self._runtime.stream_id

    async def inject(self, event: Event, *, force: bool = False) -> None:
        """Send an event into the graph at its head (control events overtake queued frames).
        `force`: never wait for room (a stage injecting from inside the graph must not wait on
        itself: it may be what empties the edges)."""
        await self._runtime.inject(event, force=force)

    async def inject_answer(self, event: Event) -> None:
        """Send an answer made outside the answering stage (an error answer) to the stages
        after it, at once: it never waits behind frames or for room on an edge."""
        await self._runtime.inject_after_answerers(event)

    @property
    def answers_questions(self) -> bool:
        """Whether some stage of the graph answers `Question`s (declares `answers_questions`)."""
        return any(getattr(st, "answers_questions", False) for st in self._runtime.stages)

    def fail(self, message: str, *, exit_code: int = 1) -> Error:
        """A fatal error of this stage: recorded, and the run stops (nothing produced is lost)."""
        return self._runtime.fail(message, stage=self._stage.name, exit_code=exit_code)

    def report(self, err: Error) -> None:
        """Record an error this stage sends downstream itself (fatal ones set the exit code)."""
        self._runtime.report(err)

    @property
    def frames_read(self) -> int:
        """Frames the source has delivered so far. Until the first one, an output leaves a file
        that already exists as it was (a run that fails at its start destroys nothing)."""
        return self._runtime.frames_read

    def frames_dropped(self) -> int:
        """Frames dropped on the graph's edges so far (live sources: the consumer lagged)."""
        return sum(e.drops for e in self._runtime.edges)


class Stage:
    """One step of the graph. Override `process` (data) and/or `on_control` (control).

    Stages see events, never another stage. `emit` lets a stage push events on its own
    (e.g. from a timer or a network callback); `handle` (set by the Runtime, None outside
    one) is all a stage may ask of the graph: `handle.inject` sends control upstream-to-down.
    `runtime` is the Runtime itself, for tests and the composition root, not for stage code.
    """

    name: str = "stage"

    def __init__(self, *, name: str | None = None):
        if name:
            self.name = name
        self.metrics = StageMetrics()
        self.runtime: Runtime | None = None
        self.handle: StageHandle | None = None
        self._out: Edge | None = None

    async def start(self) -> None:
        """Open resources. Raise FatalError for input that cannot work."""

    async def process(self, item: Event) -> AsyncIterator[Event]:
        yield item

    async def on_control(self, msg: Event) -> AsyncIterator[Event]:
        yield msg

    async def on_end(self) -> AsyncIterator[Event]:
        """End of stream reached this stage: yield anything still pending."""
        return
        yield  # pragma: no cover

    async def close(self) -> None:
        """Flush and release. Called once, also after errors and cancellation."""

    async def emit(self, item: Event) -> None:
        if self._out is not None:
            await self._out.put(item)
            self.metrics.items_out += 1


class Source(Stage):
    """The head of a graph. `live` sources get drop-oldest edges, recorded ones backpressure."""

    live: bool = False

    def __init__(self, *, name: str | None = None):
        super().__init__(name=name)
        self.stopping = asyncio.Event()

    async def frames(self) -> AsyncIterator[Event]:
        """Yield frames (and status events) until exhausted or `self.stopping` is set."""
        return
        yield  # pragma: no cover


# ---------------------------------------------------------------- the runner


@dataclass
class RunResult:
    exit_code: int
    errors: list[Error]
    metrics: dict[str, dict[str, float]]
    stopped_by: str  # eos | signal | fatal | stop
    signal: int | None = None  # the signal that stopped the run (SIGINT, SIGTERM)


class Runtime:
    """Runs a chain of stages to completion (or until stopped)."""

    def __init__(
        self,
        source: Source,
        stages: Iterable[Stage],
        *,
        edge_size: int = DEFAULT_EDGE_SIZE,
        policy: EdgePolicy | None = None,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        metrics_interval: float | None = None,
        on_metrics: Callable[[dict[str, dict[str, float]]], None] | None = None,
        on_error: Callable[[Error], None] | None = None,
        stream_id: str = "default",
    ):
        self.source = source
        self.stages = list(stages)
        self.stream_id = stream_id
        policy = policy or ("drop_oldest" if source.live else "block")
        self.edges = [Edge(f"{s.name}.in", maxsize=edge_size, policy=policy) for s in self.stages]
        self.stop_timeout = stop_timeout
        self.metrics_interval = metrics_interval
        self.on_metrics = on_metrics
        self.on_error = on_error
        self.errors: list[Error] = []
        self._exit_code = 0
        self._stopped_by = "eos"
        self._metrics_seq = 0
        self._signal: int | None = None
        self._signals = 0
        self._stage_tasks: list[asyncio.Task] = []
        self._source_task: asyncio.Task | None = None
        self._eos_sent = False
        self.frames_read = 0  # frames the source delivered: outputs replace an existing file only after the first
        self._hurry = asyncio.Event()  # a second signal: stop waiting for anything
        for i, st in enumerate([source, *self.stages]):
            st.runtime = self
            st.handle = StageHandle(self, st)
            st._out = self.edges[i] if i < len(self.edges) else None

    # -- control from outside (signals, MQTT questions, tests)

    async def inject_after_answerers(self, msg: Event) -> None:
        """Put `msg` on the edge just after the last stage that answers questions (so the
        outputs see it next), never waiting for room: an error answer to a refused question
        must neither queue behind frames nor stall the code that refuses questions."""
        k = max((i + 1 for i, st in enumerate(self.stages) if getattr(st, "answers_questions", False)), default=0)
        if k < len(self.edges):
            await self.edges[k].put(msg, force=True)

    async def inject(self, msg: Event, *, force: bool = False) -> None:
        """Put a control message (or data) at the head of the chain, after the source. `force`:
        never wait for room (a stage injecting from inside the graph must not wait on itself)."""
        if self.edges:
            await self.edges[0].put(msg, force=force)

    @property
    def stopped_by(self) -> str:
        """Why the run is ending: eos (input exhausted) | signal | fatal | stop.

        `fatal` whenever a fatal error was recorded (the exit status is then non-zero), even
        if a signal or the end of input came first: end markers and exit status always agree."""
        return "fatal" if self._exit_code else self._stopped_by

    def request_stop(self, reason: str = "stop") -> None:
        if not self.source.stopping.is_set():
            self._stopped_by = reason
            self.source.stopping.set()

    def _on_signal(self, sig: int) -> None:
        """First SIGINT/SIGTERM: stop cleanly (drain, flush, close). A second one: hurry — the
        source and the stages are cancelled at once and each close gets `HURRY_CLOSE_S` (files
        still get their end marker). A third: exit at once (the files keep every line already
        written, without the end marker)."""
        self._signals += 1
        if self._signals == 1:
            self._signal = sig
            self.request_stop("signal")
            return
        if self._signals == 2:
            self._hurry.set()
            for t in [self._source_task, *self._stage_tasks]:
                if t is not None:
                    t.cancel()
            return
        print("framecast: third signal: exiting without waiting", file=sys.stderr, flush=True)
        os._exit(128 + sig)

    def metrics_snapshot(self) -> dict[str, dict[str, float]]:
        snap = {self.source.name: self.source.metrics.snapshot(None)}
        for st, edge in zip(self.stages, self.edges):
            snap[st.name] = st.metrics.snapshot(edge)
        return snap

    def _record_error(self, err: Error) -> None:
        self.errors.append(err)
        if self.on_error:
            try:
                self.on_error(err)
            except Exception:  # noqa: BLE001 -- e.g. stderr is a closed pipe or a full disk:
                pass  # reporting must never change how the run ends, or leave a stage task dead

    def report(self, err: Error) -> None:
        """Record an error a stage sends downstream itself (e.g. a non-fatal capture warning)."""
        self._record_error(err)
        if err.fatal:
            self._exit_code = self._exit_code or 1

    def fail(self, message: str, *, stage: str, exit_code: int = 1) -> Error:
        """Record a fatal error and stop the graph (nothing produced so far is lost)."""
        err = Error(text=message, stage=stage, fatal=True, stream_id=self.stream_id)
        self._exit_code = self._exit_code or exit_code  # before reporting: the outcome is settled first
        self.request_stop("fatal")
        self._record_error(err)
        return err

    # -- tasks

    async def _run_source(self) -> None:
        src, out = self.source, self.edges[0] if self.edges else None
        cancelled = False
        try:
            await src.start()
            # Sources watch `stopping` themselves and end with a final status event; one that
            # does not is cancelled by `run` after a grace period.
            async for item in src.frames():
                src.metrics.items_in += 1
                if isinstance(item, Frame):
                    self.frames_read += 1
                if out is not None:
                    await out.put(item)
                    src.metrics.items_out += 1
        except FatalError as e:
            err = self.fail(str(e), stage=src.name, exit_code=e.exit_code)
            if out is not None:
                await out.put(err)
        except asyncio.CancelledError:
            cancelled = True
            raise
        except Exception as e:  # a bug or an unexpected library error: report, do not vanish
            err = self.fail(f"{type(e).__name__}: {e}", stage=src.name)
            if out is not None:
                await out.put(err)
        finally:
            # after a cancel (stop, second signal) the consumer may be gone for good: an await
            # for room on its full edge would never return (the run would hang), so force it
            await self._send_eos(force=cancelled)

    async def _send_eos(self, *, force: bool) -> None:
        """The end-of-stream marker, once. `force`: never wait for room (only the edge's lock)."""
        if self._eos_sent or not self.edges:
            return
        await self.edges[0].put(EndOfStream(stream_id=self.stream_id, text=self.stopped_by), force=force)
        self._eos_sent = True

    async def _run_stage(self, idx: int) -> None:
        st, inp = self.stages[idx], self.edges[idx]
        out = self.edges[idx + 1] if idx + 1 < len(self.edges) else None

        async def forward(gen: AsyncIterator[Event]) -> None:
            async for produced in gen:
                st.metrics.items_out += 1
                if out is not None:
                    await out.put(produced)

        while True:
            item = await inp.get()
            st.metrics.items_in += 1
            t0 = time.perf_counter()
            try:
                if isinstance(item, EndOfStream):
                    await forward(st.on_end())
                    if out is not None:
                        await out.put(item)
                    return
                if item.control:
                    await forward(st.on_control(item))
                else:
                    await forward(st.process(item))
            except asyncio.CancelledError:
                raise
            except FatalError as e:
                err = self.fail(str(e), stage=st.name, exit_code=e.exit_code)
                if out is not None:
                    await out.put(err)
            except Exception as e:
                st.metrics.errors += 1
                err = Error(text=f"{type(e).__name__}: {e}", stage=st.name, stream_id=self.stream_id,
                            pts=item.pts)
                self._record_error(err)
                if out is not None:
                    await out.put(err)
            finally:
                st.metrics.latencies.append(time.perf_counter() - t0)
            if isinstance(item, EndOfStream):
                # `on_end` failed (its error went out above): the end marker still travels on, or
                # every stage after this one would wait for it forever
                if out is not None:
                    await out.put(item)
                return

    async def _metrics_loop(self) -> None:
        assert self.metrics_interval
        while True:
            await asyncio.sleep(self.metrics_interval)
            await self._publish_metrics()

    async def _publish_metrics(self) -> None:
        snap = self.metrics_snapshot()
        if self.on_metrics:
            self.on_metrics(snap)
        self._metrics_seq += 1
        if self.edges:  # as data, so the bus and files see it too; never dropped (not a Frame)
            await self.edges[0].put(Metrics(stages=snap, stream_id=self.stream_id, seq=self._metrics_seq))

    async def _wait(self, tasks: Iterable[asyncio.Task], timeout: float | None = None, *,
                    until: asyncio.Event | None = None, hurry: bool = True) -> None:
        """Wait until every task is done, `timeout` passes, `until` is set or (with `hurry`) a
        second signal comes, whichever is first. Never raises, never cancels."""
        pending = {t for t in tasks if not t.done()}
        events = [e for e in (self._hurry if hurry else None, until) if e is not None]
        cutters = [asyncio.ensure_future(e.wait()) for e in events]
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            while pending and not any(c.done() for c in cutters):
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    return
                done, _ = await asyncio.wait(pending | set(cutters), timeout=left,
                                             return_when=asyncio.FIRST_COMPLETED)
                pending -= done
        finally:
            for c in cutters:
                c.cancel()

    async def _cancel(self, tasks: Iterable[asyncio.Task]) -> None:
        """Cancel and give them `CANCEL_GRACE_S` to unwind (a task that ignores cancellation is
        left behind rather than allowed to hang the shutdown)."""
        tasks = [t for t in tasks if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CANCEL_GRACE_S)

    async def run(self, *, handle_signals: bool = True, early_signals: list[int] | None = None) -> RunResult:
        """Run the graph to its end. `early_signals`: a list that a plain signal handler fills
        until this run installs its own (`noting_signals`); each signal in it counts as if it
        had come now."""
        loop = asyncio.get_running_loop()
        installed: list[int] = []
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, self._on_signal, sig)
                    installed.append(sig)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass
        for sig in list(early_signals or ()):  # after the install: a later one reaches `_on_signal` itself
            self._on_signal(sig)
        try:
            return await self._run()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    async def _run(self) -> RunResult:
        for st in self.stages:
            try:
                await st.start()
            except FatalError as e:
                self.fail(str(e), stage=st.name, exit_code=e.exit_code)
                await self._close_all()  # outputs already opened still get their end marker
                return RunResult(self._exit_code, self.errors, self.metrics_snapshot(), self.stopped_by, self._signal)
        stage_tasks = [asyncio.create_task(self._run_stage(i), name=st.name) for i, st in enumerate(self.stages)]
        self._stage_tasks = stage_tasks
        source_task = self._source_task = asyncio.create_task(self._run_source(), name=self.source.name)
        metrics_task = asyncio.create_task(self._metrics_loop()) if self.metrics_interval else None
        stopping = self.source.stopping
        try:
            # 1. the source runs until its input ends or a stop is requested ...
            await self._wait([source_task], until=stopping)
            if not source_task.done():
                # ... then gets a moment to notice and end with its final status; a hung capture
                # library is cancelled (it must not block shutdown)
                await self._wait([source_task], timeout=min(SOURCE_GRACE_S, self.stop_timeout))
                await self._cancel([source_task])
            await self._send_eos(force=True)  # if the source could not (cancelled in its `finally`)
            # 2. the stages drain: without a bound after a natural end (a recording is processed to
            # its end) until a stop is requested; then within `stop_timeout`; a second signal: now
            await self._wait(stage_tasks, until=stopping)
            if self._stopped_by != "eos" and self.edges:
                await self.edges[0].put(Stop(stream_id=self.stream_id, text=self._stopped_by))
            await self._wait(stage_tasks, timeout=self.stop_timeout)
            await self._cancel(stage_tasks)
        except asyncio.CancelledError:
            await self._cancel([source_task, *stage_tasks])
            raise
        finally:
            if metrics_task:
                await self._cancel([metrics_task])
            await self._close_all()
        snap = self.metrics_snapshot()
        if self.on_metrics and self.metrics_interval:
            self.on_metrics(snap)
        return RunResult(self._exit_code, self.errors, snap, self.stopped_by, self._signal)

    async def _close_all(self) -> None:
        """Close every stage once, in graph order, each within `DEFAULT_CLOSE_TIMEOUT` (after a
        second signal `HURRY_CLOSE_S`); a close that overruns is cancelled and reported."""
        for st in [self.source, *self.stages]:
            task = asyncio.ensure_future(st.close())
            if not self._hurry.is_set():
                await self._wait([task], timeout=DEFAULT_CLOSE_TIMEOUT)
            if not task.done():
                await self._wait([task], timeout=HURRY_CLOSE_S, hurry=False)
            if not task.done():
                await self._cancel([task])
                self._record_error(Error(text="close timed out", stage=st.name, stream_id=self.stream_id))
                continue
            if not task.cancelled() and task.exception() is not None:
                e = task.exception()  # closing must never hide the rest
                if isinstance(e, FatalError):  # e.g. the end marker could not be written: disk full
                    self.fail(str(e), stage=st.name, exit_code=e.exit_code)
                    continue
                self._record_error(Error(text=f"close failed: {type(e).__name__}: {e}", stage=st.name,
                                         stream_id=self.stream_id))


def run_graph(source: Source, stages: Iterable[Stage], **kw: Any) -> RunResult:
    """Synchronous entry point for the CLI."""
    with noting_signals() as early:
        return asyncio.run(Runtime(source, stages, **kw).run(early_signals=early))


@contextlib.contextmanager
def noting_signals() -> Iterator[list[int]]:
    """Within the block, SIGINT/SIGTERM are only noted in the list it gives, for
    `Runtime.run(early_signals=...)`, which counts them once its own handlers are in place. Why:
    a Ctrl-C while the graph is built or the loop starts was lost. Its KeyboardInterrupt landed
    inside `import mlx.core` (a stage's import), and MLX's module set-up swallowed it. Or
    `asyncio.run` took it to cancel its main task. Either way a live source then ran on forever
    (`test_ctrl_c_while_starting_...`). With a CPU hog on this 2-core VM, a Ctrl-C ~0.6 s after
    the start hung 1 of 4 to 1 of 38 tries (the faulthandler and asyncio task dumps showed a
    normal run with no stop requested). Outside the main thread (no signals there) it notes
    nothing."""
    early: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield early
        return
    previous = {sig: signal.signal(sig, lambda s, _frame: early.append(s)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield early
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
