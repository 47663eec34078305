"""StreamingSession: the async API of one stream's session, run on the model's worker thread.

Every call goes to the model's single worker thread (`framecast.engine.worker`), so MLX compute
never blocks the event loop and calls from several coroutines are serialised in order. The
synchronous session underneath (`SessionCore`: prompt layout, cache budget and eviction,
decoding through the one token loop, save / restore) is in `framecast.engine.core`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np

from framecast.engine.core import SessionCore, Span, TextDelta, TurnDone
from framecast.engine.worker import ModelWorker, worker_for

__all__ = ["SessionCore", "Span", "StreamingSession", "TextDelta", "TurnDone"]


# ---------------------------------------------------------------- the async facade


_DONE = object()


def _settle(fut: concurrent.futures.Future, value: Any = None, *, error: BaseException | None = None) -> None:
    if fut.done():  # cancelled by a reader that left
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)


@dataclass
class StreamingSession:
    """Async API over a `SessionCore`; every call runs on the model's worker thread."""

    model: Any
    system_prompt: str | None = None
    max_cache_tokens: int | None = None
    max_cache_mb: float | None = None
    sink_tokens: int | None = None
    kv_bits: int | None = None
    keep_generated: bool = True
    max_slice_nums: int = 1
    worker: ModelWorker | None = None
    prefill: Any = None  # a shared `engine.scheduler.BatchPrefill`: frames batched with other sessions'
    decode: Any = None  # a shared `engine.scheduler.BatchDecode`: decode steps batched likewise
    kv_pool: Any = None  # a shared `model.kv_pool.KVPoolSet`: the cache is a row of the run's buffers
    core: SessionCore = field(init=False)
    _open_turn: Any = field(default=None, init=False, repr=False)  # closes a turn still running
    _last_turn: Any = field(default=None, init=False, repr=False)  # its result (a Future)

    def __post_init__(self) -> None:
        self.core = SessionCore(
            self.model, system_prompt=self.system_prompt, max_cache_tokens=self.max_cache_tokens,
            max_cache_mb=self.max_cache_mb, sink_tokens=self.sink_tokens, kv_bits=self.kv_bits,
            keep_generated=self.keep_generated, max_slice_nums=self.max_slice_nums, kv_pool=self.kv_pool)
        self.core.decode_batch = self.decode
        if self.worker is None:
            self.worker = worker_for(self.model)

    @classmethod
    def from_config(cls, model: Any, session_cfg: Any, **kw: Any) -> StreamingSession:
        return cls(model, system_prompt=session_cfg.system_prompt,
                   max_cache_tokens=session_cfg.max_cache_tokens, max_cache_mb=session_cfg.max_cache_mb,
                   sink_tokens=session_cfg.sink_tokens, kv_bits=session_cfg.kv_bits,
                   keep_generated=session_cfg.keep_generated, **kw)

    def _run(self, fn: Any, *args: Any, **kw: Any) -> Any:
        """Submit to the worker, after closing a turn whose reader left (see `narrate`)."""
        if self._open_turn is not None:
            self._open_turn()
        return self.worker.run(fn, *args, **kw)

    @property
    def cache_tokens(self) -> int:
        return self.core.offset

    async def start(self) -> None:
        await self._run(self.core.start)

    async def add_frame(self, frame: Any, pts: float | None = None) -> int:
        """Append a frame: RGB uint8 pixels [H, W, 3] (encoded here), precomputed features
        (an `ImageFeatures` from the encoder) or a `Frame` event (its features when the encoder
        stage set them, else its pixels). Returns the tokens added."""
        if hasattr(frame, "pixels"):  # a pipeline Frame event
            pts = frame.pts if pts is None else pts
            frame = frame.features if frame.features is not None else frame.pixels
        if isinstance(frame, np.ndarray):
            return await self._run(self.core.add_image, frame, pts)
        if self.prefill is not None:
            if self._open_turn is not None:
                self._open_turn()
            return await self.prefill(self.core, frame, pts)
        return await self._run(self.core.add_features, frame, pts)

    async def add_text(self, text: str, pts: float | None = None) -> int:
        return await self._run(self.core.add_text, text, pts)

    async def narrate(self, prompt: str, *, urgent: bool = False, **kw: Any) -> AsyncIterator[TextDelta | TurnDone]:
        """Yield `TextDelta`s as tokens come, then one `TurnDone`. Leaving early (break,
        cancellation) interrupts the turn; the worker closes it before any later call runs.

        The turn is one worker job while nothing else waits. When other work is queued
        (another stream's frame, turn or question), the job goes to the back of the worker's
        queue after each token, so the sessions sharing a model take turns step by step, in
        arrival order, without a hop through the event loop.
        `urgent` (questions): the turn's steps go ahead of other queued work (other streams'
        narrations and frames), so an answer takes its own steps, not a share of every stream's.
        One reader at a time: a later call on this session interrupts a turn still open."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        lock = threading.Lock()  # a requeue and `close_turn` never cross
        worker = self.worker
        result: concurrent.futures.Future = concurrent.futures.Future()
        steps = None
        # An interrupted turn of this session still finishing keeps its place: no overtaking it.
        urgent = urgent and (self._last_turn is None or self._last_turn.done())
        submit = worker.submit_urgent if urgent else worker.submit_sync
        self._last_turn = result

        def on_delta(delta: TextDelta) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, delta)
            except RuntimeError:  # the loop is closed: nobody listens, end the turn cleanly
                stop.set()

        def step() -> None:
            """On the worker: decode until the turn ends, or requeue while other work waits."""
            nonlocal steps
            try:
                if steps is None:
                    steps = self.core.turn(prompt, stop=stop, **kw)
                while True:
                    try:
                        delta = next(steps)
                    except StopIteration as done:
                        _settle(result, done.value)
                        return
                    if delta is not None:
                        on_delta(delta)
                    if worker.queued:
                        with lock:  # once stopped, finish here: a later call's job may be queued
                            if not stop.is_set():
                                submit(step)
                                return
            except BaseException as e:  # delivered to the reader
                _settle(result, error=e)

        def close_turn() -> None:
            # The reader left (break, cancellation) or a later call came: the turn ends after
            # its next token, on the worker, before any job queued after this (`async for ...
            # break` closes this generator only later, hence the later call's check).
            if self._open_turn is close_turn:
                self._open_turn = None
            with lock:
                stop.set()

        if self._open_turn is not None:
            self._open_turn()
        submit(step)
        done = asyncio.wrap_future(result)
        done.add_done_callback(lambda _f: queue.put_nowait(_DONE))
        self._open_turn = close_turn
        try:
            while (item := await queue.get()) is not _DONE:
                yield item
            yield done.result()
        finally:
            close_turn()

    async def ask(self, question: str, **kw: Any) -> AsyncIterator[TextDelta | TurnDone]:
        """Answer from the cached context (no frame is re-encoded): same events as narrate.
        The answer's steps go ahead of other streams' queued work (`urgent`)."""
        async for item in self.narrate(question, urgent=True, **kw):
            yield item

    async def reset(self) -> None:
        await self._run(self.core.reset)

    async def save(self, path: str | Path) -> Path:
        return await self._run(self.core.save, path)

    async def load(self, path: str | Path) -> None:
        await self._run(self.core.load, path)
