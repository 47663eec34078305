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
