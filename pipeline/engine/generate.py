"""THE token loop: `prefill` a prompt on a KV cache, then `generate_step` one token at a time.

Every generation in framecast runs through here: `framecast generate`
(`framecast.stages.model_commands`, via `generate_tokens`), and the streaming session's
narrations and answers (`framecast.engine.core.SessionCore.generate`).

The shape is mlx-lm's `generate_step`: a sampler and a cache in, `(token, logits)` out. From
the second token on, the next step is queued (`mx.async_eval`) before the current token is
handed out, so Python overhead overlaps device work; when the handed-out token turns out to be a
stop token, that extra step is trimmed off the cache again. The first token is handed out before
anything is queued (its latency is the one a viewer waits for). Contract: when the loop ends, the cache holds every
yielded token except a final stop token and the `max_tokens`-th token (nothing follows it, so it
is never fed); a consumer that stops early (break) leaves every token it saw in the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import mlx.core as mx

from framecast.engine.sampling import make_sampler
from framecast.errors import UserError

PREFILL_STEP = 512  # prompt tokens per forward call during prefill (bounds activation memory)
DEFAULT_MAX_TOKENS = 64

#: `sampler(logits [1, V], history [N] int32) -> token ids [1]` (e.g. `engine.sampling.Sampler`)
SamplerFn = Callable[[mx.array, mx.array], mx.array]


def language_model(model):
    """The causal LM of a MiniCPMV (`.language_model`) or of a text-only model; a bare LM itself."""
    return getattr(model, "language_model", model)


def prefill(model, ids: list[int], cache: list, *, images=(), prefill_step: int = PREFILL_STEP,
            logits: bool = False) -> mx.array | None:
    """Run prompt `ids` through the LM on `cache`, `prefill_step` tokens per call.

    `images`: ImageFeatures whose placeholders are in `ids` (MiniCPMV `embed` scatters them in).
    Returns the last position's logits [1, V] (evaluated) when `logits`, else None: the cache is
    all a frame or a text span needs, and the V-wide head never runs for it. A failure leaves the
    cache as it was (every layer trimmed back), so no half-written span remains.
    """
    lm = language_model(model)
    start = cache[0].offset if cache else 0
    try:
        tokens = mx.array([ids], dtype=mx.int32)  # [1, T]
        embeddings = model.embed(tokens, list(images)) if images else None  # [1, T, D]
        n = len(ids)
        for begin in range(0, n, prefill_step):
            end = min(begin + prefill_step, n)
            chunk = dict(input_embeddings=embeddings[:, begin:end]) if embeddings is not None else {}
            inputs = None if embeddings is not None else tokens[:, begin:end]
            if logits and end == n:
                last = lm(inputs, cache=cache, last_only=True, **chunk)[:, -1, :]  # [1, V]
                mx.eval(last)
                return last
            # Only the cache is evaluated: the lazily built head and norm are never computed.
            lm(inputs, cache=cache, **chunk)
            mx.eval([c.state for c in cache])
        return None
    except BaseException:
        for c in cache:
            c.trim(c.offset - start)
        raise


def prefill_rows(model, rows: list[list[int]], caches: list[list], *, images: list[list] | None = None,
                 prefill_step: int = PREFILL_STEP) -> None:
    """`prefill` of several sessions' spans of one length in one batched forward per chunk.

    `rows[b]` (token ids, all of one length T) goes onto session b's cache `caches[b]` (a
    per-layer list, as `model.make_cache()` gives), with `images[b]` in its placeholders. The
    projections and MLP see a [B, T, D] batch, so the weights are read once for every stream
    whose frame arrived in the same tick; each row's positions and attention are its own
    (`framecast.model.lm.base.RowCaches`). Each cache ends as `prefill(rows[b])` would leave it,
    to float rounding (a batched matmul may sum a row in another order than a one-row one).
    A failure leaves every cache as it was. Raises ValueError for rows of different lengths.
    """
    from framecast.model.lm.base import RowCaches

    if len({len(r) for r in rows}) > 1 or len(rows) != len(caches):
        raise ValueError(f"prefill_rows: rows of lengths {[len(r) for r in rows]} for {len(caches)} caches")
    if len(rows) == 1:
        prefill(model, rows[0], caches[0], images=(images or [()])[0], prefill_step=prefill_step)
        return
    lm = language_model(model)
    starts = [c[0].offset if c else 0 for c in caches]
    images = images or [()] * len(rows)
    try:
        parts = []
        for ids, imgs in zip(rows, images):
            tokens = mx.array([ids], dtype=mx.int32)  # [1, T]
            parts.append(model.embed(tokens, list(imgs)) if imgs else lm.embed_tokens(tokens))
        h = mx.concatenate(parts)  # [B, T, D]
        layers = [RowCaches([c[i] for c in caches]) for i in range(len(caches[0]))]
        for begin in range(0, h.shape[1], prefill_step):
            lm(None, cache=layers, input_embeddings=h[:, begin:begin + prefill_step])
            mx.eval([c.state for cache in caches for c in cache])
    except BaseException:
        for cache, start in zip(caches, starts):
            for c in cache:
                c.trim(c.offset - start)
        raise


def generate_step(model, cache: list, logits: mx.array, *, sampler: SamplerFn | None = None,
                  max_tokens: int = DEFAULT_MAX_TOKENS, stop_ids: Iterable[int] = (),
                  history: Iterable[int] = (), batch: Any = None) -> Iterator[tuple[int, mx.array]]:
    """Yield `(token, logits)` pairs, starting from the prefilled prompt's `logits` [1, V].

    `logits` of a pair is the row [1, V] the token was drawn from (lazy until read).
    `sampler`: default greedy. `history`: token ids the sampler's repetition penalty sees
    before this turn's own (the prompt for `generate`, none for a session turn).
    `stop_ids`: a token in it is yielded last and taken back out of the cache.
    `batch`: a shared `engine.scheduler.BatchDecode`: each next step is submitted to it before
    the token is handed out, and runs as one row of a batched forward with the steps other
    sessions submitted meanwhile (`_batched_steps`). Same cache contract.
    """
    sampler = sampler or make_sampler(0.0)
    stops = set(stop_ids)
    seen = mx.array(list(history), dtype=mx.int32)  # [N], grows on the device
    if batch is not None:
        yield from _batched_steps(cache, logits, sampler, max_tokens, stops, seen, batch)
        return
    lm = language_model(model)
    y = sampler(logits, seen).astype(mx.int32)  # [1], lazy
    mx.async_eval(y)
    for n in range(max_tokens):
        queued = n + 1 < max_tokens
        if n == 0:
            # The first token is the one a viewer waits for: hand it out before spending a few
            # ms of Python on the next step's graph (one step without overlap per turn).
            token = int(y.item())
            try:
                yield token, logits
            except GeneratorExit:
                if queued and token not in stops:  # keep the contract: every token seen is cached
                    lm(y.reshape(1, 1), cache=cache)
                    mx.eval([c.state for c in cache])
                raise
            if token in stops or not queued:
                return
            seen = mx.concatenate([seen, y])
            logits = lm(y.reshape(1, 1), cache=cache)[:, -1, :]  # [1, V]
            y = sampler(logits, seen).astype(mx.int32)
            mx.async_eval(y)
            continue
        if queued:  # queue the next step before reading y (overlaps device and host)
            seen = mx.concatenate([seen, y])
            next_logits = lm(y.reshape(1, 1), cache=cache)[:, -1, :]  # [1, V]
            next_y = sampler(next_logits, seen).astype(mx.int32)
            mx.async_eval(next_y)
        token = int(y.item())
        if token in stops:
            if queued:
                for c in cache:
                    c.trim(1)  # the stop token was fed ahead of time: take it back out
            yield token, logits
            return
        yield token, logits
        if queued:
            logits, y = next_logits, next_y


def _batched_steps(cache: list, logits: mx.array, sampler: SamplerFn, max_tokens: int, stops: set[int],
                   seen: mx.array, batch: Any) -> Iterator[tuple[int, mx.array]]:
    """`generate_step` through a shared `BatchDecode`. The step that feeds a token is submitted
    before the token is handed out: while this turn's reader (and the worker's other jobs) run,
    other sessions submit theirs, and whoever needs logits first runs them all as one batch.
    A stop token and the `max_tokens`-th token are never submitted (nothing to take back)."""
    y = sampler(logits, seen).astype(mx.int32)  # [1], lazy
    mx.async_eval(y)
    for n in range(max_tokens):
        token = int(y.item())
        last = token in stops or n + 1 >= max_tokens
        step = None if last else batch.submit(y.reshape(1, 1), cache)
        try:
            yield token, logits
        except GeneratorExit:
            if step is not None:  # keep the contract: every token seen is cached
                try:
                    mx.eval(step.logits())
                except Exception:  # noqa: BLE001  (its batch failed: the turn rolls its cache back)
                    pass
            raise
        if last:
            return
        seen = mx.concatenate([seen, y])
        logits = step.logits()  # [1, V]: runs the batch this step is in, if it has not run yet
        y = sampler(logits, seen).astype(mx.int32)
        mx.async_eval(y)  # the device starts on the batch; the worker runs other jobs until y is read


def generate_tokens(model, prompt_ids: list[int], *, max_tokens: int = DEFAULT_MAX_TOKENS,
                    sampler: SamplerFn | None = None, cache: list | None = None, images=(),
                    stop_ids: set[int] | None = None, prefill_step: int = PREFILL_STEP) -> Iterator[int]:
    """Yield generated token ids (the last may be a stop token) for `prompt_ids` on `cache`.

    `images`: ImageFeatures whose placeholders are in the prompt (MiniCPMV only).
    `stop_ids`: default the tokenizer's eos ids. `sampler`: default greedy; its repetition
    penalty sees the prompt too. Cache contract as `generate_step`.
    """
    if not prompt_ids:
        raise UserError("generate: the prompt is empty")
    cache = cache if cache is not None else model.make_cache()
    stops = stop_ids if stop_ids is not None else set(getattr(model.tokenizer, "eos_ids", set()))
    logits = prefill(model, prompt_ids, cache, images=images, prefill_step=prefill_step, logits=True)
    for token, _ in generate_step(model, cache, logits, sampler=sampler, max_tokens=max_tokens,
                                  stop_ids=stops, history=prompt_ids):
        yield token
