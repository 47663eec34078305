"""Bounded KV memory: a token / megabyte budget and the eviction of whole old spans.

When the next operation would exceed the budget, the oldest whole spans after the sinks (the
prefix plus `sink_tokens`) are evicted down to a low-water mark, and the keys after the gap are
re-rotated so positions stay contiguous (`framecast.model.cache.evict_prompt_cache`).
"""

from __future__ import annotations

import mlx.core as mx

from framecast.engine.layout import Span
from framecast.errors import UserError
from framecast.kernels.rope_shift import RopeSpec, probe_rope
from framecast.model.cache import evict_prompt_cache

EVICT_LOW_WATER = 0.75  # after an eviction the cache holds at most this share of the budget


class CacheBudget:
    """The budget of one session's cache; `make_room` evicts (cache and spans, in place)."""

    def __init__(self, *, max_cache_tokens: int | None = None, max_cache_mb: float | None = None,
                 sink_tokens: int | None = None, low_water: float = EVICT_LOW_WATER):
        self.max_cache_tokens = max_cache_tokens
        self.max_cache_mb = max_cache_mb
        self.sink_tokens = sink_tokens
        self.low_water = low_water
        self._bytes_per_token: float | None = None  # measured once, from the first cache
        self._rope: RopeSpec | None = None  # probed once, at the first eviction

    @staticmethod
    def _offset(cache: list) -> int:
        return cache[0].offset if cache else 0

    def tokens(self, cache: list) -> int | None:
        """Tokens the cache may hold: the tighter of the token and the MB budget."""
        limits = []
        if self.max_cache_tokens is not None:
            limits.append(self.max_cache_tokens)
        offset = self._offset(cache)
        if self.max_cache_mb is not None and offset:
            if self._bytes_per_token is None:
                held = sum(a.nbytes for c in cache for a in c.state)
                self._bytes_per_token = held / offset
            limits.append(int(self.max_cache_mb * 2**20 / self._bytes_per_token) - self._headroom(cache))
        return min(limits) if limits else None

    @staticmethod
    def _headroom(cache: list) -> int:
        """Tokens an MB budget leaves unused: none for a cache that is allocated whole at its
        budget (`reserve`), a growth step for one that grows in steps (quantised caches)."""
        return 0 if hasattr(cache[0], "reserve") else getattr(cache[0], "step", 0)

    def check_fits(self, cache: list, spans: list[Span]) -> None:
        """UserError (one line) when the budget does not even hold the prefix span."""
        budget = self.tokens(cache)
        if budget is not None and budget <= spans[0].length:
            n = spans[0].length
            if self.max_cache_tokens is not None and self.max_cache_tokens <= n:
                raise UserError(f"session.max_cache_tokens = {self.max_cache_tokens}: does not even hold the "
                                f"system prompt ({n} tokens)")
            # the MB budget binds: say what it holds of this model's cache, and what would do
            need = (n + self._headroom(cache)) * (self._bytes_per_token or 0) / 2**20
            raise UserError(f"session.max_cache_mb = {self.max_cache_mb:g} holds {max(budget, 0)} tokens of this "
                            f"model's cache, not even the system prompt ({n} tokens; that needs over {need:.2f} MB)")

    def _sink_end(self, spans: list[Span]) -> int:
        """Spans before this index are never evicted (prefix + first `sink_tokens`)."""
        keep = max(spans[0].length, self.sink_tokens or 0)
        total, idx = 0, 0
        for idx, span in enumerate(spans):
            if idx > 0 and total + span.length > keep:
                return idx
            total += span.length
        return len(spans)

    def make_room(self, cache: list, spans: list[Span], n_new: int, lm) -> int:
        """Evict oldest whole spans so that `n_new` more tokens fit; returns tokens evicted.

        `lm`: the language model whose first layer's RoPE the re-rotation must match.
        """
        budget = self.tokens(cache)
        offset = self._offset(cache)
        if budget is None or offset + n_new <= budget:
            return 0
        # Hysteresis: drop to a low-water mark, so re-rotation runs once per many frames
        # (each key is re-rotated a few times at most before it is itself evicted).
        target = min(int(budget * self.low_water), budget - n_new)
        first = self._sink_end(spans)
        start = sum(s.length for s in spans[:first])
        end, last = start, first
        while last < len(spans) and offset - (end - start) > target:
            end += spans[last].length
            last += 1
        if offset - (end - start) + n_new > budget:
            key = (f"session.max_cache_tokens = {self.max_cache_tokens}" if budget == self.max_cache_tokens
                   else f"session.max_cache_mb = {self.max_cache_mb:g}")
            raise UserError(f"{key}: a budget of {budget} tokens cannot hold the sinks "
                            f"({start} tokens) plus {n_new} new tokens")
        # Re-rotating the cached keys (instead of caching keys before RoPE and rotating all of
        # them at every step) keeps the layers' contract unchanged (RoPE before
        # update_and_fetch), costs one pass over the moved keys per eviction instead of one
        # pass over the whole cache per decoded token, and with the low-water hysteresis each
        # key is rounded only a few times in its life. The shift is exact in real arithmetic
        # (rotations compose); tests compare against a fresh prefill of the kept tokens.
        if self._rope is None:
            attn = lm.layers[0].self_attn
            self._rope = probe_rope(attn.rope, attn.head_dim)
        removed = evict_prompt_cache(cache, [(start, end)], rope=self._rope)
        mx.eval(*[c.state for c in cache])
        del spans[first:last]
        return removed
