"""Key/value caches for the language models.

`KVCache` is a gpt-fast style preallocated buffer per layer: keys and values live in arrays of
shape [B, n_kv, capacity, head_dim] that grow along T in whole steps (default 256 tokens), so
streaming decode writes one token into existing memory instead of concatenating every step.
A session that knows its token budget calls `reserve(budget)` once: the first write allocates
the whole budget and the buffer never grows or copies again (eviction compacts in place). An
unbounded session sets `growth` (e.g. 1.25): each growth then adds at least a quarter of the
capacity, so a cache that reaches 40k tokens copies itself ~10 times instead of ~150.

Protocol the models rely on (duck-typed: the session may pass other cache classes):
  - `offset`: tokens held, which is also the RoPE position of the next token;
  - `update_and_fetch(keys, values) -> (keys, values)`: append [B, n_kv, T, head_dim] and
    return everything held, [B, n_kv, offset, head_dim].
Layers apply RoPE with `offset=cache.offset` BEFORE calling `update_and_fetch`.
"""

from __future__ import annotations

import mlx.core as mx

from framecast.kernels.dequantize_kv import dequantize_kv
from framecast.kernels.rope_shift import rope_shift

DEFAULT_STEP = 256  # tokens added per growth; one frame (64-ish tokens) rarely triggers it


class OffsetCache:
    """What every preallocated cache does by its `offset` alone: trim, empty."""

    offset: int

    def trim(self, n: int) -> int:
        """Forget the last `n` tokens (the buffer is kept); returns how many were dropped."""
        n = max(0, min(self.offset, n))
        self.offset -= n
        return n

    def is_trimmable(self) -> bool:
        return True

    def empty(self) -> bool:
        return self.offset == 0


class KVCache(OffsetCache):
    """Preallocated per-layer key/value buffer that grows in steps along T."""

    def __init__(self, *, step: int = DEFAULT_STEP, capacity: int = 0, growth: float = 1.0):
        if step < 1:
            raise ValueError(f"KVCache step must be >= 1, got {step}")
        if growth < 1.0:
            raise ValueError(f"KVCache growth must be >= 1, got {growth}")
        self.step = step
        self.growth = growth  # each growth reaches at least capacity * growth
        self.keys: mx.array | None = None  # [B, n_kv, capacity, head_dim]
        self.values: mx.array | None = None  # [B, n_kv, capacity, head_dim_v]
        self.offset = 0
        self._reserved = max(0, int(capacity))  # tokens the first allocation makes room for

    # -- core -------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        """Make room for `needed` tokens in total, rounding capacity up to whole steps; a
        reservation that covers them is allocated exactly (a budget in MB may use all of it)."""
        B, n_kv, _, k_dim = keys.shape
        v_dim = values.shape[3]
        if needed <= self._reserved:
            new_capacity = self._reserved
        else:
            needed = max(needed, int(self.capacity * self.growth))
            new_capacity = ((needed + self.step - 1) // self.step) * self.step
        extra = new_capacity - (0 if self.keys is None else self.offset)
        k_new = mx.zeros((B, n_kv, extra, k_dim), dtype=keys.dtype)
        v_new = mx.zeros((B, n_kv, extra, v_dim), dtype=values.dtype)
        if self.keys is None:
            self.keys, self.values = k_new, v_new
        else:
            # Drop the unused tail first (it may hold trimmed tokens), then extend.
            held_k = self.keys[..., : self.offset, :]
            held_v = self.values[..., : self.offset, :]
            self.keys = mx.concatenate([held_k, k_new], axis=2)
            self.values = mx.concatenate([held_v, v_new], axis=2)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        # keys: [B, n_kv, T, head_dim], values: [B, n_kv, T, head_dim_v]
        start = self.offset
        end = start + keys.shape[2]
        if self.keys is None or end > self.keys.shape[2]:
            self._grow(keys, values, end)
        self.keys[..., start:end, :] = keys
        self.values[..., start:end, :] = values
        self.offset = end
        # [B, n_kv, offset, head_dim]
        return self.keys[..., :end, :], self.values[..., :end, :]

    def reserve(self, tokens: int) -> None:
        """Make room for exactly `tokens` in total now (or at the first write when nothing is
        allocated yet): later appends up to that count never grow or copy."""
        self._reserved = max(self._reserved, int(tokens))
        if self.keys is not None and self.capacity < tokens:
            held_k, held_v = self.keys[..., : self.offset, :], self.values[..., : self.offset, :]
            self._grow(held_k, held_v, tokens)

    @property
    def buffers(self) -> tuple[mx.array, mx.array] | None:
        """The whole (keys, values) buffers [B, n_kv, capacity, D]; the first `offset` rows are
        live. Attention kernels read them in place (`framecast.kernels.cache_attention`)."""
        if self.keys is None:
            return None
        return self.keys, self.values

    # -- editing ----------------------------------------------------------------------------

    def evict(self, spans, *, rope) -> int:
        """Drop token ranges `spans` ([(start, end), ...]) and close the gaps.

        Keys after a dropped range are re-rotated by minus the number of tokens dropped
        before them (`rope`: a `framecast.kernels.rope_shift.RopeSpec`), so RoPE positions stay
        contiguous 0..offset-1. The buffer is reused (memory stays flat); returns the count.
        """
        moves = eviction_moves(self.keys, self.values, self.offset, spans, rope=rope)
        if moves is None:
            return 0
        first, end, moved_k, moved_v = moves
        self.keys[..., first:end, :] = moved_k
        self.values[..., first:end, :] = moved_v
        removed = self.offset - end
        self.offset = end
        return removed

    # -- save / restore ---------------------------------------------------------------------

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        """(keys, values) actually held, each [B, n_kv, offset, head_dim]; () when empty."""
        if self.keys is None or self.offset == 0:
            return ()
        # Slices are new array objects: later in-place writes to the buffer never reach them.
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @state.setter
    def state(self, state) -> None:
        if not state:
            self.keys = self.values = None
            self.offset = 0
            return
        keys, values = state
        # Fresh array objects (slices), so in-place appends never write into the caller's
        # arrays; capacity == offset until the next append grows it in steps again.
        self.keys, self.values = keys[..., :, :], values[..., :, :]
        self.offset = keys.shape[2]

    @classmethod
    def from_state(cls, state, *, step: int = DEFAULT_STEP) -> KVCache:
        cache = cls(step=step)
        cache.state = state
        return cache

    @property
    def nbytes(self) -> int:
        """Bytes allocated by the buffers (capacity, not just the tokens held)."""
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes

    def __repr__(self) -> str:
        return f"{type(self).__name__}(offset={self.offset}, capacity={self.capacity})"


def make_prompt_cache(model, *, step: int = DEFAULT_STEP) -> list:
    """One cache per layer: the model's own `make_cache()` when it has one."""
    if hasattr(model, "make_cache"):
        return model.make_cache()
    return [KVCache(step=step) for _ in model.layers]


def cache_offset(cache: list) -> int:
    """Tokens held by a per-layer cache list (all layers hold the same count)."""
    return cache[0].offset if cache else 0


def trim_prompt_cache(cache: list, n: int) -> int:
    """Drop the last `n` tokens from every layer; returns how many were dropped."""
    return min((c.trim(n) for c in cache), default=0)


def cache_nbytes(cache: list) -> int:
    return sum(c.nbytes for c in cache)


# ---------------------------------------------------------------- eviction and quantisation
# (added by the streaming-session work: sinks + sliding window, KV quantisation)


def eviction_plan(spans, offset: int):
    """What `evict(spans)` moves: None if nothing to drop, else
    (first, keep [n] int32 indices relative to `first`, shift [n] int32 = -dropped before).

    `first` is the start of the earliest dropped range: tokens before it never move.
    """
    ranges = sorted((max(0, int(a)), min(offset, int(b))) for a, b in spans)
    ranges = [(a, b) for a, b in ranges if b > a]
    if not ranges:
        return None
    first = ranges[0][0]
    keep, shift, dropped, pos = [], [], 0, first
    for a, b in ranges:
        a = max(a, pos)
        if b <= a:
            continue
        keep.extend(range(pos - first, a - first))
        shift.extend([-dropped] * (a - pos))
        dropped += b - a
        pos = b
    keep.extend(range(pos - first, offset - first))
    shift.extend([-dropped] * (offset - pos))
    return first, mx.array(keep, dtype=mx.int32), mx.array(shift, dtype=mx.int32)


def eviction_moves(keys: mx.array, values: mx.array, offset: int, spans, *, rope):
    """What evicting `spans` writes back into buffers keys/values [B, n_kv, capacity, D] that
    hold `offset` tokens: None if nothing is dropped, else (first, end, keys, values) with the
    kept tokens' keys re-rotated, to be written at first:end (`KVCache.evict`)."""
    plan = eviction_plan(spans, offset)
    if plan is None:
        return None
    first, keep, shift = plan
    # Gather + re-rotate the kept keys in one pass (`index` fuses the take into the kernel).
    moved_k = rope_shift(keys, shift, rope, index=keep + first)
    moved_v = mx.take(values[..., first:offset, :], keep, axis=2)
    return first, first + keep.shape[0], moved_k, moved_v


def evict_prompt_cache(cache: list, spans, *, rope) -> int:
    """Drop the same token ranges from every layer; returns how many were dropped."""
    return min((c.evict(spans, rope=rope) for c in cache), default=0)


QUANT_GROUP_SIZES = (128, 64, 32)  # what mx.quantize supports, largest first


class QuantizedKVCache(OffsetCache):
    """KVCache whose buffers hold `bits`-bit affine-quantised keys/values (mx.quantize groups
    along head_dim), same protocol as `KVCache`.

    `update_and_fetch` returns the whole cache dequantised to the input dtype, so the layers'
    attention code stays unchanged: memory at rest shrinks ~3.6x (8-bit) / ~6.4x (4-bit) vs
    fp32-from-bf16 accounting, at the cost of a dequantise pass over the cache per layer per
    step (one layer's copy alive at a time). Eviction dequantises, re-rotates and
    re-quantises only the keys that move; values are moved as stored (no new error).
    """

    def __init__(self, *, bits: int = 8, group_size: int | None = None, step: int = DEFAULT_STEP):
        if bits not in (4, 8):
            raise ValueError(f"QuantizedKVCache bits must be 4 or 8, got {bits}")
        self.bits = bits
        self.group_size = group_size
        self.step = step
        self.keys: tuple | None = None  # (packed [B,n_kv,cap,D*bits/32], scales, biases [B,n_kv,cap,D/g])
        self.values: tuple | None = None
        self.offset = 0
        self.dtype = mx.float32

    def _group(self, dim: int) -> int:
        if self.group_size is None:
            for g in QUANT_GROUP_SIZES:
                if dim % g == 0:
                    self.group_size = g
                    break
            else:
                raise ValueError(f"KV quantisation needs head_dim divisible by 32, got {dim}")
        return self.group_size

    def _quant(self, x: mx.array) -> tuple:
        return tuple(mx.quantize(x, group_size=self._group(x.shape[-1]), bits=self.bits))

    def _dequant(self, q: tuple, end: int, start: int = 0) -> mx.array:
        parts = [t[..., start:end, :] for t in q]
        return mx.dequantize(*parts, group_size=self.group_size, bits=self.bits).astype(self.dtype)

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys[0].shape[2]

    def _grow(self, qk: tuple, qv: tuple, needed: int) -> None:
        new_capacity = ((needed + self.step - 1) // self.step) * self.step

        def grown(old: tuple | None, new: tuple) -> tuple:
            out = []
            for i, t in enumerate(new):
                B, H, _, W = t.shape
                held = 0 if old is None else self.offset
                pad = mx.zeros((B, H, new_capacity - held, W), dtype=t.dtype)
                out.append(pad if old is None else mx.concatenate([old[i][..., :held, :], pad], axis=2))
            return tuple(out)

        self.keys, self.values = grown(self.keys, qk), grown(self.values, qv)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        # keys/values: [B, n_kv, T, head_dim] -> everything held, dequantised, same shape rule
        self.dtype = keys.dtype
        qk, qv = self._quant(keys), self._quant(values)
        start, end = self.offset, self.offset + keys.shape[2]
        if self.keys is None or end > self.capacity:
            self._grow(qk, qv, end)
        for buf, new in ((self.keys, qk), (self.values, qv)):
            for t, n in zip(buf, new):
                t[..., start:end, :] = n
        self.offset = end
        # Both halves straight from the strided buffers in one pass (see kernels/dequantize_kv.py).
        return dequantize_kv(self.keys, self.values, end=end, bits=self.bits, group_size=self.group_size,
                             dtype=self.dtype)

    def evict(self, spans, *, rope) -> int:
        plan = eviction_plan(spans, self.offset)
        if plan is None:
            return 0
        first, keep, shift = plan
        end = first + keep.shape[0]
        new_k = self._quant(rope_shift(self._dequant(self.keys, self.offset, first), shift, rope, index=keep))
        for t, n in zip(self.keys, new_k):
            t[..., first:end, :] = n
        for t in self.values:
            t[..., first:end, :] = mx.take(t[..., first : self.offset, :], keep, axis=2)
        removed = self.offset - end
        self.offset = end
        return removed

    @property
    def state(self) -> tuple:
        """(k_packed, k_scales, k_biases, v_packed, v_scales, v_biases) held; () when empty."""
        if self.keys is None or self.offset == 0:
            return ()
        return tuple(t[..., : self.offset, :] for t in (*self.keys, *self.values))

    @state.setter
    def state(self, state) -> None:
        if not state:
            self.keys = self.values = None
            self.offset = 0
            return
        arrays = [t[..., :, :] for t in state]
        self.keys, self.values = tuple(arrays[:3]), tuple(arrays[3:])
        self.offset = arrays[0].shape[2]
        head_dim = arrays[0].shape[-1] * 32 // self.bits  # packed width -> head_dim
        self.group_size = head_dim // arrays[1].shape[-1]
        self.dtype = arrays[1].dtype  # scales keep the dtype the keys arrived in

    @classmethod
    def from_state(cls, state, *, bits: int, step: int = DEFAULT_STEP) -> QuantizedKVCache:
        cache = cls(bits=bits, step=step)
        cache.state = state
        return cache

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(t.nbytes for t in (*self.keys, *self.values))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bits={self.bits}, offset={self.offset}, capacity={self.capacity})"
