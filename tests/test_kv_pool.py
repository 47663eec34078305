"""Session caches as rows of shared buffers (issue 15, `framecast.model.kv_pool`): the cache
protocol as KVCache keeps it, one batched RoPE + cache write + attention for rows of different
lengths equal to row-by-row attention, sessions on pooled rows narrating as sessions with caches
of their own (batched prefill and decode, eviction), and the rows' lifecycle."""

from __future__ import annotations

import asyncio

import mlx.core as mx
import numpy as np
import pytest

from framecast.engine.core import SessionCore
from framecast.model.cache import KVCache
from framecast.model.kv_pool import KVPoolSet, PooledKVCache, attend_rows
from framecast.model.lm.base import RoPE
from framecast.testing import make_tiny_minicpmv, random_image


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from framecast.model.load import load_model

    d = tmp_path_factory.mktemp("tiny-2.6")
    make_tiny_minicpmv(d, "2.6")
    return load_model(str(d))


def _kv(rng, t, h=2, d=16):
    return (mx.array(rng.standard_normal((1, h, t, d)).astype(np.float32)),
            mx.array(rng.standard_normal((1, h, t, d)).astype(np.float32)))


def _same(a, b, tol=1e-5):
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=tol, atol=tol)


def test_pooled_cache_keeps_the_kvcache_protocol(tiny):
    """Appends, trim, eviction with re-rotation and state round trips: a pooled row holds
    what a KVCache given the same calls holds; the other rows are untouched."""
    from framecast.kernels.rope_shift import probe_rope

    attn = tiny.language_model.layers[0].self_attn
    spec = probe_rope(attn.rope, attn.head_dim)
    rng = np.random.default_rng(0)
    pools = KVPoolSet(1, rows=3, capacity=64)
    neighbour = pools.acquire(64)[0]
    pooled, own = pools.acquire(40)[0], KVCache()
    assert pooled.row == 1 and pools.free_rows == 1
    neighbour.update_and_fetch(*_kv(rng, 9))
    before = np.array(neighbour.state[0])
    for t in (5, 7, 1):
        kv = _kv(rng, t)
        for c in (pooled, own):
            got = c.update_and_fetch(*kv)
        assert got[0].shape == (1, 2, pooled.offset, 16)
    for a, b in zip(pooled.state, own.state):
        _same(a, b)
    assert pooled.trim(3) == own.trim(3) == 3
    assert pooled.evict([(2, 4), (6, 8)], rope=spec) == own.evict([(2, 4), (6, 8)], rope=spec) == 4
    for a, b in zip(pooled.state, own.state):
        _same(a, b)
    restored = pools.acquire(64)[0]
    restored.state = own.state
    for a, b in zip(restored.state, own.state):
        _same(a, b)
    _same(neighbour.state[0], before)  # writes never leave their row
    with pytest.raises(ValueError, match="65 tokens in a row of 64"):
        restored.update_and_fetch(*_kv(rng, 65 - restored.offset))
    assert pooled.nbytes == pools.layers[0].keys.nbytes * 2 // 3


@pytest.mark.parametrize("rows,tq", [([0, 1, 2], 4), ([2, 0], 1), ([3, 1], 6)])
def test_batched_rows_attend_as_each_row_alone(rows, tq):
    """Rows at different lengths (in any order, with rows of the span not in the batch) get the
    attention each row's own cache gives it, causal inside the new block; GQA (4 query heads on
    2 KV heads); the new keys land rotated in each row at its own offset."""
    rng = np.random.default_rng(1)
    rope = RoPE(16, base=10000.0)
    pools = KVPoolSet(1, rows=4, capacity=96)
    pooled = [pools.acquire(96)[0] for _ in range(4)]
    own = {r: KVCache() for r in rows}
    for r in range(4):  # history of a different length per row
        kv = _kv(rng, 3 + 7 * r)
        pooled[r].update_and_fetch(*kv)
        if r in own:
            own[r].update_and_fetch(*kv)
    q = mx.array(rng.standard_normal((len(rows), 4, tq, 16)).astype(np.float32))
    k = mx.array(rng.standard_normal((len(rows), 2, tq, 16)).astype(np.float32))
    v = mx.array(rng.standard_normal((len(rows), 2, tq, 16)).astype(np.float32))
    out = attend_rows(q, k, v, [pooled[r] for r in rows], rope, scale=0.25)
    for b, r in enumerate(rows):
        c = own[r]
        qb, kb = rope(q[b:b + 1], offset=c.offset), rope(k[b:b + 1], offset=c.offset)
        keys, values = c.update_and_fetch(kb, v[b:b + 1])
        ref = mx.fast.scaled_dot_product_attention(qb, keys, values, scale=0.25, mask="causal" if tq > 1 else None)
        _same(out[b:b + 1], ref, 1e-4)
        assert pooled[r].offset == c.offset
        for a, o in zip(pooled[r].state, c.state):
            _same(a, o)


async def _narrate(session, prompt="Describe it.", max_tokens=8) -> str:
    from framecast.engine.session import TurnDone

    async for ev in session.narrate(prompt, max_tokens=max_tokens):
        if isinstance(ev, TurnDone):
            return ev.text


@pytest.mark.parametrize("budget", [600, 150])  # 150: the window evicts as frames come
def test_pooled_sessions_narrate_as_sessions_with_caches_of_their_own(tiny, monkeypatch, budget):
    """Three streams: frames appended in batched ticks and narrations decoded as one batch,
    sessions on pooled rows against the same run with their own caches: the same texts, the same
    cache offsets; the batched rows went through one attention per layer."""
    import framecast.model.lm.base as base
    from framecast.engine.scheduler import BatchDecode, BatchPrefill
    from framecast.engine.session import StreamingSession
    from framecast.engine.worker import worker_for

    calls = []
    real = base.attend_rows
    monkeypatch.setattr(base, "attend_rows", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    worker = worker_for(tiny)  # MLX work on the model's thread only (arrays made there too)
    feats = worker.submit_sync(tiny.encode_images, [random_image(56, 56, seed=s) for s in range(5)]).result()

    async def run(pool):
        prefill, decode = BatchPrefill(tiny, worker=worker), BatchDecode(tiny)
        sessions = [StreamingSession(tiny, worker=worker, prefill=prefill, decode=decode, kv_pool=pool,
                                     max_cache_tokens=budget, sink_tokens=20) for _ in range(3)]
        await sessions[2].add_frame(feats[4], 0.0)  # one stream ahead of the others
        texts = []
        for tick in range(4):
            await asyncio.gather(*(s.add_frame(feats[(tick + i) % 4], 1.0 + tick) for i, s in enumerate(sessions)))
            if tick % 2:
                texts.append(await asyncio.gather(*(_narrate(s) for s in sessions)))
        return texts, [s.core.offset for s in sessions], [s.core.evicted_total for s in sessions]

    pool = KVPoolSet(len(tiny.language_model.layers), rows=3, capacity=budget)
    own = asyncio.run(run(None))
    assert not calls
    pooled = asyncio.run(run(pool))
    assert pooled == own
    assert calls and max(calls) == 3  # three rows, one attention per layer
    assert (budget == 150) == (own[2][0] > 0)  # the small budget evicted


def test_rows_are_given_back_and_sessions_that_do_not_fit_keep_their_own(tiny, tmp_path):
    pool = KVPoolSet(len(tiny.language_model.layers), rows=2, capacity=300)
    a, b, c = (SessionCore(tiny, kv_pool=pool, max_cache_tokens=300) for _ in range(3))
    big = SessionCore(tiny, kv_pool=pool, max_cache_tokens=301)
    unbounded = SessionCore(tiny, kv_pool=pool)
    in_mb = SessionCore(tiny, kv_pool=pool, max_cache_tokens=200, max_cache_mb=50)
    for s in (a, b, c, big, unbounded, in_mb):
        s.start()
    assert [type(s.cache[0]) for s in (a, b, c)] == [PooledKVCache, PooledKVCache, KVCache]  # two rows
    assert all(type(s.cache[0]) is KVCache for s in (big, unbounded, in_mb))
    a.reset()  # its row is given back, then taken again
    assert a.cache[0].row == 0 and pool.free_rows == 0
    (feat,) = tiny.encode_images([random_image(56, 56, seed=9)], max_slice_nums=1)
    b.add_features(feat, 0.0)
    path = b.save(tmp_path / "b.fcs")
    c.load(path)  # no row free: the loaded cache is its own
    assert type(c.cache[0]) is KVCache and c.offset == b.offset
    b.load(path)  # a pooled session loads into its own row (as a resumed stream of a run does)
    assert type(b.cache[0]) is PooledKVCache and b.cache[0].row == 1 and pool.free_rows == 0
    assert b.offset == c.offset and np.array_equal(np.array(b.cache[1].state[1]), np.array(c.cache[1].state[1]))
    # a saved session longer than a row (a smaller budget now) loads into a cache of its own, and
    # the row it had is given back; the budget evicts it down at the next frame
    for k in range(3):
        b.add_features(feat, 1.0 + k)
    long_path = b.save(tmp_path / "long.fcs")
    assert b.offset > 120
    big_state = SessionCore(tiny, kv_pool=KVPoolSet(len(tiny.language_model.layers), rows=1, capacity=120),
                            max_cache_tokens=120)
    big_state.start()
    big_state.load(long_path)
    assert type(big_state.cache[0]) is KVCache and big_state.kv_pool.free_rows == 1
    big_state.add_features(feat, 9.0)
    assert big_state.offset <= 120 and big_state.evicted_total > 0


def test_kv_pool_for_a_run(tmp_path):
    from framecast.config import load_config, stream_configs
    from framecast.stages.multi import kv_pool_for

    class Model:
        session_defaults = {"max_cache_tokens": 512}

        class language_model:  # noqa: N801 - the attribute the function reads
            layers = [0] * 3

    def configs(streams):
        return stream_configs(load_config(None, {"streams": streams}, env=False))

    pool = kv_pool_for(Model, configs([{"id": "a"}, {"id": "b", "session": {"max_cache_tokens": 800}},
                                       {"id": "c", "session": {"kv_bits": 8}}]))
    assert (pool.rows, pool.capacity, len(pool.layers)) == (2, 800, 3)  # the quantised stream keeps its own
    assert kv_pool_for(Model, configs([{"id": "a"}])) is None
    # one long budget does not make every row that long: it keeps its own cache
    pool = kv_pool_for(Model, configs([{"id": "a"}, {"id": "b"}, {"id": "c", "session": {"max_cache_tokens": 60000}}]))
    assert (pool.rows, pool.capacity) == (2, 512)
    pool = kv_pool_for(Model, configs([{"id": "a"}, {"id": "b", "session": {"max_cache_tokens": 600}}]))
    assert (pool.rows, pool.capacity) == (2, 600)  # 1,200 tokens for 1,112 of budgets: both pooled
    assert kv_pool_for(Model, configs([{"id": "a"}, {"id": "b", "session": {"max_cache_mb": 10}}])) is None
