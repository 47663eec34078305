"""KVCache: growth in steps, trim, save/restore, byte accounting."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from framecast.model.cache import (
    KVCache,
    cache_nbytes,
    cache_offset,
    make_prompt_cache,
    trim_prompt_cache,
)

B, N_KV, HEAD_DIM = 1, 2, 8


def _kv(t: int, seed: int) -> tuple[mx.array, mx.array]:
    rng = np.random.default_rng(seed)
    k = mx.array(rng.standard_normal((B, N_KV, t, HEAD_DIM)).astype(np.float32))
    v = mx.array(rng.standard_normal((B, N_KV, t, HEAD_DIM)).astype(np.float32))
    return k, v


def _assert_equal(a: mx.array, b: mx.array) -> None:
    assert a.shape == b.shape
    np.testing.assert_array_equal(np.array(a), np.array(b))


def test_grows_in_steps_and_returns_everything_held():
    cache = KVCache(step=16)
    chunks = [_kv(t, seed) for seed, t in enumerate([5, 11, 1, 1, 20])]
    capacities = []
    for k, v in chunks:
        keys, values = cache.update_and_fetch(k, v)
        capacities.append(cache.capacity)
        assert keys.shape == (B, N_KV, cache.offset, HEAD_DIM)
        assert values.shape == keys.shape
    # 5 -> 16, 16 -> 16, 17 -> 32, 18 -> 32, 38 -> 48
    assert capacities == [16, 16, 32, 32, 48]
    assert cache.offset == 38
    _assert_equal(keys, mx.concatenate([k for k, _ in chunks], axis=2))
    _assert_equal(values, mx.concatenate([v for _, v in chunks], axis=2))


def test_single_token_decode_stays_in_one_buffer():
    cache = KVCache()  # default step 256
    cache.update_and_fetch(*_kv(64, 0))
    for i in range(100):
        cache.update_and_fetch(*_kv(1, i + 1))
    assert cache.offset == 164 and cache.capacity == 256


def test_trim_then_append_overwrites_the_dropped_tail():
    cache = KVCache(step=8)
    k1, v1 = _kv(6, 1)
    k2, v2 = _kv(4, 2)
    k3, v3 = _kv(3, 3)
    cache.update_and_fetch(k1, v1)
    cache.update_and_fetch(k2, v2)
    assert cache.trim(4) == 4 and cache.offset == 6
    assert cache.trim(100) == 6 and cache.offset == 0  # never below zero
    cache.update_and_fetch(k1, v1)
    keys, values = cache.update_and_fetch(k3, v3)
    _assert_equal(keys, mx.concatenate([k1, k3], axis=2))
    _assert_equal(values, mx.concatenate([v1, v3], axis=2))
    # Growing after a trim keeps only the held tokens.
    k4, v4 = _kv(10, 4)
    keys, _ = cache.update_and_fetch(k4, v4)
    _assert_equal(keys, mx.concatenate([k1, k3, k4], axis=2))
    assert cache.capacity == 24


def test_state_round_trip_is_independent_of_later_writes():
    cache = KVCache(step=8)
    k1, v1 = _kv(8, 1)  # exactly one full step: offset == capacity
    cache.update_and_fetch(k1, v1)
    saved = cache.state
    mx.eval(*saved)
    # Mutate the original after saving: the saved arrays must not change.
    cache.trim(3)
    cache.update_and_fetch(*_kv(3, 9))
    _assert_equal(saved[0], k1)
    _assert_equal(saved[1], v1)

    restored = KVCache.from_state(saved, step=8)
    assert restored.offset == 8
    restored.trim(2)
    k2, v2 = _kv(5, 2)
    keys, values = restored.update_and_fetch(k2, v2)
    _assert_equal(keys, mx.concatenate([k1[..., :6, :], k2], axis=2))
    _assert_equal(values, mx.concatenate([v1[..., :6, :], v2], axis=2))
    _assert_equal(saved[0], k1)  # restoring did not alias the caller's arrays

    assert KVCache().state == ()
    empty = KVCache.from_state(())
    assert empty.offset == 0 and empty.nbytes == 0


def test_nbytes_counts_allocated_capacity():
    cache = KVCache(step=32)
    assert cache.nbytes == 0
    cache.update_and_fetch(*_kv(3, 0))
    assert cache.nbytes == 2 * B * N_KV * 32 * HEAD_DIM * 4


def test_list_helpers():
    class _Model:
        layers = [None] * 3

    caches = make_prompt_cache(_Model(), step=8)
    assert len(caches) == 3 and cache_offset(caches) == 0
    for c in caches:
        c.update_and_fetch(*_kv(5, 0))
    assert cache_offset(caches) == 5
    assert trim_prompt_cache(caches, 2) == 2 and cache_offset(caches) == 3
    assert cache_nbytes(caches) == 3 * caches[0].nbytes


def test_rejects_bad_step():
    with pytest.raises(ValueError):
        KVCache(step=0)
