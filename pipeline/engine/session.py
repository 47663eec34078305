"""StreamingSession: the async API of one stream's session, run on the model's worker thread.

Every call goes to the model's single worker thread (`framecast.engine.worker`), so MLX compute
never blocks the event loop and calls from several coroutines are serialised in order. The
synchronous session underneath (`SessionCore`: prompt layout, cache budget and eviction,
decoding through the one token loop, save / restore) is in `framecast.engine.core`.
"""

from __future__ import annotations

import asyncio
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
    core: SessionCore = field(init=False)

    def __post_init__(self) -> None:
        self.core = SessionCore(
            self.model, system_prompt=self.system_prompt, max_cache_tokens=self.max_cache_tokens,
            max_cache_mb=self.max_cache_mb, sink_tokens=self.sink_tokens, kv_bits=self.kv_bits,
            keep_generated=self.keep_generated, max_slice_nums=self.max_slice_nums)
        if self.worker is None:
            self.worker = worker_for(self.model)

    @classmethod
    def from_config(cls, model: Any, session_cfg: Any, **kw: Any) -> StreamingSession:
        return cls(model, system_prompt=session_cfg.system_prompt,
                   max_cache_tokens=session_cfg.max_cache_tokens, max_cache_mb=session_cfg.max_cache_mb,
                   sink_tokens=session_cfg.sink_tokens, kv_bits=session_cfg.kv_bits,
                   keep_generated=session_cfg.keep_generated, **kw)

    @property
    def cache_tokens(self) -> int:
        return self.core.offset

    async def start(self) -> None:
        await self.worker.run(self.core.start)

    async def add_frame(self, frame: Any, pts: float | None = None) -> int:
        """Append a frame: RGB uint8 pixels [H, W, 3] (encoded here), precomputed features
        (an `ImageFeatures` from the encoder) or a `Frame` event (its features when the encoder
        stage set them, else its pixels). Returns the tokens added."""
        if hasattr(frame, "pixels"):  # a pipeline Frame event
            pts = frame.pts if pts is None else pts
            frame = frame.features if frame.features is not None else frame.pixels
        if isinstance(frame, np.ndarray):
            return await self.worker.run(self.core.add_image, frame, pts)
        return await self.worker.run(self.core.add_features, frame, pts)

    async def add_text(self, text: str, pts: float | None = None) -> int:
        return await self.worker.run(self.core.add_text, text, pts)

    async def narrate(self, prompt: str, **kw: Any) -> AsyncIterator[TextDelta | TurnDone]:
        """Yield `TextDelta`s as tokens come, then one `TurnDone`. Leaving early (break,
        cancellation) interrupts the turn; the worker closes it before any later call runs."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def on_delta(delta: TextDelta) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, delta)
            except RuntimeError:  # the loop is closed: nobody listens, end the turn cleanly
                stop.set()

        fut = self.worker.submit(self.core.generate, prompt, on_delta=on_delta, stop=stop, **kw)
        fut.add_done_callback(lambda _f: queue.put_nowait(_DONE))
        try:
            while (item := await queue.get()) is not _DONE:
                yield item
            yield fut.result()
        finally:
            if not fut.done():
                stop.set()

    async def ask(self, question: str, **kw: Any) -> AsyncIterator[TextDelta | TurnDone]:
        """Answer from the cached context (no frame is re-encoded): same events as narrate."""
        async for item in self.narrate(question, **kw):
            yield item

    async def reset(self) -> None:
        await self.worker.run(self.core.reset)

    async def save(self, path: str | Path) -> Path:
        return await self.worker.run(self.core.save, path)

    async def load(self, path: str | Path) -> None:
        await self.worker.run(self.core.load, path)
