"""The async runtime: edge policies, control overtaking data, errors as messages, stop."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from framecast.errors import FatalError
from framecast.events import EndOfStream, Error, Event, Flush, Frame, Question, Status
from framecast.runtime import Edge, Runtime, Source, Stage


def _frame(i: int) -> Frame:
    return Frame(pixels=np.zeros((4, 4, 3), np.uint8), seq=i, pts=i / 10)


class CountingSource(Source):
    def __init__(self, n: int, *, live: bool = False, delay: float = 0.0):
        super().__init__(name="src")
        self.n, self.live, self.delay = n, live, delay

    async def frames(self):
        for i in range(self.n):
            if self.stopping.is_set():
                return
            if self.delay:
                await asyncio.sleep(self.delay)
            yield _frame(i)


class Collect(Stage):
    name = "collect"

    def __init__(self, delay: float = 0.0):
        super().__init__()
        self.seen: list[Event] = []
        self.delay = delay
        self.closed = False

    async def process(self, item):
        if self.delay and isinstance(item, Frame):
            await asyncio.sleep(self.delay)
        self.seen.append(item)
        yield item

    async def on_control(self, msg):
        self.seen.append(msg)
        yield msg

    async def on_end(self):
        self.seen.append(EndOfStream())
        return
        yield

    async def close(self):
        self.closed = True


def test_recorded_source_loses_nothing_under_backpressure():
    sink = Collect(delay=0.001)
    res = asyncio.run(Runtime(CountingSource(50), [sink], edge_size=2).run(handle_signals=False))
    frames = [e.seq for e in sink.seen if isinstance(e, Frame)]
    assert frames == list(range(50))
    assert res.exit_code == 0 and res.metrics["collect"]["drops"] == 0 and sink.closed


def test_live_source_drops_oldest_frames_and_counts_them():
    sink = Collect(delay=0.005)
    res = asyncio.run(Runtime(CountingSource(200, live=True), [sink], edge_size=2).run(handle_signals=False))
    frames = [e.seq for e in sink.seen if isinstance(e, Frame)]
    drops = res.metrics["collect"]["drops"]
    assert drops > 0 and len(frames) + drops == 200
    assert frames == sorted(frames) and frames[-1] == 199  # latest frame wins


def test_control_overtakes_queued_data():
    async def main():
        edge = Edge("e", maxsize=10)
        for i in range(5):
            await edge.put(_frame(i))
        await edge.put(Question(text="what?"))
        await edge.put(Flush())
        got = [await edge.get() for _ in range(7)]
        return [type(e).__name__ for e in got]

    assert asyncio.run(main())[:2] == ["Question", "Flush"]


def test_stage_error_travels_as_message_and_run_continues():
    class Boom(Stage):
        name = "boom"

        async def process(self, item):
            if isinstance(item, Frame) and item.seq == 3:
                raise ValueError("bad frame")
            yield item

    sink = Collect()
    res = asyncio.run(Runtime(CountingSource(6), [Boom(), sink]).run(handle_signals=False))
    errs = [e for e in sink.seen if isinstance(e, Error)]
    assert len(errs) == 1 and "bad frame" in errs[0].text and errs[0].stage == "boom"
    assert [e.seq for e in sink.seen if isinstance(e, Frame)] == [0, 1, 2, 4, 5]
    assert res.exit_code == 0 and res.metrics["boom"]["errors"] == 1


def test_fatal_source_error_stops_with_nonzero_exit_and_closes_outputs():
    class Bad(Source):
        name = "bad"

        async def frames(self):
            yield _frame(0)
            raise FatalError("video.mp4: truncated")

    sink = Collect()
    res = asyncio.run(Runtime(Bad(), [sink]).run(handle_signals=False))
    assert res.exit_code == 1 and sink.closed
    assert any(isinstance(e, Frame) for e in sink.seen)  # what came before is kept
    assert "truncated" in res.errors[0].text


def test_request_stop_drains_and_closes_endless_source():
    sink = Collect()

    async def main():
        rt = Runtime(CountingSource(10**9, live=True, delay=0.001), [sink], stop_timeout=2)
        task = asyncio.create_task(rt.run(handle_signals=False))
        await asyncio.sleep(0.1)
        await rt.inject(Status(state="probe"))
        rt.request_stop("signal")
        return await asyncio.wait_for(task, 5)

    res = asyncio.run(main())
    assert res.stopped_by == "signal" and sink.closed
    assert any(isinstance(e, Status) for e in sink.seen)


def test_source_that_ignores_stop_is_cancelled_within_the_grace_period():
    class Deaf(Source):
        name = "deaf"
        live = True

        async def frames(self):
            i = 0
            while True:  # never looks at self.stopping
                await asyncio.sleep(0.01)
                yield _frame(i)
                i += 1

    sink = Collect()

    async def main():
        rt = Runtime(Deaf(), [sink], stop_timeout=0.5)
        task = asyncio.create_task(rt.run(handle_signals=False))
        await asyncio.sleep(0.1)
        rt.request_stop("stop")
        return await asyncio.wait_for(task, 5)

    import time

    t0 = time.monotonic()
    res = asyncio.run(main())
    assert res.stopped_by == "stop" and sink.closed and time.monotonic() - t0 < 3


def test_hung_stage_is_cancelled_after_stop_timeout_and_still_closed():
    class Hang(Stage):
        name = "hang"

        def __init__(self):
            super().__init__()
            self.closed = False

        async def process(self, item):
            if isinstance(item, Frame):
                await asyncio.sleep(3600)
            yield item

        async def close(self):
            self.closed = True

    hang = Hang()

    async def main():
        rt = Runtime(CountingSource(10**6, live=True, delay=0.001), [hang], stop_timeout=0.3)
        task = asyncio.create_task(rt.run(handle_signals=False))
        await asyncio.sleep(0.1)
        rt.request_stop("signal")
        return await asyncio.wait_for(task, 5)

    res = asyncio.run(main())
    assert res.stopped_by == "signal" and hang.closed


def test_second_signal_cancels_the_drain():
    import os
    import signal

    class Slow(Stage):
        name = "slow"

        def __init__(self):
            super().__init__()
            self.closed = False

        async def process(self, item):
            await asyncio.sleep(0.5)
            yield item

        async def close(self):
            self.closed = True

    slow = Slow()

    async def main():
        rt = Runtime(CountingSource(20), [slow], stop_timeout=30, edge_size=20)
        task = asyncio.create_task(rt.run())
        await asyncio.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)
        return await asyncio.wait_for(task, 5)

    res = asyncio.run(main())
    assert res.signal == signal.SIGINT and res.stopped_by == "signal" and slow.closed


def test_metrics_are_published_periodically_and_at_the_end():
    snaps: list[dict] = []
    sink = Collect()
    res = asyncio.run(Runtime(CountingSource(30, delay=0.01), [sink], metrics_interval=0.08,
                              on_metrics=snaps.append).run(handle_signals=False))
    assert len(snaps) >= 3 and snaps[-1] == res.metrics
    m = res.metrics["collect"]
    assert m["items_in"] >= 30 and {"latency_ms_p50", "latency_ms_p95", "queue_depth", "drops",
                                    "throughput_per_s"} <= m.keys()
    from framecast.events import Metrics

    assert any(isinstance(e, Metrics) for e in sink.seen)  # also travels as an event


def test_report_records_non_fatal_and_fatal_errors():
    async def main():
        rt = Runtime(CountingSource(1), [Collect()])
        rt.report(Error(text="warn"))
        assert rt._exit_code == 0
        rt.report(Error(text="bad", fatal=True))
        return rt

    rt = asyncio.run(main())
    assert [e.text for e in rt.errors] == ["warn", "bad"] and rt._exit_code == 1


def test_second_signal_while_the_source_waits_on_a_full_edge_never_hangs():
    """Issue 13 case 5: the source is blocked on a full edge (recorded input, slow consumer) when
    the second signal cancels the consumer. The end-of-stream marker must not wait for room that
    will never come; the run ends at once and every stage is closed."""
    import signal

    slow = Collect(delay=0.2)

    async def main(gap: float):
        rt = Runtime(CountingSource(10**6), [slow], stop_timeout=30, edge_size=2)
        task = asyncio.create_task(rt.run(handle_signals=False))
        await asyncio.sleep(0.1)
        rt._on_signal(signal.SIGINT)
        await asyncio.sleep(gap)
        t0 = time.monotonic()
        rt._on_signal(signal.SIGINT)
        res = await asyncio.wait_for(task, 5)
        return res, time.monotonic() - t0

    for gap in (0.0, 0.05, 0.3):
        slow.closed = False
        res, took = asyncio.run(main(gap))
        assert res.stopped_by == "signal" and slow.closed and took < 1.5, (gap, took)


def test_first_signal_after_the_input_ended_bounds_the_drain():
    """The input is exhausted and the stages still drain (no bound: a recording is processed to
    its end) — until a signal comes: then `stop_timeout` bounds it."""
    slow = Collect(delay=0.5)

    async def main():
        rt = Runtime(CountingSource(40), [slow], stop_timeout=0.3, edge_size=64)
        task = asyncio.create_task(rt.run(handle_signals=False))
        await asyncio.sleep(0.3)  # the source is done, 39 frames still queued
        rt.request_stop("signal")
        t0 = time.monotonic()
        res = await asyncio.wait_for(task, 5)
        return res, time.monotonic() - t0

    res, took = asyncio.run(main())
    assert res.stopped_by == "signal" and slow.closed and took < 1.5


def test_fatal_error_wins_over_an_earlier_signal_in_stopped_by():
    class Boom(Stage):
        name = "boom"

        async def process(self, item):
            if isinstance(item, Frame) and item.seq == 5:
                raise FatalError("broken")
            yield item

    async def main():
        rt = Runtime(CountingSource(10**6, delay=0.001), [Boom()])
        task = asyncio.create_task(rt.run(handle_signals=False))
        rt.request_stop("signal")
        return await asyncio.wait_for(task, 5)

    res = asyncio.run(main())
    assert res.stopped_by in ("signal", "fatal") and (res.stopped_by == "fatal") == (res.exit_code != 0)


def test_a_hung_close_is_cut_short_after_a_second_signal_and_the_rest_still_close():
    import signal

    class HangsOnClose(Collect):
        name = "hangs"

        async def close(self):
            await asyncio.sleep(3600)

    after = Collect()

    async def main():
        rt = Runtime(CountingSource(10**6, live=True, delay=0.001), [HangsOnClose(), after], stop_timeout=30)
        task = asyncio.create_task(rt.run(handle_signals=False))
        await asyncio.sleep(0.1)
        rt._on_signal(signal.SIGINT)
        await asyncio.sleep(0.3)  # closing by now, stuck in the hung close (bounded at 5 s)
        t0 = time.monotonic()
        rt._on_signal(signal.SIGINT)
        res = await asyncio.wait_for(task, 5)
        return res, time.monotonic() - t0

    res, took = asyncio.run(main())
    assert after.closed and took < 1.5 and res.stopped_by == "signal"
    assert any(e.text == "close timed out" and e.stage == "hangs" for e in res.errors)


def test_stages_get_a_narrow_handle_inject_fail_stopping():
    """A stage reaches the graph only through `handle`: inject (control overtakes), stopping,
    stream id, dropped frames, fail (fatal: exit code, run stops)."""

    class Asker(Stage):
        name = "asker"

        def __init__(self):
            super().__init__()
            self.views = []

        async def process(self, item):
            h = self.handle
            if isinstance(item, Frame) and item.seq == 1:
                self.views.append((h.stream_id, h.stopping.is_set(), h.stopped_by, h.frames_dropped()))
                await h.inject(Question(text="what?"))
            if isinstance(item, Frame) and item.seq == 3:
                h.fail("asker gave up", exit_code=3)
                self.views.append((h.stopping.is_set(), h.stopped_by))
            yield item

    asker, sink = Asker(), Collect()
    assert asker.handle is None  # outside a graph: no handle
    res = asyncio.run(Runtime(CountingSource(50, delay=0.01), [asker, sink], stream_id="cam1").run(
        handle_signals=False))
    assert asker.views[0] == ("cam1", False, "eos", 0)
    assert asker.views[1] == (True, "fatal")
    assert any(isinstance(e, Question) and e.text == "what?" for e in sink.seen)
    assert res.exit_code == 3 and res.stopped_by == "fatal"
    assert [e.stage for e in res.errors] == ["asker"] and res.errors[0].text == "asker gave up"


def test_a_stage_whose_on_end_raises_still_passes_the_end_on_and_the_run_ends():
    """An error in `on_end` (plain or fatal) travels as a message and the end marker still
    reaches every later stage: the run ends instead of waiting for it forever."""
    class BadEnd(Stage):
        name = "badend"

        def __init__(self, exc: Exception):
            super().__init__()
            self.exc = exc

        async def process(self, item):
            yield item

        async def on_end(self):
            yield Status(state="closing", text="partial result before the failure")
            raise self.exc

    for exc, code in [(ValueError("summary failed"), 0), (FatalError("cannot write"), 1)]:
        sink = Collect()
        res = asyncio.run(asyncio.wait_for(Runtime(CountingSource(3), [BadEnd(exc), sink]).run(handle_signals=False),
                                           timeout=10))
        assert isinstance(sink.seen[-1], EndOfStream) and sink.closed
        assert any(isinstance(e, Status) and e.state == "closing" for e in sink.seen)
        assert any(isinstance(e, Error) and str(exc) in e.text for e in sink.seen)
        assert [e.seq for e in sink.seen if isinstance(e, Frame)] == [0, 1, 2] and res.exit_code == code


def test_a_signal_noted_before_the_run_stops_it_once_the_run_starts():
    """`noting_signals`: a SIGINT while the graph is built (or the loop starts) is only noted, not
    raised into whatever runs then (it was lost inside `import mlx.core` once), and the run it
    is handed to stops with it as its first signal; afterwards the old handlers are back."""
    import os
    import signal

    from framecast.runtime import noting_signals

    before = signal.getsignal(signal.SIGINT)
    sink = Collect()
    with noting_signals() as early:
        os.kill(os.getpid(), signal.SIGINT)  # handled in this (main) thread at its next check
        for _ in range(200):
            if early:
                break
            time.sleep(0.005)
        assert early == [signal.SIGINT]
        res = asyncio.run(asyncio.wait_for(
            Runtime(CountingSource(10**9, live=True, delay=0.001), [sink], stop_timeout=2).run(early_signals=early), 10))
    assert res.stopped_by == "signal" and res.signal == signal.SIGINT and sink.closed
    assert signal.getsignal(signal.SIGINT) is before
