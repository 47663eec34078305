"""Streaming session: KV eviction with RoPE re-rotation, KV quantisation, and the session itself
(streaming == one-shot, bounded memory, save/restore, questions from cached context)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from pipeline.kernels.rope_shift import RopeSpec, probe_rope, rope_shift, rope_shift_reference
from pipeline.model.cache import KVCache, QuantizedKVCache, eviction_plan
from pipeline.model.lm.base import make_rope

HEAD_DIM = 64


def _normal(shape, seed):
    return mx.array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


# ---------------------------------------------------------------- RoPE shift


@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 1024},
])
def test_probe_reads_the_layer_rope_and_shift_matches_it(scaling):
    rope = make_rope(HEAD_DIM, base=1e6, scaling=scaling)
    spec = probe_rope(rope, HEAD_DIM)
    assert spec.dims == HEAD_DIM and not spec.traditional
    x = _normal((1, 2, 6, HEAD_DIM), 0)
    for start, shift in [(700, -650), (5, 3000), (40_000, -39_990)]:
        direct = rope(x, offset=start + shift)
        moved = rope_shift(rope(x, offset=start), mx.full((6,), shift, dtype=mx.int32), spec)
        # fp32 RoPE itself is only this exact at large positions (angle ulp ~ pos * 6e-8)
        tol = 1e-5 + 1e-7 * (start + abs(shift))
        assert float(mx.abs(direct - moved).max()) < tol, (start, shift)


def test_probe_finds_interleaved_and_partial_rotary_layouts():
    for traditional, dims in [(True, 64), (True, 32), (False, 32)]:
        def rope(x, offset, _t=traditional, _d=dims):
            return mx.fast.rope(x, _d, traditional=_t, base=1e4, scale=1.0, offset=offset)
        spec = probe_rope(rope, HEAD_DIM)
        ref = RopeSpec.from_base(dims, base=1e4, traditional=traditional)
        assert (spec.traditional, spec.dims) == (traditional, dims)
        assert float(mx.abs(spec.inv_freq - ref.inv_freq).max()) < 1e-7


def test_probe_refuses_a_position_dependent_function():
    def not_rope(x, offset):
        return x * (1.0 + 1e-2 * offset)
    with pytest.raises(ValueError):
        probe_rope(not_rope, HEAD_DIM)


def test_zero_shift_is_exact_identity():
    x = _normal((1, 2, 5, HEAD_DIM), 1)
    spec = RopeSpec.from_base(HEAD_DIM, base=1e4)
    out = rope_shift_reference(x, mx.zeros((5,), dtype=mx.int32), spec)
    np.testing.assert_array_equal(np.array(out), np.array(x))


# ---------------------------------------------------------------- cache eviction


def test_eviction_plan_merges_and_shifts():
    first, keep, shift = eviction_plan([(8, 10), (2, 4), (3, 5)], 12)
    assert first == 2
    assert keep.tolist() == [3, 4, 5, 10, 11][:0] + [3, 4, 5, 8, 9]  # kept 5,6,7,10,11
    assert shift.tolist() == [-3, -3, -3, -5, -5]
    assert eviction_plan([(20, 30)], 12) is None


def _filled(cache, rope, pre_k, v, chunks):
    pos = 0
    for n in chunks:
        cache.update_and_fetch(rope(pre_k[:, :, pos:pos + n], offset=pos), v[:, :, pos:pos + n])
        pos += n
    return cache


@pytest.mark.parametrize("make_cache,tol", [
    (lambda: KVCache(step=16), 1e-5),
    (lambda: QuantizedKVCache(bits=8, step=16), 0.05),
])
def test_evict_keeps_positions_contiguous(make_cache, tol):
    rope = make_rope(HEAD_DIM, base=1e6)
    spec = probe_rope(rope, HEAD_DIM)
    pre_k, v = _normal((1, 2, 60, HEAD_DIM), 2), _normal((1, 2, 60, HEAD_DIM), 3)
    cache = _filled(make_cache(), rope, pre_k, v, [30, 1, 1, 28])
    capacity = cache.capacity
    removed = cache.evict([(6, 12), (20, 31)], rope=spec)
    kept = [*range(6), *range(12, 20), *range(31, 60)]
    assert removed == 17 and cache.offset == len(kept)
    assert cache.capacity == capacity  # the buffer is reused: memory stays flat
    # The cache now equals a fresh fill of the kept tokens at positions 0..offset-1.
    keys, values = cache.update_and_fetch(mx.zeros((1, 2, 0, HEAD_DIM)), mx.zeros((1, 2, 0, HEAD_DIM)))
    assert float(mx.abs(keys - rope(pre_k[:, :, kept], offset=0)).max()) < tol
    assert float(mx.abs(values - v[:, :, kept]).max()) < tol
    # and it keeps working: the next token lands at position offset
    nxt = _normal((1, 2, 1, HEAD_DIM), 4)
    keys, _ = cache.update_and_fetch(rope(nxt, offset=cache.offset), nxt)
    assert keys.shape[2] == len(kept) + 1


# ---------------------------------------------------------------- KV quantisation


@pytest.mark.parametrize("bits,max_rel_rms", [(8, 0.01), (4, 0.15)])
def test_quantized_cache_error_is_bounded_and_state_round_trips(bits, max_rel_rms):
    k, v = _normal((1, 2, 40, HEAD_DIM), 5), _normal((1, 2, 40, HEAD_DIM), 6)
    cache = QuantizedKVCache(bits=bits)
    cache.update_and_fetch(k[:, :, :25], v[:, :, :25])
    keys, values = cache.update_and_fetch(k[:, :, 25:], v[:, :, 25:])
    rel = float(mx.sqrt(mx.mean((keys - k) ** 2)) / mx.sqrt(mx.mean(k**2)))
    assert rel < max_rel_rms
    full = KVCache()
    full.update_and_fetch(k, v)
    assert cache.nbytes < full.nbytes * (0.35 if bits == 8 else 0.2)
    restored = QuantizedKVCache.from_state(cache.state, bits=bits)
    again, _ = restored.update_and_fetch(mx.zeros((1, 2, 0, HEAD_DIM)), mx.zeros((1, 2, 0, HEAD_DIM)))
    np.testing.assert_array_equal(np.array(again), np.array(keys))
    assert restored.trim(5) == 5 and restored.offset == 35
