"""generate_tokens (pipelined decode == naive loop, cache contract) and `framecast generate`."""

from __future__ import annotations

import mlx.core as mx
import pytest

from framecast.stages.cli import main as cli_main
from framecast.engine.generate import generate_tokens
from framecast.model.load import load_model
from framecast.testing import make_tiny_minicpmv, random_image


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_minicpmv(tmp_path_factory.mktemp("gen") / "m", "4.5", seed=11)


def _naive(model, ids, n, images=()):
    cache = model.make_cache()
    logits = model.forward(mx.array([ids]), cache, images)
    out = []
    for _ in range(n):
        t = int(mx.argmax(logits[0, -1]).item())
        out.append(t)
        logits = model.forward(mx.array([[t]]), cache)
    return out


def test_pipelined_greedy_equals_naive_loop_and_cache_contract(model_dir):
    model = load_model(model_dir)
    feats = model.encode_images([random_image(60, 90, seed=2)])
    text = model.processor.chat_prompt([{"role": "user", "content": model.image_placeholder(feats[0]) + "\nSay."}])
    ids = model.tokenizer.encode(text)
    cache = model.make_cache()
    got = list(generate_tokens(model, ids, max_tokens=12, cache=cache, images=feats, stop_ids=set(),
                               prefill_step=16))
    assert got == _naive(model, ids, 12, feats)
    assert cache[0].offset == len(ids) + 11  # the last yielded token is not fed (nothing follows it)

    cache = model.make_cache()
    first = got[0]
    stopped = list(generate_tokens(model, ids, max_tokens=12, cache=cache, images=feats, stop_ids={got[2]}))
    assert stopped == got[:3] and cache[0].offset == len(ids) + 2  # stop token trimmed back out
    assert first == got[0]


def test_cli_generate_streams_text_only(model_dir, capsys):
    assert cli_main(["generate", "--model", str(model_dir), "--prompt", "Hello", "--max-tokens", "8"]) == 0
    cap = capsys.readouterr()
    model = load_model(model_dir)
    ids = model.tokenizer.encode(model.processor.chat_prompt([{"role": "user", "content": "Hello"}]))
    want = _naive(model, ids, 8)
    eos = model.tokenizer.eos_ids
    want = want[: next((i for i, t in enumerate(want) if t in eos), len(want))]
    assert cap.out == model.tokenizer.decode(want, skip_special=True) + "\n"
    assert "TTFT" in cap.err and "tok/s" in cap.err
    assert cli_main(["generate", "--model", "/nope", "--prompt", "x"]) == 2


def test_sampling_is_seeded(model_dir, capsys):
    args = ["generate", "--model", str(model_dir), "--prompt", "Hi", "--max-tokens", "10", "--temp", "1.0"]
    cli_main(args + ["--seed", "3"])
    a = capsys.readouterr().out
    cli_main(args + ["--seed", "3"])
    assert capsys.readouterr().out == a


@pytest.mark.parametrize("version", ["2.6", "4.0", "4.5"])
def test_prefill_rows_leaves_each_cache_as_its_own_prefill(tmp_path, version):
    """Frames of three sessions with caches of different lengths, prefilled as one batch, leave
    every cache as prefilling each alone does (to float rounding: OpenBLAS may sum a row of a
    batched matmul in another order, ~5e-7 here), and the sessions then narrate the same text;
    rows of different lengths are refused; a failing batch rolls every cache back."""
    import mlx.core as mx

    from framecast.engine.core import SessionCore
    from framecast.engine.generate import prefill_rows
    from framecast.model.load import load_model
    from framecast.testing import make_tiny_minicpmv, random_image

    make_tiny_minicpmv(tmp_path, version)
    m = load_model(str(tmp_path))
    feats = m.encode_images([random_image(56, 56, seed=s) for s in range(6)], max_slice_nums=1)

    def build(n_before: int) -> SessionCore:
        c = SessionCore(m)
        for i in range(n_before):
            c.add_features(feats[i], float(i))
        return c

    alone, batched = [build(k) for k in (0, 1, 3)], [build(k) for k in (0, 1, 3)]
    for c, f in zip(alone, feats[3:6]):
        c.add_features(f, 9.0)
    assert SessionCore.add_features_rows(batched, list(feats[3:6]), [9.0] * 3) == [len(s) for s in [
        c._frame_ids(f) for c, f in zip(alone, feats[3:6])]]
    for a, b in zip(alone, batched):
        assert a.offset == b.offset and [(s.kind, s.length, s.pts) for s in a.spans] == [
            (s.kind, s.length, s.pts) for s in b.spans]
        for la, lb in zip(a.cache, b.cache):
            for x, y in zip(la.state, lb.state):
                assert mx.allclose(x[..., :la.offset, :], y[..., :lb.offset, :], rtol=1e-5, atol=1e-5)
        assert a.generate("Describe it.", max_tokens=8).text == b.generate("Describe it.", max_tokens=8).text

    with pytest.raises(ValueError, match="lengths"):
        prefill_rows(m, [[1, 2], [1, 2, 3]], [batched[0].cache, batched[1].cache])
    offsets = [c.offset for c in batched]
    with pytest.raises(Exception):  # a placeholder count that does not match its features
        prefill_rows(m, [batched[0]._frame_ids(feats[0])] * 2, [batched[0].cache, batched[1].cache],
                     images=[[feats[0]], [feats[0], feats[1]]])
    assert [c.offset for c in batched] == offsets and all(
        layer.offset == c.offset for c in batched for layer in c.cache)
