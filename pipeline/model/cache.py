"""Key/value caches for the language models.

`KVCache` is a gpt-fast style preallocated buffer per layer: keys and values live in arrays of
shape [B, n_kv, capacity, head_dim] that grow along T in whole steps (default 256 tokens), so
streaming decode writes one token into existing memory instead of concatenating every step.

Protocol the models rely on (duck-typed: the session may pass other cache classes):
  - `offset`: tokens held, which is also the RoPE position of the next token;
  - `update_and_fetch(keys, values) -> (keys, values)`: append [B, n_kv, T, head_dim] and
    return everything held, [B, n_kv, offset, head_dim].
Layers apply RoPE with `offset=cache.offset` BEFORE calling `update_and_fetch`.
"""

from __future__ import annotations

import mlx.core as mx

DEFAULT_STEP = 256  # tokens added per growth; one frame (64-ish tokens) rarely triggers it


class KVCache:
    """Preallocated per-layer key/value buffer that grows in steps along T."""

    def __init__(self, *, step: int = DEFAULT_STEP):
        if step < 1:
            raise ValueError(f"KVCache step must be >= 1, got {step}")
        self.step = step
        self.keys: mx.array | None = None  # [B, n_kv, capacity, head_dim]
        self.values: mx.array | None = None  # [B, n_kv, capacity, head_dim_v]
        self.offset = 0

    # -- core -------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        """Make room for `needed` tokens in total, rounding capacity up to whole steps."""
        B, n_kv, _, k_dim = keys.shape
        v_dim = values.shape[3]
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

    # -- editing ----------------------------------------------------------------------------

    def trim(self, n: int) -> int:
        """Forget the last `n` tokens (the buffer is kept); returns how many were dropped."""
        n = max(0, min(self.offset, n))
        self.offset -= n
        return n

    def is_trimmable(self) -> bool:
        return True

    def empty(self) -> bool:
        return self.offset == 0

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
