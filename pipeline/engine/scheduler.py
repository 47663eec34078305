"""Sharing one model between several streams: vision encoding batched across streams.

Every stream has its own `EncodeStage` and `StreamingSession`, but all of them submit their MLX
work to the model's one worker thread (`framecast.engine.worker`). `BatchEncoder` is what the
encode stages of a multi-stream run call instead of `model.encode_images`: requests that arrive
while the worker is busy wait together, and when the worker gets to them they run as ONE
vision-tower call (`encode_images` on the concatenated frames), each stream getting its own
features back in order. A lone stream (or an idle worker) pays nothing extra: its request is one
worker job, as before.

MiniCPM-V 4.5 frame groups (3D resampler) batch the same way (`BatchEncoder.group`, one
`encode_frame_groups` call for the groups of all streams).

Frame prefills batch the same way (`BatchPrefill`): the frames that streams append in one tick
go onto their sessions' caches in one forward (`SessionCore.add_features_rows`: the projections
and MLP see all rows together, positions and attention stay per session), so a 16-camera tick
reads the LM's weights once instead of 16 times.

Decode steps batch too (`BatchDecode`): turns run one token per worker job while other work
waits (`StreamingSession.narrate`), so the sessions' steps, frame prefills and questions
interleave fairly on the one thread, in arrival order; each turn submits its next step before
handing out its token, and the first turn that needs logits runs every submitted step as one
batched forward. Each session's math is that of a
separate run; a batched matmul may round a row differently from a one-row one (~5e-7 in fp32
on OpenBLAS), and the tests' greedy narrations are those of separate runs.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any

from framecast.engine.worker import ModelWorker, worker_for

DEFAULT_MAX_BATCH = 64  # frames per vision-tower call across all streams
DEFAULT_MAX_PREFILL_ROWS = 64  # sessions per batched frame prefill


@dataclass
class _Request:
    pixels: list[Any]  # RGB uint8 [H, W, 3] each
    max_slice_nums: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    temporal_ids: list[int] | None = None  # a MiniCPM-V 4.5 frame group (3D resampler)

    @property
    def kind(self) -> tuple[bool, int]:  # requests of one kind share a call
        return self.temporal_ids is not None, self.max_slice_nums


class _WorkerBatch:
    """Requests from several streams' coroutines, run together as one job on the model's worker.

    What arrives in one event-loop iteration (e.g. the streams of one `gather`) is one job; a
    subclass picks what one call takes (`_select`) and runs it (`_run`, on the worker). What
    does not fit waits for the next job, queued after whatever is queued meanwhile."""

    def __init__(self, model: Any, worker: ModelWorker | None):
        self.model = model
        self.worker = worker or worker_for(model)
        self._pending: list[Any] = []
        self._lock = threading.Lock()
        self._jobs_queued = 0  # worker jobs submitted that have not yet taken their requests

    async def _submit(self, req: Any) -> Any:
        with self._lock:
            self._pending.append(req)
            submit = self._jobs_queued == 0
            if submit:
                self._jobs_queued += 1
        if submit:
            # After the tasks that are ready now (e.g. the other streams of one `gather`) have
            # queued theirs too: what arrives in one loop iteration is one call.
            req.loop.call_soon(self.worker.submit_sync, self._run_pending)
        return await req.future

    def _select(self, pending: list[Any]) -> list[Any]:
        raise NotImplementedError

    def _run(self, taken: list[Any]) -> None:
        raise NotImplementedError

    def _run_pending(self) -> None:
        with self._lock:
            self._jobs_queued -= 1
            taken = self._select(self._pending) if self._pending else []
            for req in taken:
                self._pending.remove(req)
            if self._pending:  # the rest go in the next call, after what is queued meanwhile
                self._jobs_queued += 1
                self.worker.submit_sync(self._run_pending)
        if taken:
            self._run(taken)


class BatchEncoder(_WorkerBatch):
    """`await encoder(pixels, max_slice_nums=1)` -> one `ImageFeatures` per frame, like
    `model.encode_images`, but batched with the other streams' waiting requests.

    `max_batch`: frames per vision-tower call at most (a request is never split: one that is
    larger than this runs alone). Counters: `calls` (vision-tower calls), `frames`, `max_rows`.
    """

    def __init__(self, model: Any, *, worker: ModelWorker | None = None, max_batch: int = DEFAULT_MAX_BATCH):
        super().__init__(model, worker)
        self.max_batch = max(1, max_batch)
        self.calls = 0
        self.frames = 0
        self.max_rows = 0

    async def __call__(self, pixels: list[Any], *, max_slice_nums: int = 1) -> list[Any]:
        loop = asyncio.get_running_loop()
        return await self._submit(_Request(list(pixels), max_slice_nums, loop.create_future(), loop))

    async def group(self, pixels: list[Any], temporal_ids: list[int], *, max_slice_nums: int = 1) -> Any:
        """One MiniCPM-V 4.5 frame group -> its `ImageFeatures`, like `model.encode_frame_group`,
        batched with the other streams' waiting groups (`model.encode_frame_groups`)."""
        loop = asyncio.get_running_loop()
        req = _Request(list(pixels), max_slice_nums, loop.create_future(), loop, list(temporal_ids))
        return (await self._submit(req))[0]

    def _select(self, pending: list[_Request]) -> list[_Request]:
        """The waiting requests that fit one call (same kind, <= max_batch frames)."""
        first = pending[0]
        taken, rows = [], 0
        for req in pending:
            if req.kind != first.kind:
                continue
            if taken and rows + len(req.pixels) > self.max_batch:
                break
            taken.append(req)
            rows += len(req.pixels)
        return taken

    def _run(self, taken: list[_Request]) -> None:
        """On the worker: one `encode_images` (or `encode_frame_groups`) call for the waiting requests."""
        frames = [p for req in taken for p in req.pixels]
        slices = taken[0].max_slice_nums
        try:
            if taken[0].temporal_ids is None:
                feats = self.model.encode_images(frames, max_slice_nums=slices)
            else:  # one feature set per group: each request gets a list of one
                groups = [(req.pixels, req.temporal_ids) for req in taken]
                encode = getattr(self.model, "encode_frame_groups", None)
                flat = (encode(groups, max_slice_nums=slices) if encode is not None else
                        [self.model.encode_frame_group(*g, max_slice_nums=slices) for g in groups])
                feats = list(flat)
        except BaseException as e:  # noqa: BLE001  (every stream in the batch hears about it)
            for req in taken:
                _deliver(req, _set_exception, e)
            return
        self.calls += 1
        self.frames += len(frames)
        self.max_rows = max(self.max_rows, len(frames))
        at = 0
        for req in taken:
            n = len(req.pixels) if req.temporal_ids is None else 1
            part, at = feats[at:at + n], at + n
            _deliver(req, _set_result, part)


@dataclass
class _Append:
    core: Any  # a SessionCore
    features: Any
    pts: float | None
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class BatchPrefill(_WorkerBatch):
    """`await prefill(core, features, pts)` -> tokens added, like `core.add_features` on the
    worker, but one batched prefill with the other sessions' frames waiting at the same time.

    A session appears once per call (its next frame waits for the next call, so its own frames
    stay in order); `max_rows` sessions per call at most. A frame that its own session refuses
    (budget) fails alone. Counters: `calls`, `frames`, `max_rows_seen`.
    """

    def __init__(self, model: Any, *, worker: ModelWorker | None = None, max_rows: int = DEFAULT_MAX_PREFILL_ROWS):
        super().__init__(model, worker)
        self.max_rows = max(1, max_rows)
        self.calls = 0
        self.frames = 0
        self.max_rows_seen = 0

    async def __call__(self, core: Any, features: Any, pts: float | None = None) -> int:
        loop = asyncio.get_running_loop()
        return await self._submit(_Append(core, features, pts, loop.create_future(), loop))

    def _select(self, pending: list[_Append]) -> list[_Append]:
        """Each session's oldest waiting frame, up to max_rows sessions."""
        taken: list[_Append] = []
        seen: set[int] = set()
        for req in pending:
            if len(taken) == self.max_rows:
                break
            if id(req.core) not in seen:
                seen.add(id(req.core))
                taken.append(req)
        return taken

    def _run(self, taken: list[_Append]) -> None:
        """On the worker: one `SessionCore.add_features_rows` for the waiting frames."""
        from framecast.engine.core import SessionCore

        try:
            outcomes = SessionCore.add_features_rows([r.core for r in taken], [r.features for r in taken],
                                                     [r.pts for r in taken])
        except BaseException as e:  # noqa: BLE001
            outcomes = [e] * len(taken)
        self.calls += 1
        self.frames += len(taken)
        self.max_rows_seen = max(self.max_rows_seen, len(taken))
        for req, got in zip(taken, outcomes):
            if isinstance(got, BaseException):
                _deliver(req, _set_exception, got)
            else:
                _deliver(req, _set_result, got)


class _DecodeStep:
    """One session's next decode step inside a `BatchDecode` (see there)."""

    def __init__(self, owner: BatchDecode, token: Any, cache: list):
        self.owner, self.token, self.cache = owner, token, cache
        self._logits: Any = None
        self._error: BaseException | None = None

    def logits(self) -> Any:
        """[1, V] logits of the fed token (lazy); runs the pending batch first if need be.
        Raises what the batch's forward raised (every step of that batch does)."""
        if self._logits is None and self._error is None:
            self.owner.run()
        if self._error is not None:
            raise self._error
        return self._logits


class BatchDecode:
    """Decode steps of several sessions' turns as one batched forward.

    Each turn submits the step that feeds its latest token (`submit(token [1, 1], cache)`)
    before handing the token out (`engine.generate.generate_step(batch=...)`); the first turn
    that needs its logits runs every step submitted so far as rows of ONE forward
    (`model.lm.base.RowCaches`: projections and MLP batched; positions and attention per
    session's cache, or once for all rows when the caches are rows of one `model.kv_pool`). With 16 streams narrating at once the LM's weights are read once per
    token step instead of 16 times. One worker thread only (the model's). Counters: `calls`,
    `rows`, `max_rows_seen`.
    """

    def __init__(self, model: Any):
        from framecast.engine.generate import language_model

        self.lm = language_model(model)
        self._pending: list[_DecodeStep] = []
        self.calls = 0
        self.rows = 0
        self.max_rows_seen = 0

    def submit(self, token: Any, cache: list) -> _DecodeStep:
        if any(s.cache is cache for s in self._pending):
            raise RuntimeError("BatchDecode: a session submitted a second step before its first ran")
        step = _DecodeStep(self, token, cache)
        self._pending.append(step)
        return step

    def run(self) -> None:
        """Run the pending steps as one forward; each gets its row of the logits (lazy)."""
        import mlx.core as mx

        from framecast.model.lm.base import RowCaches

        steps, self._pending = self._pending, []
        if not steps:
            return
        try:
            if len(steps) == 1:
                out = self.lm(steps[0].token, cache=steps[0].cache)  # [1, 1, V]
            else:
                tokens = mx.concatenate([s.token for s in steps])  # [B, 1]
                layers = [RowCaches([s.cache[i] for s in steps]) for i in range(len(steps[0].cache))]
                out = self.lm(tokens, cache=layers)  # [B, 1, V]
        except BaseException as e:  # noqa: BLE001  (each turn rolls its own cache back)
            for s in steps:
                s._error = e
            raise
        for b, s in enumerate(steps):
            s._logits = out[b:b + 1, -1, :]  # [1, V]
        self.calls += 1
        self.rows += len(steps)
        self.max_rows_seen = max(self.max_rows_seen, len(steps))


def _deliver(req: Any, fn: Any, value: Any) -> None:
    try:
        req.loop.call_soon_threadsafe(fn, req.future, value)
    except RuntimeError:  # that stream's loop is closed: nobody waits for it any more
        pass


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
