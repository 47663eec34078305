"""SessionCore: one conversation on one persistent KV cache, fed frame by frame (synchronous).

Each new frame costs only its own tokens: the session prefills a frame's placeholder span (its
vision features scattered in) with positions continuing from the cache, and a narration or an
answer only prefills the prompt before decoding. The rooms it composes:

  layout.py    the streaming ChatML and its spans (what is prefilled, in which order)
  budget.py    the token / MB budget and the eviction of whole old spans (RoPE re-rotation)
  generate.py  `prefill` and THE token loop `generate_step` (shared with `framecast generate`)
  persist.py   save / restore of cache + spans
  session.py   `StreamingSession`, the async facade on the model's worker thread

A turn always ends with `<|im_end|>` in the cache, whether the model produced it, ran out of
tokens or was interrupted (a sampled stop token is dropped from the cache, then appended once).
`keep_generated=False` trims the whole turn away instead, leaving the user turn open.

Threading: a `SessionCore` must only be used from one thread (the model's worker).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generator

import mlx.core as mx
import numpy as np

from framecast.engine import layout
from framecast.engine.budget import CacheBudget
from framecast.engine.generate import DEFAULT_MAX_TOKENS, SamplerFn, generate_step, prefill, prefill_rows
from framecast.engine.layout import DEFAULT_SYSTEM_PROMPT, Span
from framecast.engine.persist import fingerprint, load_session, save_session
from framecast.errors import UserError
from framecast.model.cache import QuantizedKVCache

__all__ = ["DEFAULT_MAX_TOKENS", "SessionCore", "Span", "TextDelta", "TurnDone"]

UNBOUNDED_GROWTH = 1.25  # no budget: each cache growth adds at least a quarter (few copies)


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


# ---------------------------------------------------------------- the synchronous core


def kv_bytes_per_token(lm: Any, kv_bits: int | None = None) -> float:
    """Bytes one token takes in a KV cache of `lm`: keys + values of every layer, in the
    layers' compute dtype (or `kv_bits` plus a float16 scale and bias per 64 values)."""
    attn = lm.layers[0].self_attn
    width = 2 * attn.n_kv_heads * attn.head_dim * len(lm.layers)
    if kv_bits:
        return width * (kv_bits / 8 + 4 / 64)
    dtype = getattr(attn.k_proj, "scales", attn.k_proj.weight).dtype  # a quantised layer computes in its scales' dtype
    return width * dtype.size


def memory_bytes() -> int:
    """The memory a cache can live in: the GPU's (as MLX reports it), else the machine's RAM; 0
    when unknown."""
    try:
        size = int(mx.device_info().get("memory_size", 0))
    except Exception:  # noqa: BLE001 - an older MLX or no device info: fall back to RAM
        size = 0
    if size:
        return size
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


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
        kv_pool: Any = None,
    ):
        self.model = model
        self.kv_pool = kv_pool  # a shared `model.kv_pool.KVPoolSet`: this session's cache is a row of it
        self.max_slice_nums = max_slice_nums  # views per frame when the session encodes pixels
        self.lm = model.language_model
        self.tokenizer = model.tokenizer
        self.system_prompt = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
        self.budget = CacheBudget(max_cache_tokens=max_cache_tokens, max_cache_mb=max_cache_mb,
                                  sink_tokens=sink_tokens)
        self.kv_bits = kv_bits
        self.keep_generated = keep_generated
        self.assistant_prefix = getattr(model.processor, "assistant_prefix", layout.DEFAULT_ASSISTANT_PREFIX)
        self.stop_ids = {i for i in (*self.tokenizer.eos_ids, self.tokenizer.token_id("<|im_end|>")) if i is not None}
        self._placeholder_ids: dict[str, list[int]] = {}
        self.cache: list = []
        self.spans: list[Span] = []
        self.evicted_total = 0
        self.frames_added = 0
        self.last_turn_ids: list[int] = []
        self.decode_batch: Any = None  # a shared `engine.scheduler.BatchDecode` (several streams)
        self._check_settings()

    # The budget's settings, readable and settable on the session as before.
    max_cache_tokens = property(lambda self: self.budget.max_cache_tokens,
                                lambda self, v: setattr(self.budget, "max_cache_tokens", v))
    max_cache_mb = property(lambda self: self.budget.max_cache_mb,
                            lambda self, v: setattr(self.budget, "max_cache_mb", v))
    sink_tokens = property(lambda self: self.budget.sink_tokens,
                           lambda self, v: setattr(self.budget, "sink_tokens", v))

    def _check_settings(self) -> None:
        """Settings this model cannot honour fail here, as one line naming the key."""
        head_dim = getattr(self.lm.layers[0].self_attn, "head_dim", None)
        if self.kv_bits and head_dim is not None and head_dim % 32:
            raise UserError(f"session.kv_bits = {self.kv_bits}: KV quantisation needs head_dim divisible by 32 "
                            f"(this model has {head_dim})")
        prefix = len(self._encode(layout.prefix_text(self.system_prompt)))
        if self.max_cache_tokens is not None and self.max_cache_tokens <= prefix:
            raise UserError(f"session.max_cache_tokens = {self.max_cache_tokens}: does not even hold the "
                            f"system prompt ({prefix} tokens)")
        if self.max_cache_tokens is not None:  # the budget is allocated whole: refuse one that can never fit
            need, have = self.max_cache_tokens * kv_bytes_per_token(self.lm, self.kv_bits), memory_bytes()
            if have and need > have:
                raise UserError(f"session.max_cache_tokens = {self.max_cache_tokens}: this model's KV cache would "
                                f"need {need / 2**30:.1f} GiB, more than the {have / 2**30:.1f} GiB of memory here")

    # -- state -------------------------------------------------------------------------------

    @property
    def offset(self) -> int:
        return self.cache[0].offset if self.cache else 0

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cache)

    def _new_cache(self) -> list:
        """A row of the run's shared buffers when one is free and fits, else a cache of its own."""
        return (self._acquire_row() if self.kv_pool is not None and not self.kv_bits else None) or self._own_cache()

    def _own_cache(self) -> list:
        if self.kv_bits:
            return [QuantizedKVCache(bits=self.kv_bits) for _ in self.lm.layers]
        return self.model.make_cache()

    def _acquire_row(self) -> list | None:
        # a budget in MB depends on the cache's own bytes per token: such sessions keep their own
        return self.kv_pool.acquire(self.max_cache_tokens if self.max_cache_mb is None else None)

    def _pooled(self, own: list) -> list:
        """A loaded cache of its own moved into this session's pooled row (or a free one) when
        the run shares rows and it fits one; else `own` as it is."""
        if self.kv_pool is None or self.kv_bits or not own or own[0].offset > self.kv_pool.capacity:
            return own
        rows = self.cache if self.cache and getattr(self.cache[0], "pool", None) is self.kv_pool.layers[0] else \
            self._acquire_row()
        if rows is None:
            return own
        for row, c in zip(rows, own):
            row.state = c.state
        return rows

    def _release(self, cache: list) -> None:
        """Give a pooled cache's row back (nothing for a cache of its own)."""
        if self.kv_pool is not None:
            self.kv_pool.release(cache)

    def start(self) -> None:
        """Prefill the prefix (system prompt, user turn opened once) if not done yet."""
        if self.spans:
            return
        self._release(self.cache)  # a row kept by a prefix prefill that failed
        self.cache = self._new_cache()
        ids = self._encode(layout.prefix_text(self.system_prompt))
        for c in self.cache:  # the prefix alone first (a growth step could overrun a budget in MB)
            if hasattr(c, "reserve"):
                c.reserve(len(ids))
        prefill(self.model, ids, self.cache)
        self.spans = [Span("prefix", len(ids))]
        self.budget.check_fits(self.cache, self.spans)
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
        self._release(self.cache)
        self.cache, self.spans, self.last_turn_ids = [], [], []
        self.evicted_total = self.frames_added = 0
        self.start()

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def _rollback(self, offset: int) -> None:
        for c in self.cache:
            c.trim(c.offset - offset)

    def budget_tokens(self) -> int | None:
        """Tokens the cache may hold: the tighter of the token and the MB budget."""
        return self.budget.tokens(self.cache)

    def _make_room(self, n_new: int) -> int:
        removed = self.budget.make_room(self.cache, self.spans, n_new, self.lm)
        self.evicted_total += removed
        return removed

    def positions_contiguous(self) -> bool:
        return self.offset == sum(s.length for s in self.spans)

    # -- adding context ----------------------------------------------------------------------

    def _frame_ids(self, features: Any) -> list[int]:
        placeholder = layout.frame_text(self.model.image_placeholder(features))
        ids = self._placeholder_ids.get(placeholder)
        if ids is None:
            ids = self._placeholder_ids[placeholder] = self._encode(placeholder)
        return ids

    def add_features(self, features: Any, pts: float | None = None) -> int:
        """Append one frame (or one 3D-resampler group) from its vision features."""
        self.start()
        ids = self._frame_ids(features)
        self._make_room(len(ids))
        prefill(self.model, ids, self.cache, images=[features])
        self._frame_added(len(ids), pts)
        return len(ids)

    def _frame_added(self, n_tokens: int, pts: float | None) -> None:
        """Bookkeeping of a frame span now in the cache (every path that prefills one)."""
        self.spans.append(Span("frame", n_tokens, pts))
        self.frames_added += 1

    @staticmethod
    def add_features_rows(cores: list[SessionCore], features: list[Any],
                          pts: list[float | None]) -> list[int | Exception]:
        """`add_features` on several sessions of one model at once: frame spans of one length go
        through one batched prefill (`engine.generate.prefill_rows`), so a tick's frames from
        several streams cost about one frame's weight reads. Each session ends as its own
        `add_features` would leave it (budget, eviction and spans are per session; the cache
        to float rounding, see `prefill_rows`).

        Returns per session the tokens added, or the exception that stopped its frame (its
        budget refused it, or its group's prefill failed: those caches are rolled back); the
        others are unaffected. Raises ValueError for a session named twice or sessions of
        different models."""
        if len({id(c) for c in cores}) != len(cores) or len({id(c.model) for c in cores}) > 1:
            raise ValueError("add_features_rows: each session once, all on one model")
        out: list[int | Exception] = [0] * len(cores)
        by_length: dict[int, list[tuple[int, list[int]]]] = {}
        for i, (core, feat) in enumerate(zip(cores, features)):
            try:
                core.start()
                ids = core._frame_ids(feat)
                core._make_room(len(ids))
            except Exception as e:  # noqa: BLE001  (this session's own trouble, not the batch's)
                out[i] = e
                continue
            by_length.setdefault(len(ids), []).append((i, ids))
        for group in by_length.values():
            try:
                prefill_rows(cores[group[0][0]].model, [ids for _, ids in group],
                             [cores[i].cache for i, _ in group], images=[[features[i]] for i, _ in group])
            except Exception as e:  # noqa: BLE001
                for i, _ in group:
                    out[i] = e
                continue
            for i, ids in group:
                cores[i]._frame_added(len(ids), pts[i])
                out[i] = len(ids)
        return out

    def add_image(self, pixels: np.ndarray, pts: float | None = None) -> int:
        """Encode an RGB uint8 [H, W, 3] frame, then append it."""
        (features,) = self.model.encode_images([pixels], max_slice_nums=self.max_slice_nums)
        return self.add_features(features, pts)

    def add_text(self, text: str, pts: float | None = None) -> int:
        """Append text to the open user turn (e.g. a transcript line)."""
        self.start()
        ids = self._encode(layout.line_text(text))
        self._make_room(len(ids))
        prefill(self.model, ids, self.cache)
        self.spans.append(Span("text", len(ids), pts))
        return len(ids)

    # -- a turn ------------------------------------------------------------------------------

    def generate(self, prompt: str, *, on_delta: Callable[[TextDelta], None] | None = None,
                 **kw: Any) -> TurnDone:
        """One turn: prefill `{prompt}<|im_end|>\\n<|im_start|>assistant\\n`, decode, close.

        `on_delta` gets each `TextDelta` as it comes; the other keywords are `turn`'s.
        """
        steps = self.turn(prompt, **kw)
        while True:
            try:
                delta = next(steps)
            except StopIteration as done:
                return done.value
            if delta is not None and on_delta is not None:
                on_delta(delta)

    def turn(
        self,
        prompt: str,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        sampler: SamplerFn | None = None,
        stop: threading.Event | None = None,
        return_logits: bool = False,
        ignore_eos: bool = False,
        frame: Any = None,
        pts: float | None = None,
    ) -> Generator[TextDelta | None, None, TurnDone]:
        """`generate` one step at a time: yields once per decoded token (a `TextDelta`, or None
        while a UTF-8 character is incomplete) and returns the `TurnDone`.
        Several sessions on one worker interleave their turns between these steps
        (`StreamingSession.narrate`).

        Run it to the end (set `stop` to end early): closing it half-way leaves the turn open.
        `sampler`: default greedy; its repetition penalty sees this turn's tokens only.
        `ignore_eos`: decode exactly `max_tokens` (benchmarks force a fixed length).
        `frame` (vision features of a frame that just arrived, with its `pts`): append it in the
        same prefill pass as the prompt (one forward over ~80 tokens instead of two); the frame
        stays in the cache as its own span whatever happens to the turn.
        """
        self.start()
        t0 = time.perf_counter()
        ids = self._encode(layout.turn_text(prompt, self.assistant_prefix))
        close_ids = self._encode(layout.CLOSE_TEXT)
        frame_ids = self._frame_ids(frame) if frame is not None else []
        evicted = self._make_room(len(frame_ids) + len(ids) + max_tokens + len(close_ids))
        turn_start = self.offset + len(frame_ids)
        steps = None
        try:
            if frame is not None:
                logits = prefill(self.model, frame_ids + ids, self.cache, images=[frame], logits=True)  # [1, V]
                self._frame_added(len(frame_ids), pts)
            else:
                logits = prefill(self.model, ids, self.cache, logits=True)  # [1, V]
            prefill_s = time.perf_counter() - t0
            out_ids: list[int] = []
            kept_logits: list[np.ndarray] = []
            detok = self.tokenizer.detokenizer()
            stopped, first_token_s, t_first = "max_tokens", 0.0, time.perf_counter()
            steps = generate_step(self.model, self.cache, logits, sampler=sampler,
                                  max_tokens=max_tokens, stop_ids=() if ignore_eos else self.stop_ids,
                                  batch=self.decode_batch)
            for token, token_logits in steps:
                if return_logits:
                    kept_logits.append(np.array(token_logits[0]))
                if not out_ids:
                    t_first = time.perf_counter()
                    first_token_s = t_first - t0
                if token in self.stop_ids and not ignore_eos:
                    stopped = "eos"  # generate_step took it back out of the cache
                    break
                out_ids.append(token)
                delta = detok.add(token)  # never half a UTF-8 character
                yield TextDelta(delta, len(out_ids)) if delta else None
                if len(out_ids) >= max_tokens or (stop is not None and stop.is_set()):
                    stopped = "max_tokens" if len(out_ids) >= max_tokens else "interrupted"
                    break
            steps.close()
            decode_s = time.perf_counter() - t_first
            if self.offset < turn_start + len(ids) + len(out_ids):
                prefill(self.model, out_ids[-1:], self.cache)  # the max_tokens-th token is never fed
            tail = detok.finalize()
            if tail:
                yield TextDelta(tail, len(out_ids))
            text = detok.text
        except Exception:
            # A failed turn leaves no trace: the cache goes back to before its prompt, so the
            # spans still describe it exactly. The token loop is closed first: closing feeds the
            # last token it handed out (its cache contract), which must not land after the trim.
            if steps is not None:
                try:
                    steps.close()
                except Exception:  # noqa: BLE001  (the first error is the one to report)
                    pass
            self._rollback(turn_start)
            raise
        if self.keep_generated:
            prefill(self.model, close_ids, self.cache)
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

    # -- save / restore ----------------------------------------------------------------------

    def _fingerprint(self) -> dict[str, Any]:
        return fingerprint(self.lm, self.kv_bits)

    def save(self, path: str | Path) -> Path:
        self.start()
        return save_session(path, self.cache, self.spans, fingerprint=self._fingerprint(),
                            system_prompt=self.system_prompt, evicted_total=self.evicted_total,
                            frames_added=self.frames_added)

    def load(self, path: str | Path) -> None:
        # Into a cache of its own first (a saved session may be longer than a pooled row: the
        # budget then evicts it down, as for any session); then into this session's row.
        own = self._own_cache()
        meta = load_session(path, own, fingerprint=self._fingerprint())
        cache = self._pooled(own)
        if cache is not self.cache:
            self._release(self.cache)
        self.cache = cache
        self._reserve()
        self.system_prompt = meta["system_prompt"]
        self.spans = meta["spans"]
        self.evicted_total = meta["evicted_total"]
        self.frames_added = meta["frames_added"]
        if not self.positions_contiguous():
            raise UserError(f"{path}: cache holds {self.offset} tokens but its spans add up to "
                            f"{sum(s.length for s in self.spans)}")
