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
                  "--fused", "both", "--decode-tokens", "3", "--decode-samples", "2", "--compile", "both")
    assert [r["frames"] for r in result["rows"]] == [3, 6]
    for row in result["rows"]:
        assert set(row["impls"]) == {f"{impl}{fused}{comp}" for impl in ("sdpa", "kernel") for fused in ("", "+fused")
                                     for comp in ("", "+compiled")}
        for entry in row["impls"].values():
            assert entry["total"]["median"] > 0 and entry["total"]["p95"] >= entry["total"]["median"]
        assert row["decode_tok_s"] > 0 and row["decode_tok_s_compiled"] > 0
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


# ---------------------------------------------------------------- compiled layers (FRAMECAST_COMPILE)


@pytest.fixture(params=["4.5"])
def compiled_twin(tmp_path, request):
    """Two loads of one tiny model: (eager, compiled), the same weights."""
    from framecast.model.compiled import compile_layers

    d = tmp_path / f"tiny-{request.param}"
    make_tiny_minicpmv(d, request.param)
    eager, compiled = load_model(str(d)), load_model(str(d))
    n = len(compiled.language_model.layers) + 1  # every decoder layer and the vision tower
    assert compile_layers(eager, False) == compile_layers(compiled, True) == n
    return eager, compiled


@pytest.mark.parametrize("compiled_twin", ["2.6", "4.0", "4.5"], indirect=True)  # Qwen2, MiniCPM muP, Qwen3 q/k norm
def test_compiled_layers_stream_like_eager_ones(compiled_twin):
    """Frames, a fused frame + prompt prefill and greedy decode: the same text, logits within
    float32 rounding, the same cache."""
    eager, compiled = compiled_twin
    images = [random_image(56, 56, seed=20 + i) for i in range(3)]
    feats = {id(m): m.encode_images(images, max_slice_nums=1) for m in compiled_twin}
    for fe, fc in zip(feats[id(eager)], feats[id(compiled)]):
        np.testing.assert_allclose(np.array(fe.features), np.array(fc.features), rtol=1e-4, atol=1e-4)
    runs = []
    for m in compiled_twin:
        core = SessionCore(m)
        core.add_features(feats[id(m)][0], 0.0)
        core.add_features(feats[id(m)][1], 1.0)
        runs.append((core, core.generate(PROMPT, max_tokens=5, ignore_eos=True, return_logits=True,
                                         frame=feats[id(m)][2], pts=2.0)))
    (ce, a), (cc, b) = runs
    assert a.text == b.text and a.tokens == b.tokens
    for la, lb in zip(a.logits, b.logits):
        np.testing.assert_allclose(la, lb, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(ce.cache[1].state[0]), np.array(cc.cache[1].state[0]), rtol=1e-4, atol=1e-4)


def test_compiled_layers_batch_rows_like_eager_ones(compiled_twin):
    """Several sessions' frames in one batched prefill (RowCaches): the caches the eager layers fill."""
    eager, compiled = compiled_twin
    images = [random_image(56, 56, seed=40 + i) for i in range(3)]
    cores = {}
    for m in compiled_twin:
        feats = m.encode_images(images, max_slice_nums=1)
        cores[id(m)] = [SessionCore(m) for _ in range(3)]
        cores[id(m)][0].add_features(feats[0], 0.0)  # rows of different lengths
        added = SessionCore.add_features_rows(cores[id(m)], feats, [1.0, 0.0, 0.0])
        assert all(isinstance(n, int) and n > 0 for n in added), added
    for ce, cc in zip(cores[id(eager)], cores[id(compiled)]):
        assert ce.offset == cc.offset, (ce.offset, cc.offset, ce.cache[0], cc.cache[0])
        np.testing.assert_allclose(np.array(ce.cache[0].state[1]), np.array(cc.cache[0].state[1]), rtol=1e-4, atol=1e-4)


def test_compiled_layers_see_weights_loaded_after_their_first_call(compiled_twin):
    """The parameters are the compiled bodies' tracked inputs, not constants of the trace."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map

    eager, compiled = compiled_twin
    ids = mx.array([[5, 6, 7]], dtype=mx.int32)
    before = np.array(compiled(ids))  # traced with the first weights
    new = tree_map(lambda w: w * 0.5, dict(tree_flatten(eager.language_model.parameters())))
    for m in compiled_twin:
        m.language_model.load_weights(list(new.items()))
    np.testing.assert_allclose(np.array(compiled(ids)), np.array(eager(ids)), rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.array(compiled(ids)), before)


@pytest.mark.parametrize("value,want", [("auto", False), ("", False), ("on", True), ("1", True), ("OFF", False)])
def test_framecast_compile_switch(monkeypatch, tmp_path, value, want):
    """auto compiles the vision tower on a GPU and nothing on the CPU; on (tower and decoder
    layers) / off force it; load_model applies it."""
    monkeypatch.setenv("FRAMECAST_COMPILE", value)
    d = tmp_path / "tiny"
    make_tiny_minicpmv(d, "2.6")
    m = load_model(str(d))
    assert m.language_model.layers[0].compiled is want and m.vpm.compiled is want
    from framecast.model.compiled import compile_layers

    compile_layers(m, "tower")  # what `auto` picks on a GPU: the tower only
    assert m.vpm.compiled is True and m.language_model.layers[0].compiled is False


def test_framecast_compile_bad_value_is_one_line(monkeypatch):
    from framecast.errors import UserError
    from framecast.model.compiled import wanted

    monkeypatch.setenv("FRAMECAST_COMPILE", "fast")
    with pytest.raises(UserError, match=r"FRAMECAST_COMPILE='fast': expected one of auto, on, off"):
        wanted()


def test_compiled_layers_of_a_quantised_model_decode_like_eager_ones(compiled_twin):
    """4-bit linears (QuantizedLinear) inside the compiled bodies: the same logits."""
    import mlx.core as mx
    import mlx.nn as nn

    for m in compiled_twin:
        nn.quantize(m.language_model, group_size=32, bits=4)
    eager, compiled = compiled_twin
    assert isinstance(compiled.language_model.layers[0].mlp.up_proj, nn.QuantizedLinear)
    ids = mx.array([[3, 1, 4, 1, 5]], dtype=mx.int32)
    logits = []
    for m in compiled_twin:  # a prompt, then one token at a time onto the cache
        cache = m.make_cache()
        logits.append([np.array(m(ids, cache))] + [np.array(m(mx.array([[t]], dtype=mx.int32), cache)) for t in (9, 2)])
    for a, b in zip(*logits):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("compiled_twin", ["2.6"], indirect=True)  # biases on q/k/v and in the tower
def test_compiled_layers_are_shapeless(compiled_twin):
    """One trace serves every token count, batch and view count: prompts of new lengths and
    batches of views give the eager results (biased linears included)."""
    import mlx.core as mx

    eager, compiled = compiled_twin
    for n in (1, 4, 9, 2):  # prompt lengths, each a new shape for the same compiled bodies
        ids = mx.array([list(range(3, 3 + n))], dtype=mx.int32)
        np.testing.assert_allclose(np.array(compiled(ids)), np.array(eager(ids)), rtol=1e-4, atol=1e-4)
    for n_images, size in ((1, 56), (3, 56), (2, 84)):  # view batches; 84 px: several slices
        images = [random_image(size, size, seed=60 + i) for i in range(n_images)]
        for fe, fc in zip(eager.encode_images(images), compiled.encode_images(images)):
            np.testing.assert_allclose(np.array(fe.features), np.array(fc.features), rtol=1e-4, atol=1e-4)



def test_compile_layers_reaches_a_text_only_gguf_model(tmp_path, monkeypatch):
    """A lone language-model GGUF loads as a text-only wrapper (not a Module): its layers are
    switched too, and its logits are the eager ones."""
    import mlx.core as mx
    from gguf_fixtures import write_gguf_pair

    hf = make_tiny_minicpmv(tmp_path / "hf", "2.6")
    lm_path, _mm, _ = write_gguf_pair(hf, tmp_path / "gguf", "F32", version="2.6")
    logits = {}
    for value in ("off", "on"):
        monkeypatch.setenv("FRAMECAST_COMPILE", value)
        model = load_model(str(lm_path))
        assert all(layer.compiled is (value == "on") for layer in model.language_model.layers)
        logits[value] = np.array(model.language_model(mx.array([[1, 2, 3, 4]]), cache=model.make_cache()))
    np.testing.assert_allclose(logits["on"], logits["off"], rtol=1e-4, atol=1e-4)


def test_bench_preprocess_smoke():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_preprocess.py"), "--size", "96",
                           "--samples", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cv2.LUT (now)" in proc.stdout and "per-channel take (before)" in proc.stdout
