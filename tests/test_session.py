"""Streaming session: KV eviction with RoPE re-rotation, KV quantisation, and the session itself
(streaming == one-shot, bounded memory, save/restore, questions from cached context)."""

from __future__ import annotations

import asyncio
import os
import time

import mlx.core as mx
import numpy as np
import pytest
from framecast.testing import make_tiny_minicpmv, random_image

from framecast.events import Frame
from framecast.kernels.rope_shift import RopeSpec, probe_rope, rope_shift, rope_shift_reference
from framecast.model.cache import KVCache, QuantizedKVCache, eviction_plan
from framecast.model.lm.base import make_rope
from framecast.model.load import load_model
from framecast.engine.session import SessionCore, StreamingSession, TextDelta, TurnDone

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
    assert keep.tolist() == [3, 4, 5, 8, 9]  # tokens 5, 6, 7, 10, 11, relative to `first`
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
    for got, ref in ((keys, k), (values, v)):
        rel = float(mx.sqrt(mx.mean((got - ref) ** 2)) / mx.sqrt(mx.mean(ref**2)))
        assert rel < max_rel_rms
    full = KVCache()
    full.update_and_fetch(k, v)
    assert cache.nbytes < full.nbytes * (0.35 if bits == 8 else 0.2)
    restored = QuantizedKVCache.from_state(cache.state, bits=bits)
    again, _ = restored.update_and_fetch(mx.zeros((1, 2, 0, HEAD_DIM)), mx.zeros((1, 2, 0, HEAD_DIM)))
    np.testing.assert_array_equal(np.array(again), np.array(keys))
    assert restored.trim(5) == 5 and restored.offset == 35


# ---------------------------------------------------------------- the session on a tiny model


PROMPT = "Describe."
HEAD32 = {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}  # quantisable head_dim


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    cache = {}

    def get(version="2.6", **overrides):
        key = (version, tuple(sorted((k, str(v)) for k, v in overrides.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"tiny-{version}")
            make_tiny_minicpmv(d, version, **overrides)
            cache[key] = load_model(str(d))
        return cache[key]
    return get


def _features(model, n, seed=0):
    return model.encode_images([random_image(56, 56, seed=seed + i) for i in range(n)], max_slice_nums=1)


def _prefix(core):
    return f"<|im_start|>system\n{core.system_prompt}<|im_end|>\n<|im_start|>user\n"


def _placeholders(model, feats):
    return "".join(model.image_placeholder(f) + "\n" for f in feats)


def _one_shot(model, ids, feats, n_tokens):
    """Prefill everything at once, then greedy decode: (tokens, per-step logits)."""
    cache = model.make_cache()
    logits = model.forward(mx.array([ids], dtype=mx.int32), cache, images=feats)[:, -1, :]
    tokens, steps = [], []
    for _ in range(n_tokens):
        steps.append(np.array(logits[0]))
        tok = int(mx.argmax(logits, axis=-1).item())
        tokens.append(tok)
        logits = model.language_model(mx.array([[tok]], dtype=mx.int32), cache=cache)[:, -1, :]
    return tokens, steps


def _turn_text(core, prompt):
    return prompt + "<|im_end|>\n" + core.assistant_prefix


@pytest.mark.parametrize("version", ["2.6", "4.5", "4.0"])
def test_streaming_equals_one_shot(tiny_models, version):
    model = tiny_models(version)
    feats = _features(model, 5)
    core = SessionCore(model)
    for i, f in enumerate(feats):
        core.add_features(f, float(i))
    turn = core.generate(PROMPT, max_tokens=8, return_logits=True, ignore_eos=True)
    ids = model.tokenizer.encode(_prefix(core) + _placeholders(model, feats) + _turn_text(core, PROMPT))
    tokens, logits = _one_shot(model, ids, feats, 8)
    assert turn.tokens == 8
    generated = core.last_turn_ids[turn.prompt_tokens:turn.prompt_tokens + 8]
    assert generated == tokens
    for a, b in zip(turn.logits, logits):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("keep_generated", [True, False])
def test_turns_are_closed_and_the_next_turn_sees_the_transcript(tiny_models, keep_generated):
    """After a turn that ran out of tokens, the cache equals the ChatML transcript with the
    turn closed and the user turn reopened (or, not keeping it, as if it never happened)."""
    model = tiny_models("2.6")
    f1, f2 = _features(model, 2, seed=10)
    core = SessionCore(model, keep_generated=keep_generated)
    core.add_features(f1, 0.0)
    core.generate(PROMPT, max_tokens=5, ignore_eos=True)
    first_turn = list(core.last_turn_ids)
    core.add_features(f2, 1.0)
    second = core.generate("Again?", max_tokens=4, return_logits=True, ignore_eos=True)
    tok = model.tokenizer
    ids = (tok.encode(_prefix(core) + _placeholders(model, [f1])) + first_turn
           + tok.encode(_placeholders(model, [f2]) + _turn_text(core, "Again?")))
    if keep_generated:
        assert tok.decode(first_turn).endswith("<|im_end|>\n<|im_start|>user\n")
        assert len(first_turn) == len(tok.encode(_turn_text(core, PROMPT))) + 5 + len(tok.encode("<|im_end|>\n<|im_start|>user\n"))
    else:
        assert first_turn == []
    _, logits = _one_shot(model, ids, [f1, f2], 4)
    for a, b in zip(second.logits, logits):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    assert core.positions_contiguous()


def test_eviction_keeps_budget_contiguous_positions_and_generation(tiny_models):
    model = tiny_models("2.6")
    feats = _features(model, 4, seed=20)
    budget = 160
    core = SessionCore(model, max_cache_tokens=budget)
    core.start()
    frame_tokens = len(model.tokenizer.encode(_placeholders(model, feats[:1])))
    core.sink_tokens = core.offset + frame_tokens  # the prefix and the first frame are sinks
    for i in range(40):
        core.add_features(feats[i % 4], float(i))
        assert core.offset <= budget and core.positions_contiguous()
    assert core.evicted_total > 0
    kept = [int(s.pts) for s in core.spans if s.kind == "frame"]
    assert kept[0] == 0 and kept[1] > 1  # the sink frame stays, then the recent window
    assert kept[1:] == list(range(kept[1], 40))  # whole frames, newest kept, in order
    # Layer-0 keys depend only on token and position: they must equal a fresh prefill of the
    # kept tokens at contiguous positions (deeper layers legitimately differ: context changed).
    fresh = model.make_cache()
    ids = model.tokenizer.encode(_prefix(core) + _placeholders(model, [feats[i % 4] for i in kept]))
    model.forward(mx.array([ids], dtype=mx.int32), fresh, images=[feats[i % 4] for i in kept])
    k_fresh, v_fresh = fresh[0].state
    k_ours, v_ours = core.cache[0].state
    assert k_ours.shape == k_fresh.shape
    assert float(mx.abs(k_ours - k_fresh).max()) < 1e-4
    assert float(mx.abs(v_ours - v_fresh).max()) < 1e-4
    turn = core.generate(PROMPT, max_tokens=6, ignore_eos=True)
    assert turn.tokens == 6 and turn.cache_tokens <= budget and core.positions_contiguous()


def test_budget_in_megabytes(tiny_models):
    model = tiny_models("2.6")
    (feat,) = _features(model, 1, seed=30)
    core = SessionCore(model, max_cache_mb=0.2)
    for i in range(200):
        core.add_features(feat, float(i))
        assert core.nbytes <= 0.2 * 2**20
    assert core.evicted_total > 0
    from framecast.errors import UserError

    with pytest.raises(UserError, match=r"session.max_cache_mb = 0.001 holds \d tokens .* needs over 0.\d\d MB"):
        SessionCore(model, max_cache_mb=0.001).start()  # names the MB key, no negative token count
    # allocated whole at its budget, a cache uses all of an MB budget (no growth step held back)
    core = SessionCore(model, max_cache_mb=0.05)
    core.start()
    per_token = core.nbytes / core.budget_tokens()
    assert core.budget_tokens() == int(0.05 * 2**20 / per_token) and core.nbytes <= 0.05 * 2**20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_ten_thousand_frames_keep_memory_flat(tiny_models):  # ~17-30 s on the 2-core dev box
    """Precomputed features (encoding is not what is measured): cache, MLX memory and RSS
    stay flat once the window is full."""
    model = tiny_models("2.6")
    feats = _features(model, 4, seed=40)
    core = SessionCore(model, max_cache_tokens=512)
    samples = {}
    t0 = time.perf_counter()
    for i in range(10_000):
        core.add_features(feats[i % 4], float(i))
        if i in (1_000, 9_999):
            samples[i] = (core.offset, core.nbytes, mx.get_active_memory(), _rss_bytes())
    elapsed = time.perf_counter() - t0
    (_, b1, a1, r1), (o2, b2, a2, r2) = samples[1_000], samples[9_999]
    assert o2 <= 512 and b2 == b1  # the cache buffers never grew after the window filled
    assert a2 - a1 < 1 << 20  # MLX active memory: flat within 1 MiB
    assert r2 - r1 < 32 << 20  # process RSS: flat within 32 MiB (allocator noise)
    print(f"10k frames: {elapsed:.1f} s, cache {b2 / 1024:.0f} KiB, mx active {a2 / 2**20:.2f} MiB, "
          f"rss {r1 / 2**20:.1f} -> {r2 / 2**20:.1f} MiB")


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_save_restore_continue_equals_never_stopping(tiny_models, tmp_path, kv_bits):
    model = tiny_models("2.6", llm=HEAD32)  # head_dim 32
    feats = _features(model, 4, seed=50)

    def run(core, frames):
        for i, f in frames:
            core.add_features(f, float(i))
        return core.generate(PROMPT, max_tokens=6, return_logits=True, ignore_eos=True)

    a = SessionCore(model, kv_bits=kv_bits, max_cache_tokens=120)
    run(a, [(0, feats[0]), (1, feats[1])])
    path = a.save(tmp_path / "session.safetensors")
    b = SessionCore(model, kv_bits=kv_bits, max_cache_tokens=120)
    b.load(path)
    later = [(2, feats[2]), (3, feats[3]), (4, feats[0])]
    ta, tb = run(a, later), run(b, later)
    assert a.last_turn_ids == b.last_turn_ids
    assert [s.kind for s in a.spans] == [s.kind for s in b.spans] and a.offset == b.offset
    for x, y in zip(ta.logits, tb.logits):
        np.testing.assert_array_equal(x, y)


def test_load_rejects_another_model(tiny_models, tmp_path):
    from framecast.errors import UserError

    a = SessionCore(tiny_models("2.6"))
    path = a.save(tmp_path / "s.safetensors")
    b = SessionCore(tiny_models("2.6", llm=HEAD32))
    with pytest.raises(UserError, match="different model"):
        b.load(path)
    with pytest.raises(UserError, match="not found"):
        b.load(tmp_path / "missing.safetensors")


def test_load_rejects_a_model_of_the_same_shape_with_other_weights(tiny_models, tmp_path):
    """A retrained checkpoint has the cache shape of the old one: the weights digest tells them apart."""
    from framecast.errors import UserError
    from framecast.model.load import load_model
    from framecast.testing import make_tiny_minicpmv

    a = SessionCore(tiny_models("2.6"))
    path = a.save(tmp_path / "s.safetensors")
    make_tiny_minicpmv(tmp_path / "other", "2.6", seed=7)
    b = SessionCore(load_model(str(tmp_path / "other")))
    with pytest.raises(UserError, match="different model"):
        b.load(path)
    SessionCore(tiny_models("2.6")).load(path)  # the same weights load


@pytest.mark.parametrize("bits,max_err", [(8, 0.05), (4, 0.5)])
def test_kv_quantisation_error_measured(tiny_models, bits, max_err):
    """Max |logit error| of a quantised-cache session vs the fp32 one (reported, bounded)."""
    model = tiny_models("2.6", llm=HEAD32)
    feats = _features(model, 6, seed=60)
    turns = []
    for kv_bits in (None, bits):
        core = SessionCore(model, kv_bits=kv_bits)
        for i, f in enumerate(feats):
            core.add_features(f, float(i))
        turns.append((core.generate(PROMPT, max_tokens=1, return_logits=True), core.nbytes))
    (ref, ref_bytes), (q, q_bytes) = turns
    err = float(np.abs(ref.logits[0] - q.logits[0]).max())
    spread = float(ref.logits[0].std())
    print(f"kv {bits}-bit: max |dlogit| {err:.4f} (logit std {spread:.2f}), cache {q_bytes}/{ref_bytes} bytes")
    assert err < max_err * spread
    assert q_bytes < ref_bytes * (0.35 if bits == 8 else 0.2)


# ---------------------------------------------------------------- async API


def test_async_api_streams_deltas_and_keeps_the_loop_responsive(tiny_models):
    model = tiny_models("2.6")
    images = [random_image(56, 56, seed=70 + i) for i in range(3)]

    async def main():
        session = StreamingSession(model)
        lags = []

        async def ticker():
            while True:
                t = time.perf_counter()
                await asyncio.sleep(0.005)
                lags.append(time.perf_counter() - t - 0.005)

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.02)
        for i, img in enumerate(images):  # pixels: encoded on the worker thread
            before, t = len(lags), time.perf_counter()
            frame = Frame(pixels=img, pts=float(i)) if i == 0 else img  # an event or raw pixels
            assert await session.add_frame(frame, None if i == 0 else float(i)) > 0
            if time.perf_counter() - t > 0.1:  # a long call: the loop kept ticking meanwhile
                assert len(lags) > before
        events = [ev async for ev in session.narrate(PROMPT, max_tokens=12, ignore_eos=True)]
        deltas = [e for e in events if isinstance(e, TextDelta)]
        done = events[-1]
        assert isinstance(done, TurnDone) and done.tokens == 12
        assert "".join(d.text for d in deltas) == done.text
        # interrupt a turn: leave after the first delta; the worker closes the turn
        async for ev in session.ask("Why?", max_tokens=50, ignore_eos=True):
            break
        await session.add_text("note")  # runs after the interrupted turn closed
        core = session.core
        assert [s.kind for s in core.spans][-2:] == ["turn", "text"] and core.positions_contiguous()
        assert core.spans[1].pts == 0.0  # taken from the Frame event
        closed = model.tokenizer.decode(core.last_turn_ids)
        assert closed.endswith("<|im_end|>\n<|im_start|>user\n") and closed.count("<|im_end|>") == 2
        tick.cancel()
        return lags

    lags = asyncio.run(main())
    assert len(lags) > 0


def test_a_failed_turn_leaves_the_cache_as_before(tiny_models):
    model = tiny_models("2.6")
    (feat,) = _features(model, 1, seed=80)
    core = SessionCore(model)
    core.add_features(feat, 0.0)
    before = core.offset
    calls = []

    def failing_sampler(logits, history):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("sampler broke")
        return mx.argmax(logits, axis=-1)

    with pytest.raises(RuntimeError, match="sampler broke"):
        core.generate(PROMPT, max_tokens=8, sampler=failing_sampler)
    assert core.offset == before and core.positions_contiguous()
    assert core.generate(PROMPT, max_tokens=3, ignore_eos=True).tokens == 3


def test_eviction_drops_whole_turns_and_frames_in_order(tiny_models):
    """Frames and narration turns interleave under a budget: whatever is evicted goes whole,
    oldest first, and the kept cache is exactly the kept transcript (layer-0 keys)."""
    model = tiny_models("2.6")
    feats = _features(model, 3, seed=90)
    core = SessionCore(model, max_cache_tokens=260)
    transcript = []  # (kind, ids, features) in cache order, mirrored from the session
    core.start()
    transcript.append(("prefix", model.tokenizer.encode(_prefix(core)), []))
    for i in range(24):
        f = feats[i % 3]
        core.add_features(f, float(i))
        transcript.append(("frame", model.tokenizer.encode(_placeholders(model, [f])), [f]))
        if i % 4 == 3:
            core.generate(PROMPT, max_tokens=4, ignore_eos=True)
            transcript.append(("turn", list(core.last_turn_ids), []))
        assert core.offset <= 260 and core.positions_contiguous()
    kinds = [s.kind for s in core.spans]
    assert "turn" in kinds and core.evicted_total > 0
    kept = transcript[:1] + transcript[len(transcript) - (len(core.spans) - 1):]
    assert [k for k, _, _ in kept] == kinds
    assert [len(ids) for _, ids, _ in kept] == [s.length for s in core.spans]
    ids = [t for _, part, _ in kept for t in part]
    fresh = model.make_cache()
    model.forward(mx.array([ids], dtype=mx.int32), fresh, images=[f for _, _, fs in kept for f in fs])
    assert float(mx.abs(fresh[0].state[0] - core.cache[0].state[0]).max()) < 1e-4


def test_bench_streaming_runs_and_prints_json_last(capsys):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "bench_streaming.py"
    spec = importlib.util.spec_from_file_location("bench_streaming", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--minutes", "0.05", "0.1", "--max-tokens", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["frames"] for r in result["rows"]] == [3, 6]
    assert all(r["ratio_first"] > 0 and r["context_tokens"] > 0 for r in result["rows"])


def test_a_failed_frame_prefill_leaves_the_cache_as_before(tiny_models):
    from framecast.errors import UserError

    model = tiny_models("2.6")
    (feat,) = _features(model, 1, seed=81)
    core = SessionCore(model)
    core.add_features(feat, 0.0)
    before = core.offset
    bad = type(feat)(feat.features[:, :3], None)  # fewer features than placeholder tokens
    with pytest.raises(UserError):
        core.add_features(bad, 1.0)
    assert core.offset == before and core.positions_contiguous()
    assert core.add_features(feat, 2.0) > 0


def test_settings_the_model_cannot_honour_fail_as_one_line(tiny_models):
    from framecast.errors import UserError

    model = tiny_models("2.6")  # head_dim 16
    with pytest.raises(UserError, match=r"session.kv_bits = 8: .*head_dim divisible by 32 \(this model has 16\)"):
        SessionCore(model, kv_bits=8)
    with pytest.raises(UserError, match="session.max_cache_tokens = 10"):
        SessionCore(model, max_cache_tokens=10)


@pytest.mark.parametrize("batched", [False, True])
def test_a_turn_that_fails_mid_way_leaves_the_cache_as_before(tiny_models, batched):
    """The turn's own code fails after a few tokens (here the detokenizer): the cache goes back
    to before the turn, and stays there after the token loop is collected (closing the loop
    feeds its last token, which must not land after the rollback), one-session loop and
    BatchDecode alike; the session then goes on."""
    import gc

    from framecast.engine.scheduler import BatchDecode

    model = tiny_models("2.6")
    core = SessionCore(model)
    if batched:
        core.decode_batch = BatchDecode(model)
    (feat,) = _features(model, 1, seed=61)
    core.add_features(feat, 0.0)
    before, spans = core.offset, len(core.spans)
    real = core.tokenizer.detokenizer

    class Breaks:
        def __init__(self):
            self.inner, self.n = real(), 0

        def add(self, token):
            self.n += 1
            if self.n == 3:
                raise RuntimeError("detokenizer broke")
            return self.inner.add(token)

    core.tokenizer.detokenizer = Breaks
    try:
        with pytest.raises(RuntimeError, match="detokenizer broke"):
            core.generate(PROMPT, max_tokens=8, ignore_eos=True)
    finally:
        core.tokenizer.detokenizer = real
    gc.collect()
    assert core.offset == before and len(core.spans) == spans
    assert all(layer.offset == before for layer in core.cache)
    done = core.generate(PROMPT, max_tokens=4, ignore_eos=True)
    assert done.tokens == 4 and core.positions_contiguous()


def test_a_saved_cache_that_does_not_fit_says_what_differs():
    from framecast.engine.persist import fingerprint_difference

    ours = {"layers": 6, "n_kv": 2, "head_dim": 64, "kv_bits": 4, "weights": "abc"}
    assert fingerprint_difference({**ours, "kv_bits": 0}, ours) == (
        "saved with no KV quantisation, this run uses kv_bits 4 (session.kv_bits)")
    assert fingerprint_difference({**ours, "kv_bits": 8}, {**ours, "kv_bits": 0}) == (
        "saved with kv_bits 8, this run uses no KV quantisation (session.kv_bits)")
    assert fingerprint_difference({**ours, "layers": 28}, ours) == "saved for a different model (layers 28, this model's 6)"
    assert "weights 'zzz'" in fingerprint_difference({**ours, "weights": "zzz", "kv_bits": 0}, ours)


def test_a_budget_that_can_never_fit_in_memory_is_one_line(tiny_models, monkeypatch):
    """The cache is allocated whole at its budget: one larger than the memory here is refused
    at once (naming the key, the GiB it needs and the GiB there are), not a crash at the
    allocation; a quantised cache needs less per token."""
    import framecast.engine.core as core_mod
    from framecast.errors import UserError

    model = tiny_models("2.6")
    per_token = core_mod.kv_bytes_per_token(model.language_model)
    assert per_token == 2 * 2 * 16 * len(model.language_model.layers) * 4  # 2 layers of 2 KV heads x 16, fp32
    assert core_mod.kv_bytes_per_token(model.language_model, 8) < per_token / 3
    monkeypatch.setattr(core_mod, "memory_bytes", lambda: 2**30)
    with pytest.raises(UserError, match=r"session.max_cache_tokens = 10000000: this model's KV cache would need "
                                        r"[\d.]+ GiB, more than the 1.0 GiB of memory here"):
        SessionCore(model, max_cache_tokens=10_000_000)
    SessionCore(model, max_cache_tokens=100_000)  # fits


def test_state_files_and_saved_session_archives_are_told_apart(tiny_models, tmp_path):
    """A session.state_file given to --resume, or a --save-session archive given as a state
    file, says which kind it is and what takes it (they may share a suffix)."""
    import zipfile

    from framecast.errors import UserError
    from framecast.stages.session_file import read_archive

    core = SessionCore(tiny_models("2.6"))
    state = core.save(tmp_path / "cam.fcs")
    with pytest.raises(UserError, match=r"cam.fcs: a session.state_file \(the cache alone\), not a --save-session"):
        read_archive(state)
    archive = tmp_path / "run.fcs"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("manifest.json", "{}")
    with pytest.raises(UserError, match=r"run.fcs: a --save-session archive, not a session state file: .*--resume"):
        SessionCore(tiny_models("2.6")).load(archive)
