"""Issue 14's fast path on CPU: one prefill for frame + prompt, preallocated session caches, the
resampler's cached position table, and the latency/attention benchmarks (smoke runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import framecast.kernels.cache_attention as ca

from framecast.engine.core import UNBOUNDED_GROWTH, SessionCore
from framecast.model.load import load_model
from framecast.testing import make_tiny_minicpmv, random_image

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "What happens?"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-4.5")
    make_tiny_minicpmv(d, "4.5")
    return load_model(str(d))


def _feats(model, n, seed=0):
    return model.encode_images([random_image(56, 56, seed=seed + i) for i in range(n)], max_slice_nums=1)


@pytest.mark.parametrize("keep_generated", [True, False])
def test_fused_frame_and_prompt_prefill_equals_two_prefills(model, keep_generated):
    """Same logits, same text, same cache and spans as add_features + generate."""
    feats = _feats(model, 3, seed=1)
    cores = [SessionCore(model, keep_generated=keep_generated) for _ in range(2)]
    for core in cores:
        core.add_features(feats[0], 0.0)
    cores[0].add_features(feats[1], 1.0)
    a = cores[0].generate(PROMPT, max_tokens=4, ignore_eos=True, return_logits=True)
    b = cores[1].generate(PROMPT, max_tokens=4, ignore_eos=True, return_logits=True, frame=feats[1], pts=1.0)
    assert a.text == b.text and a.prompt_tokens == b.prompt_tokens
    for la, lb in zip(a.logits, b.logits):
        np.testing.assert_allclose(la, lb, rtol=1e-4, atol=1e-4)
    assert cores[0].spans == cores[1].spans and cores[0].frames_added == cores[1].frames_added == 2
    assert cores[0].offset == cores[1].offset and cores[1].positions_contiguous()
    np.testing.assert_allclose(np.array(cores[0].cache[0].state[0]), np.array(cores[1].cache[0].state[0]),
                               rtol=1e-4, atol=1e-4)
    # the stream goes on identically
    for core in cores:
        core.add_features(feats[2], 2.0)
    np.testing.assert_allclose(np.array(cores[0].cache[1].state[1]), np.array(cores[1].cache[1].state[1]),
                               rtol=1e-4, atol=1e-4)


def test_fused_prefill_with_eviction_keeps_the_budget(model):
    (feat,) = _feats(model, 1, seed=5)
    core = SessionCore(model, max_cache_tokens=260, keep_generated=False)
    for i in range(30):
        turn = core.generate(PROMPT, max_tokens=2, ignore_eos=True, frame=feat, pts=float(i))
        assert turn.tokens == 2 and core.offset <= 260 and core.positions_contiguous()
    assert core.evicted_total > 0 and core.frames_added == 30


def test_budgeted_session_allocates_once_and_never_grows(model):
    (feat,) = _feats(model, 1, seed=7)
    core = SessionCore(model, max_cache_tokens=1000)
    core.start()
    capacity = core.cache[0].capacity
    assert capacity >= 1000  # the whole budget, at the first write
    for i in range(120):
        core.add_features(feat, float(i))
        assert core.cache[0].capacity == capacity
    assert core.evicted_total > 0


def test_unbounded_session_grows_geometrically(model):
    (feat,) = _feats(model, 1, seed=9)
    core = SessionCore(model)
    capacities = []
    for i in range(60):
        core.add_features(feat, float(i))
        if core.cache[0].capacity not in capacities:
            capacities.append(core.cache[0].capacity)
    assert core.cache[0].growth == UNBOUNDED_GROWTH
    # each growth adds at least a quarter of what was there (or one step)
    assert all(b >= min(a * UNBOUNDED_GROWTH, a + core.cache[0].step) for a, b in zip(capacities, capacities[1:]))


def test_resampler_position_table_is_built_once_per_view_size(model):
    from framecast.model import resampler

    resampler._key_positions.cache_clear()
    img = random_image(56, 56, seed=3)
    first = model.encode_images([img], max_slice_nums=1)[0].features
    again = model.encode_images([img], max_slice_nums=1)[0].features
    info = resampler._key_positions.cache_info()
    assert info.misses == 1 and info.hits >= 1
    np.testing.assert_array_equal(np.array(first), np.array(again))


def _run(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args, "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bench_latency_smoke():
    result = _run("bench_latency.py", "--minutes", "0.05", "0.1", "--steps", "2", "--attention", "sdpa", "kernel",
                  "--fused", "both", "--decode-tokens", "3")
    assert [r["frames"] for r in result["rows"]] == [3, 6]
    for row in result["rows"]:
        assert set(row["impls"]) == {"sdpa", "sdpa+fused", "kernel", "kernel+fused"}
        for entry in row["impls"].values():
            assert entry["total"]["median"] > 0 and entry["total"]["p95"] >= entry["total"]["median"]
        assert row["decode_tok_s"] > 0
        assert row["impls"]["sdpa+fused"]["frame"]["median"] == 0
        assert row["reprefill_total"]["median"] > 0 and row["ratio_reprefill_vs_best"] > 0


def test_bench_attention_smoke():
    result = _run("bench_attention.py", "--steps", "2")
    assert {r["impl"] for r in result["rows"]} == set(ca.IMPLS)
    assert all(r["rel_err"] < 1e-4 and r["median_ms"] > 0 for r in result["rows"])


def test_bench_streaming_takes_several_samples_per_row():
    result = _run("bench_streaming.py", "--minutes", "0.05", "--repeats", "3", "--max-tokens", "2")
    (row,) = result["rows"]
    assert result["repeats"] == 3 and row["stream_first_p95_ms"] >= row["stream_first_ms"]
