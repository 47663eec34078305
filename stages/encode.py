"""Incremental encoding: vision features for each frame as it arrives, off the event loop.

Frames queue inside the stage while the model's worker thread encodes; whatever waits when
the worker frees up is encoded as one micro-batch (one vision-tower call). A frame the change
detector marked unchanged (`Frame.changed is False`) reuses the previous frame's features and
is never encoded. MiniCPM-V 4.5 packs consecutive frames into groups for its 3D resampler
(temporal ids = media time in 0.1 s units); the group's features ride on the group's last
frame and the earlier frames pass on without features (the session adds one span per group).

Items keep their order (frames and data events travel through one queue); control messages
(questions) pass straight through and overtake frames still being encoded.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Awaitable, Callable

from framecast.events import EndOfStream, Error, Event, Frame
from framecast.model.protocol import VisionLanguageModel
from framecast.runtime import Stage
from framecast.engine.worker import ModelWorker, worker_for

DEFAULT_MAX_BATCH = 4  # frames per vision-tower call
DEFAULT_MAX_PENDING = 16  # frames waiting inside the stage before `process` pushes back
TEMPORAL_UNIT_S = 0.1


def default_pack(model: VisionLanguageModel) -> int:
    """Frames per encoder group: the model's default (3 with 4.5's 3D resampler, else 1)."""
    return model.default_group_frames


class EncodeStage(Stage):
    name = "encode"

    def __init__(
        self,
        model: VisionLanguageModel,
        *,
        worker: ModelWorker | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_pending: int = DEFAULT_MAX_PENDING,
        pack_frames: int | None = None,
        max_slice_nums: int = 1,
        encoder: Callable[..., Awaitable[list]] | None = None,
        name: str | None = None,
    ):
        super().__init__(name=name)
        self.model = model
        self.worker = worker or worker_for(model)
        self.max_batch = max(1, max_batch)
        self.pack = pack_frames or default_pack(model)
        self.max_slice_nums = max_slice_nums  # 1 = one view per frame (streaming)
        # `await encoder(pixels, max_slice_nums=)` -> features (`encoder.group` for 4.5's frame
        # groups); several streams share one `engine.scheduler.BatchEncoder`, which batches
        # their frames into one call
        self.encoder = encoder
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=max(max_pending, self.pack))
        self._task: asyncio.Task | None = None
        self._last_features: Any = None
        self._group: list[Frame] = []
        self.encode_calls = 0
        self.frames_encoded = 0
        self.frames_reused = 0

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._drain(), name=f"{self.name}.drain")

    async def process(self, item: Event) -> AsyncIterator[Event]:
        await self.start()
        await self._queue.put(item)  # waits when full: backpressure onto the input edge
        return
        yield  # pragma: no cover

    async def on_end(self) -> AsyncIterator[Event]:
        await self.start()
        await self._queue.put(EndOfStream())  # marker: flush a partial 3D group
        await self._queue.join()
        return
        yield  # pragma: no cover

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    # -- the drain loop ----------------------------------------------------------------------

    async def _drain(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and sum(isinstance(i, Frame) for i in batch) < self.max_batch * self.pack:
                batch.append(self._queue.get_nowait())
            try:
                for out in await self._encode_batch(batch):
                    await self.emit(out)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # one bad batch must not stop the stream
                self.metrics.errors += 1
                await self.emit(Error(text=f"encode failed: {type(e).__name__}: {e}", stage=self.name,
                                      stream_id=batch[0].stream_id, pts=batch[0].pts))
            finally:
                for _ in batch:
                    self._queue.task_done()
                self._publish_counters()

    async def _encode_batch(self, batch: list[Event]) -> list[Event]:
        if self.pack > 1:
            return await self._encode_groups(batch)
        # Unchanged frames point at the latest frame that is (or will be) encoded before them.
        todo: list[Frame] = []
        source: dict[int, Frame | None] = {}
        latest: Frame | None = None
        for item in batch:
            if not isinstance(item, Frame):
                continue
            reuse = item.changed is False and (latest is not None or self._last_features is not None)
            if reuse:
                source[id(item)] = latest
            else:
                todo.append(item)
                latest = item
        if todo:
            pixels = [f.pixels for f in todo]
            if self.encoder is not None:
                feats = await self.encoder(pixels, max_slice_nums=self.max_slice_nums)
            else:
                feats = await self.worker.run(self.model.encode_images, pixels, max_slice_nums=self.max_slice_nums)
            self.encode_calls += 1
            self.frames_encoded += len(todo)
            for frame, feat in zip(todo, feats):
                frame.features = feat
        out: list[Event] = []
        for item in batch:
            if isinstance(item, EndOfStream):
                continue
            if isinstance(item, Frame):
                if id(item) in source:
                    src = source[id(item)]
                    item.features = src.features if src is not None else self._last_features
                    self.frames_reused += 1
                self._last_features = item.features
            out.append(item)
        return out

    async def _encode_groups(self, batch: list[Event]) -> list[Event]:
        """4.5: gather `pack` frames, then one 3D-resampler call per group."""
        out: list[Event] = []
        for item in batch:
            if isinstance(item, Frame):
                self._group.append(item)
                if len(self._group) < self.pack:
                    continue
            elif isinstance(item, EndOfStream):  # flush a partial group at the end
                if not self._group:
                    continue
            else:
                out.append(item)
                continue
            group, self._group = self._group, []
            unchanged = all(f.changed is False for f in group) and self._last_features is not None
            if unchanged:
                feats = self._last_features
                self.frames_reused += len(group)
            else:
                ids = [round((f.pts or 0.0) / TEMPORAL_UNIT_S) for f in group]
                pixels = [f.pixels for f in group]
                if self.encoder is not None:
                    feats = await self.encoder.group(pixels, ids, max_slice_nums=self.max_slice_nums)
                else:
                    feats = await self.worker.run(self.model.encode_frame_group, pixels, ids,
                                                  max_slice_nums=self.max_slice_nums)
                self.encode_calls += 1
                self.frames_encoded += len(group)
            group[-1].features = self._last_features = feats
            out.extend(group)
        return out

    def _publish_counters(self) -> None:
        self.metrics.extra.update({"encode_calls": self.encode_calls, "frames_encoded": self.frames_encoded,
                                   "frames_reused": self.frames_reused})
