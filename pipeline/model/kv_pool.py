"""Session caches that share one buffer per layer, one row each (issue 15).

With several streams on one model, a tick's frames (and the narrations' decode steps) run as
rows of one batched forward. With a cache of its own per session, everything that touches a
cache (RoPE at that session's offset, the cache write, the attention) still ran once per row:
36 layers x ~10 small kernels x 16 streams, which cost more than the batched matmuls saved.
Here the sessions of a run share, per layer, one buffer `[rows, n_kv, capacity, head_dim]`
(like a batch slot in gpt-fast's static cache); a session's cache is a row of it. A batch of
rows then takes RoPE with per-row offsets, one scatter for the cache write and one masked
attention over the rows' buffers (`Attention.attend`, `attend_rows` below), whatever lengths
the sessions have reached.

`PooledKVCache` keeps the cache protocol of `framecast.model.cache.KVCache` (`offset`,
`update_and_fetch`, `buffers`, `trim`, `evict`, `state`), so a lone session (a question, a
closing narration) runs exactly as before on its row. The pool is sized from the sessions'
token budget (`capacity`): a session without one, with a bigger one or with a quantised cache
keeps caches of its own (`KVPoolSet.acquire` returns None when no row fits).
"""

from __future__ import annotations


import mlx.core as mx

from framecast.kernels import gpu
from framecast.kernels.cache_attention import BUCKET_TOKENS, reference, rows_causal_bias
from framecast.model.cache import OffsetCache, eviction_moves


class KVPool:
    """One layer's keys and values of up to `rows` sessions: [rows, n_kv, capacity, head_dim]
    each, allocated at the first write (its shape and dtype come from the keys written)."""

    def __init__(self, rows: int, capacity: int):
        self.rows = rows
        self.capacity = capacity
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    def allocate(self, keys: mx.array, values: mx.array) -> None:
        if self.keys is None:
            _, n_kv, _, k_dim = keys.shape
            self.keys = mx.zeros((self.rows, n_kv, self.capacity, k_dim), dtype=keys.dtype)
            self.values = mx.zeros((self.rows, n_kv, self.capacity, values.shape[3]), dtype=values.dtype)


class PooledKVCache(OffsetCache):
    """One session's cache for one layer: row `row` of a `KVPool` (the KVCache protocol)."""

    def __init__(self, pool: KVPool, row: int):
        self.pool = pool
        self.row = row
        self.offset = 0

    @property
    def capacity(self) -> int:
        return self.pool.capacity

    def _check_room(self, end: int) -> None:
        if end > self.pool.capacity:  # the session's budget keeps it below; this is a bug guard
            raise ValueError(f"pooled KV cache: {end} tokens in a row of {self.pool.capacity}")

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        # keys: [1, n_kv, T, head_dim] -> everything held, [1, n_kv, offset, head_dim]
        start, end = self.offset, self.offset + keys.shape[2]
        self._check_room(end)
        pool, r = self.pool, self.row
        pool.allocate(keys, values)
        pool.keys[r:r + 1, :, start:end, :] = keys
        pool.values[r:r + 1, :, start:end, :] = values
        self.offset = end
        return pool.keys[r:r + 1, :, :end, :], pool.values[r:r + 1, :, :end, :]

    def reserve(self, tokens: int) -> None:
        """The row is allocated whole with the pool; a budget above it is a bug (see acquire)."""
        self._check_room(tokens)

    @property
    def buffers(self) -> tuple[mx.array, mx.array] | None:
        """This row's whole buffers [1, n_kv, capacity, D]; the first `offset` rows are live."""
        if self.pool.keys is None:
            return None
        r = self.row
        return self.pool.keys[r:r + 1], self.pool.values[r:r + 1]

    def evict(self, spans, *, rope) -> int:
        """Drop token ranges `spans` and close the gaps, re-rotating the keys moved (as
        `KVCache.evict`), inside this row; returns how many tokens were dropped."""
        if self.pool.keys is None:
            return 0
        moves = eviction_moves(*self.buffers, self.offset, spans, rope=rope)
        if moves is None:
            return 0
        first, end, moved_k, moved_v = moves
        r = self.row
        self.pool.keys[r:r + 1, :, first:end, :] = moved_k
        self.pool.values[r:r + 1, :, first:end, :] = moved_v
        removed = self.offset - end
        self.offset = end
        return removed

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        """(keys, values) held, each [1, n_kv, offset, head_dim]; () when empty."""
        if self.pool.keys is None or self.offset == 0:
            return ()
        r, n = self.row, self.offset
        return self.pool.keys[r:r + 1, :, :n, :], self.pool.values[r:r + 1, :, :n, :]

    @state.setter
    def state(self, state) -> None:
        if not state:
            self.offset = 0
            return
        keys, values = state
        self.offset = 0
        self.update_and_fetch(keys, values)

    @property
    def nbytes(self) -> int:
        """Bytes of this row (the pool holds `rows` of them)."""
        if self.pool.keys is None:
            return 0
        return (self.pool.keys.nbytes + self.pool.values.nbytes) // self.pool.rows

    def __repr__(self) -> str:
        return f"{type(self).__name__}(row={self.row}, offset={self.offset}, capacity={self.capacity})"


class KVPoolSet:
    """The pools of every layer of one model: `rows` sessions of at most `capacity` tokens."""

    def __init__(self, n_layers: int, *, rows: int, capacity: int):
        if rows < 1 or capacity < 1:
            raise ValueError(f"KVPoolSet needs rows >= 1 and capacity >= 1 (got {rows}, {capacity})")
        self.layers = [KVPool(rows, capacity) for _ in range(n_layers)]
        self.rows = rows
        self.capacity = capacity
        self._free = list(range(rows))

    @property
    def free_rows(self) -> int:
        return len(self._free)

    def acquire(self, budget_tokens: int | None) -> list[PooledKVCache] | None:
        """A free row as one cache per layer, or None: no row free, or a session whose token
        budget is unbounded or above the pool's capacity (it keeps caches of its own)."""
        if not self._free or budget_tokens is None or budget_tokens > self.capacity:
            return None
        row = self._free.pop(0)  # the lowest free row: a batch's rows stay close together
        return [PooledKVCache(pool, row) for pool in self.layers]

    def release(self, caches: list) -> None:
        """Give back the row of `caches` (from `acquire`); anything else is ignored."""
        if caches and isinstance(caches[0], PooledKVCache) and caches[0].pool is self.layers[0]:
            row = caches[0].row
            if row not in self._free:
                self._free.append(row)
                self._free.sort()
            for c in caches:
                c.offset = 0


# ---------------------------------------------------------------- batched rows

CPU_BUCKET = 64  # key lengths are rounded up to this where a new shape costs nothing (CPU, Metal)


def rows_bucket() -> int:
    """Key-length step of the batched attention: on CUDA a matmul of a new shape pays a set-up
    (issue 14), so lengths go up in BUCKET_TOKENS steps there, as `matmul_bucket` does; elsewhere
    a step of CPU_BUCKET keeps the work near the live keys."""
    return BUCKET_TOKENS if gpu() == "cuda" else CPU_BUCKET



def same_pool(caches: list) -> KVPool | None:
    """The pool every cache in `caches` is a row of (distinct rows), else None."""
    if not caches or not all(isinstance(c, PooledKVCache) for c in caches):
        return None
    pool = caches[0].pool
    if pool.keys is None or any(c.pool is not pool for c in caches) or len({c.row for c in caches}) < len(caches):
        return None
    return pool


def attend_rows(q: mx.array, k: mx.array, v: mx.array, caches: list[PooledKVCache], rope, *,
                scale: float) -> mx.array:
    """RoPE, cache write and attention of a batch whose row b continues `caches[b]` (rows of
    one pool): q [B, Hq, T, D], k/v [B, Hkv, T, D] (before RoPE) -> [B, Hq, T, D].

    One RoPE call with per-row offsets, one scatter per buffer, one matmul-softmax-matmul over
    the pool rows min..max of the batch cut at the next `rows_bucket()` boundary past the
    longest (the shapes change once per bucket, never per length; scores in q's dtype and
    softmax in fp32: `cache_attention.reference`), each row masked at its own length."""
    pool = caches[0].pool
    _, Hq, T, D = q.shape
    Hkv = k.shape[1]
    starts_list = [c.offset for c in caches]
    end = max(starts_list) + T
    for c in caches:
        c._check_room(c.offset + T)
    starts = mx.array(starts_list, dtype=mx.int32)  # [B]
    q = rope(q, offset=starts)
    k = rope(k, offset=starts)
    # One scatter per buffer: (row, kv head, position) index triples broadcast to [B, Hkv, T].
    rows = mx.array([c.row for c in caches], dtype=mx.int32)[:, None, None]  # [B, 1, 1]
    heads = mx.arange(Hkv, dtype=mx.int32)[None, :, None]  # [1, Hkv, 1]
    pos = (starts[:, None] + mx.arange(T, dtype=mx.int32)[None, :])[:, None, :]  # [B, 1, T]
    pool.keys[rows, heads, pos] = k  # k, v: [B, Hkv, T, D]
    pool.values[rows, heads, pos] = v
    for c in caches:
        c.offset += T
    lo = min(c.row for c in caches)
    hi = max(c.row for c in caches) + 1
    bucket = rows_bucket()
    length = min(-(-end // bucket) * bucket, pool.capacity)
    keys = pool.keys[lo:hi, :, :length]  # [R, Hkv, length, D]: a view of the rows, no gather
    values = pool.values[lo:hi, :, :length]
    rel = [c.row - lo for c in caches]
    R = hi - lo
    row_starts = [0] * R  # a row of the span not in this batch: a zero query at 0 (no copy of the cache)
    for i, s in zip(rel, starts_list):
        row_starts[i] = s
    spread = rel != list(range(R))
    if spread:
        q_rows = mx.zeros((R, Hq, T, D), dtype=q.dtype)
        q_rows[mx.array(rel, dtype=mx.int32)] = q
        q = q_rows
    # the same mask for every layer of this forward (cached by the rows' starts)
    bias = rows_causal_bias(tuple(row_starts), T, length, q.dtype)  # [R, 1, 1, T, length]
    out = reference(q, keys, values, scale=scale, n_keys=length, bias=bias)  # [R, Hq, T, D]
    return out[mx.array(rel, dtype=mx.int32)] if spread else out
