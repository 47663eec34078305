"""StreamingSession: one conversation on one persistent KV cache, fed frame by frame.

Each new frame costs only its own tokens: the session prefills a frame's placeholder span (its
vision features scattered in) with positions continuing from the cache, and a narration or an
answer only prefills the prompt before decoding. The prompt layout is the team contract's
streaming ChatML (the demo model is trained on exactly this):

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n     prefix, prefilled once
    {image placeholder}\\n                                            one per frame
    {prompt}<|im_end|>\\n<|im_start|>assistant\\n[think block]        a turn: generate ...
    ...<|im_end|>\\n<|im_start|>user\\n                               ... then close and reopen

A turn always ends with `<|im_end|>` in the cache, whether the model produced it, ran out of
tokens or was interrupted (a sampled stop token is dropped from the cache, then appended once).
`keep_generated=False` trims the whole turn away instead, leaving the user turn open.

Bounded memory: the cache is a list of spans (prefix, frame, text, turn). When the next
operation would exceed the budget, the oldest whole spans after the sinks (the prefix plus
`sink_tokens`) are evicted down to a low-water mark, and the keys after the gap are re-rotated
so positions stay contiguous (see `framecast.model.cache.KVCache.evict` and the comment in
`SessionCore._evict`).

Threading: `SessionCore` is synchronous and must only be used from one thread. The async
`StreamingSession` runs every call on the model's single worker thread (`framecast.engine.worker`), so MLX
compute never blocks the event loop and calls from several coroutines are serialised in order.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import mlx.core as mx
import numpy as np

from framecast.errors import UserError
from framecast.kernels.rope_shift import RopeSpec, probe_rope
from framecast.model.cache import QuantizedKVCache, evict_prompt_cache
from framecast.engine.worker import ModelWorker, worker_for

__all__ = ["ModelWorker", "SessionCore", "Span", "StreamingSession", "TextDelta", "TurnDone", "worker_for"]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant watching a live video. Answer briefly."
DEFAULT_MAX_TOKENS = 64
EVICT_LOW_WATER = 0.75  # after an eviction the cache holds at most this share of the budget
UNBOUNDED_GROWTH = 1.25  # no budget: each cache growth adds at least a quarter (few copies)
CLOSE_TEXT = "<|im_end|>\n<|im_start|>user\n"
TURN_END = "<|im_end|>\n"
SAVE_FORMAT = "framecast-session-1"


# ---------------------------------------------------------------- what a session yields


@dataclass
class TextDelta:
    """New text of the turn being generated (never half a UTF-8 character)."""

    text: str
    index: int  # tokens generated so far, this one included


@dataclass
class TurnDone:
    """A finished turn (narration or answer) with its timings."""

    text: str
    tokens: int
    prompt_tokens: int
    stopped: str  # eos | max_tokens | interrupted
    prefill_s: float  # prompt prefill (cache already holds the frames)
    first_token_s: float  # turn start -> first token
    tokens_per_s: float  # decode speed after the first token
    cache_tokens: int
    cache_bytes: int
    evicted_tokens: int = 0
    logits: list[np.ndarray] | None = None  # per generated token, only when asked (tests)


@dataclass
class Span:
    """A run of cached tokens that is kept or evicted whole."""

    kind: str  # prefix | frame | text | turn
    length: int
    pts: float | None = None


def greedy(logits: mx.array, history: Any = None) -> mx.array:
    return mx.argmax(logits, axis=-1)


# ---------------------------------------------------------------- the synchronous core


class SessionCore:
    """Cache, spans and prompt bookkeeping for one stream. One thread only."""

    def __init__(
        self,
        model: Any,
        *,
        system_prompt: str | None = None,
        max_cache_tokens: int | None = None,
        max_cache_mb: float | None = None,
        sink_tokens: int | None = None,
        kv_bits: int | None = None,
        keep_generated: bool = True,
        max_slice_nums: int = 1,
    ):
        self.model = model
        self.max_slice_nums = max_slice_nums  # views per frame when the session encodes pixels
        self.lm = model.language_model
        self.tokenizer = model.tokenizer
        self.system_prompt = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
        self.max_cache_tokens = max_cache_tokens
        self.max_cache_mb = max_cache_mb
        self.sink_tokens = sink_tokens
        self.kv_bits = kv_bits
        self.keep_generated = keep_generated
        self.assistant_prefix = getattr(model.processor, "assistant_prefix", "<|im_start|>assistant\n")
        self.stop_ids = {i for i in (*self.tokenizer.eos_ids, self.tokenizer.token_id("<|im_end|>")) if i is not None}
        self._placeholder_ids: dict[str, list[int]] = {}
        self._rope: RopeSpec | None = None
        self._bytes_per_token: float | None = None
        self.cache: list = []
        self.spans: list[Span] = []
        self.evicted_total = 0
        self.frames_added = 0
        self.last_turn_ids: list[int] = []
        self._check_settings()

    def _check_settings(self) -> None:
        """Settings this model cannot honour fail here, as one line naming the key."""
        head_dim = getattr(self.lm.layers[0].self_attn, "head_dim", None)
        if self.kv_bits and head_dim is not None and head_dim % 32:
            raise UserError(f"session.kv_bits = {self.kv_bits}: KV quantisation needs head_dim divisible by 32 "
                            f"(this model has {head_dim})")
        prefix = len(self._encode(self._prefix_text()))
        if self.max_cache_tokens is not None and self.max_cache_tokens <= prefix:
            raise UserError(f"session.max_cache_tokens = {self.max_cache_tokens}: does not even hold the "
                            f"system prompt ({prefix} tokens)")

    def _prefix_text(self) -> str:
        return f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n<|im_start|>user\n"

    # -- state -------------------------------------------------------------------------------

    @property
    def offset(self) -> int:
        return self.cache[0].offset if self.cache else 0

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cache)

    def _new_cache(self) -> list:
        if self.kv_bits:
            return [QuantizedKVCache(bits=self.kv_bits) for _ in self.lm.layers]
        return self.model.make_cache()

    def start(self) -> None:
        """Prefill the prefix (system prompt, user turn opened once) if not done yet."""
        if self.spans:
            return
        self.cache = self._new_cache()
        ids = self._encode(self._prefix_text())
        self._prefill(ids, [])
        self.spans = [Span("prefix", len(ids))]
        self._check_budget_fits()
        self._reserve()

    def _reserve(self) -> None:
        """Size the cache buffers once (gpt-fast style): the whole budget when there is one, so
        frames never trigger a growth copy; geometric growth when unbounded."""
        budget = self.budget_tokens()
        for c in self.cache:
            if budget is not None and hasattr(c, "reserve"):
                c.reserve(budget)
            elif hasattr(c, "growth"):
                c.growth = UNBOUNDED_GROWTH

    def reset(self) -> None:
        self.cache, self.spans, self.last_turn_ids = [], [], []
        self.evicted_total = self.frames_added = 0
        self.start()

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    # -- prefill -----------------------------------------------------------------------------

    def _prefill(self, ids: list[int], images: list, *, logits: bool = False) -> mx.array | None:
        """Run `ids` (with image features for their placeholders) through the LM on the cache."""
        start = self.offset
        try:
            tokens = mx.array([ids], dtype=mx.int32)  # [1, T]
            h = self.model.embed(tokens, list(images))  # [1, T, D]
            body = getattr(self.lm, "model", None)
            if not logits and callable(body):
                # Frames and text never need logits: skip the LM head ([T, vocab] per frame).
                out = body(h, self.cache)
                mx.eval(out, *[c.state for c in self.cache])
                return None
            out = self.lm(cache=self.cache, input_embeddings=h, last_only=True)  # [1, 1, V]
            last = out[:, -1, :]
            mx.eval(last)
            return last
        except Exception:
            self._rollback(start)  # no half-written span: every layer back to `start`
            raise

    def _rollback(self, offset: int) -> None:
        for c in self.cache:
            c.trim(c.offset - offset)

    def add_features(self, features: Any, pts: float | None = None) -> int:
        """Append one frame (or one 3D-resampler group) from its vision features."""
        self.start()
        ids = self._frame_ids(features)
        self._make_room(len(ids))
        self._prefill(ids, [features])
        self.spans.append(Span("frame", len(ids), pts))
        self.frames_added += 1
        return len(ids)

    def _frame_ids(self, features: Any) -> list[int]:
        placeholder = self.model.image_placeholder(features) + "\n"
        ids = self._placeholder_ids.get(placeholder)
        if ids is None:
            ids = self._placeholder_ids[placeholder] = self._encode(placeholder)
        return ids

    def add_image(self, pixels: np.ndarray, pts: float | None = None) -> int:
        """Encode an RGB uint8 [H, W, 3] frame, then append it."""
        (features,) = self.model.encode_images([pixels], max_slice_nums=self.max_slice_nums)
        return self.add_features(features, pts)

    def add_text(self, text: str, pts: float | None = None) -> int:
        """Append text to the open user turn (e.g. a transcript line)."""
        self.start()
        ids = self._encode(text + "\n")
        self._make_room(len(ids))
        self._prefill(ids, [])
        self.spans.append(Span("text", len(ids), pts))
        return len(ids)

    # -- generation --------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        sampler: Callable[[mx.array, list[int]], mx.array] = greedy,
        on_delta: Callable[[TextDelta], None] | None = None,
        stop: threading.Event | None = None,
        return_logits: bool = False,
        ignore_eos: bool = False,
        frame: Any = None,
        pts: float | None = None,
    ) -> TurnDone:
        """One turn: prefill `{prompt}<|im_end|>\\n<|im_start|>assistant\\n`, decode, close.

        `frame` (vision features of a frame that just arrived, with its `pts`): append it in the
        same prefill pass as the prompt (one forward over ~80 tokens instead of two; the frame
        stays in the cache as its own span whatever happens to the turn).
        """
        self.start()
        t0 = time.perf_counter()
        ids = self._encode(prompt + TURN_END + self.assistant_prefix)
        close_ids = self._encode(CLOSE_TEXT)
        frame_ids = self._frame_ids(frame) if frame is not None else []
        evicted = self._make_room(len(frame_ids) + len(ids) + max_tokens + len(close_ids))
        turn_start = self.offset + len(frame_ids)
        try:
            if frame is not None:
                logits = self._prefill(frame_ids + ids, [frame], logits=True)
                self.spans.append(Span("frame", len(frame_ids), pts))
                self.frames_added += 1
            else:
                logits = self._prefill(ids, [], logits=True)
            prefill_s = time.perf_counter() - t0
            out_ids: list[int] = []
            kept_logits: list[np.ndarray] = []
            detok = self.tokenizer.detokenizer()
            stopped, first_token_s, t_first = "max_tokens", 0.0, time.perf_counter()
            history = mx.zeros((0,), dtype=mx.int32)  # this turn's tokens, for the sampler
            y = sampler(logits, history).astype(mx.int32)  # [1], lazy
            mx.async_eval(y)
            early = None  # the first token, read and published before the next step is queued
            while True:
                if return_logits:
                    kept_logits.append(np.array(logits[0]))
                if early is None:
                    # The first token is what a viewer waits for: read it now, not after
                    # building the next step's graph (a few ms of Python for a deep model).
                    early = int(y.item())
                    t_first = time.perf_counter()
                    first_token_s = t_first - t0
                    if not (early in self.stop_ids and not ignore_eos):
                        delta = detok.add(early)
                        if delta and on_delta is not None:
                            on_delta(TextDelta(delta, 1))
                # Queue the next step (fed with y) before reading y, so building the graph in
                # Python overlaps the device work (mlx-lm style). Every sampled token is
                # therefore already in the cache when we look at it; a stop token is trimmed.
                history = mx.concatenate([history, y])
                next_logits = self.lm(y.reshape(1, 1), cache=self.cache)[:, -1, :]
                next_y = sampler(next_logits, history).astype(mx.int32)
                mx.async_eval(next_y)
                token = int(y.item())
                if token in self.stop_ids and not ignore_eos:  # (benchmarks force a fixed length)
                    stopped = "eos"
                    self._rollback(self.offset - 1)  # the stop token was fed speculatively
                    break
                out_ids.append(token)
                if len(out_ids) > 1:  # the first one was published above
                    delta = detok.add(token)  # never half a UTF-8 character
                    if delta and on_delta is not None:
                        on_delta(TextDelta(delta, len(out_ids)))
                if len(out_ids) >= max_tokens or (stop is not None and stop.is_set()):
                    stopped = "max_tokens" if len(out_ids) >= max_tokens else "interrupted"
                    break
                logits, y = next_logits, next_y
            decode_s = time.perf_counter() - t_first
            tail = detok.finalize()
            if tail and on_delta is not None:
                on_delta(TextDelta(tail, len(out_ids)))
            text = detok.text
        except Exception:
            # A failed turn leaves no trace: the cache goes back to before its prompt, so the
            # spans still describe it exactly.
            self._rollback(turn_start)
            raise
        if self.keep_generated:
            self._prefill(close_ids, [])
            self.spans.append(Span("turn", self.offset - turn_start))
            # every id the turn left in the cache (tests rebuild transcripts from it)
            self.last_turn_ids = ids + out_ids + close_ids
        else:
            self._rollback(turn_start)
            self.last_turn_ids = []
        n = len(out_ids)
        return TurnDone(
            text=text,
            tokens=n,
            prompt_tokens=len(ids),
            stopped=stopped,
            prefill_s=prefill_s,
            first_token_s=first_token_s,
            tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            cache_tokens=self.offset,
            cache_bytes=self.nbytes,
            evicted_tokens=evicted,
            logits=kept_logits if return_logits else None,
        )

    # -- bounded memory ----------------------------------------------------------------------

    def budget_tokens(self) -> int | None:
        """Tokens the cache may hold: the tighter of the token and the MB budget."""
        limits = []
        if self.max_cache_tokens is not None:
            limits.append(self.max_cache_tokens)
        if self.max_cache_mb is not None and self.offset:
            if self._bytes_per_token is None:
                held = sum(a.nbytes for c in self.cache for a in c.state)
                self._bytes_per_token = held / self.offset
            # Buffers grow in whole steps, so leave one step of headroom for the allocation.
            step = getattr(self.cache[0], "step", 0)
            limits.append(int(self.max_cache_mb * 2**20 / self._bytes_per_token) - step)
        return min(limits) if limits else None

    def _sink_end(self) -> int:
        """Spans before this index are never evicted (prefix + first `sink_tokens`)."""
        keep = max(self.spans[0].length, self.sink_tokens or 0)
        total, idx = 0, 0
        for idx, span in enumerate(self.spans):
            if idx > 0 and total + span.length > keep:
                return idx
            total += span.length
        return len(self.spans)

    def _check_budget_fits(self) -> None:
        budget = self.budget_tokens()
        if budget is not None and budget <= self.spans[0].length:
            raise UserError(f"session.max_cache_tokens/max_cache_mb: budget of {budget} tokens "
                            f"does not even hold the system prompt ({self.spans[0].length} tokens)")

    def _make_room(self, n_new: int) -> int:
        """Evict oldest whole spans so that `n_new` more tokens fit the budget."""
        budget = self.budget_tokens()
        if budget is None or self.offset + n_new <= budget:
            return 0
        # Hysteresis: drop to a low-water mark, so re-rotation runs once per many frames
        # (each key is re-rotated a few times at most before it is itself evicted).
        target = min(int(budget * EVICT_LOW_WATER), budget - n_new)
        first = self._sink_end()
        start = sum(s.length for s in self.spans[:first])
        end, last = start, first
        while last < len(self.spans) and self.offset - (end - start) > target:
            end += self.spans[last].length
            last += 1
        if self.offset - (end - start) + n_new > budget:
            raise UserError(f"session.max_cache_tokens: budget of {budget} tokens cannot hold the sinks "
                            f"({start} tokens) plus {n_new} new tokens")
        return self._evict(first, last, start, end)

    def _evict(self, first: int, last: int, start: int, end: int) -> int:
        # Re-rotating the cached keys (instead of caching keys before RoPE and rotating all of
        # them at every step) keeps the layers' contract unchanged (RoPE before
        # update_and_fetch), costs one pass over the moved keys per eviction instead of one
        # pass over the whole cache per decoded token, and with the low-water hysteresis each
        # key is rounded only a few times in its life. The shift is exact in real arithmetic
        # (rotations compose); tests compare against a fresh prefill of the kept tokens.
        if self._rope is None:
            attn = self.lm.layers[0].self_attn
            self._rope = probe_rope(attn.rope, attn.head_dim)
        removed = evict_prompt_cache(self.cache, [(start, end)], rope=self._rope)
        mx.eval(*[c.state for c in self.cache])
        del self.spans[first:last]
        self.evicted_total += removed
        return removed

    def positions_contiguous(self) -> bool:
        return self.offset == sum(s.length for s in self.spans)

    # -- save / restore ----------------------------------------------------------------------

    def _fingerprint(self) -> dict[str, Any]:
        attn = self.lm.layers[0].self_attn
        return {"layers": len(self.lm.layers), "n_kv": attn.n_kv_heads, "head_dim": attn.head_dim,
                "kv_bits": self.kv_bits or 0}

    def save(self, path: str | Path) -> Path:
        self.start()
        path = Path(path)
        arrays = {f"cache.{i}.{j}": a for i, c in enumerate(self.cache) for j, a in enumerate(c.state)}
        meta = {
            "format": SAVE_FORMAT,
            "fingerprint": self._fingerprint(),
            "system_prompt": self.system_prompt,
            "spans": [asdict(s) for s in self.spans],
            "evicted_total": self.evicted_total,
            "frames_added": self.frames_added,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(path), arrays, metadata={"framecast_session": json.dumps(meta)})
        return path

    def load(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: session file not found")
        try:
            arrays, metadata = mx.load(str(path), return_metadata=True)
            meta = json.loads(metadata["framecast_session"])
        except Exception as e:
            raise UserError(f"{path}: not a framecast session file ({type(e).__name__})") from None
        if meta.get("format") != SAVE_FORMAT:
            raise UserError(f"{path}: unsupported session format {meta.get('format')!r}")
        if meta["fingerprint"] != self._fingerprint():
            raise UserError(f"{path}: saved for a different model or kv_bits ({meta['fingerprint']})")
        cache = self._new_cache()
        for i, c in enumerate(cache):
            n = sum(1 for k in arrays if k.startswith(f"cache.{i}."))
            c.state = tuple(arrays[f"cache.{i}.{j}"] for j in range(n))
        self.cache = cache
        self._reserve()
        self.system_prompt = meta["system_prompt"]
        self.spans = [Span(**s) for s in meta["spans"]]
        self.evicted_total = meta["evicted_total"]
        self.frames_added = meta["frames_added"]
        if not self.positions_contiguous():
            raise UserError(f"{path}: cache holds {self.offset} tokens but its spans add up to "
                            f"{sum(s.length for s in self.spans)}")


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
