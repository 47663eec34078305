"""GGUF through the CLI: generate (real SmolLM2 GGUF), convert (LM alone and pairs), run.

Every command runs as a real subprocess (`python -m pipeline.cli`, what the `framecast`
console script calls), so what a user sees is what is checked: generated text alone on
stdout, timings on stderr, one `framecast: ...` line and exit status 2 for bad files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from gguf_fixtures import smollm_path, write_gguf_pair
from framecast.testing import make_tiny_minicpmv, random_image

ROOT = Path(__file__).resolve().parent.parent


def framecast(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "framecast", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    hf = make_tiny_minicpmv(root / "hf", "2.6")
    lm, mm, _equiv = write_gguf_pair(hf, root / "gguf", "Q4_0", version="2.6")
    return root, lm, mm


def test_generate_prints_only_the_generated_text(tmp_path):
    from framecast.model.gguf.model import load_gguf

    path = smollm_path()
    prompt, n = "What is the capital of France?", 24
    run = framecast("generate", "--model", str(path), "--prompt", prompt, "--max-tokens", str(n), "--temp", "0")
    assert run.returncode == 0, run.stderr

    # The same greedy completion computed in-process with the GGUF's own chat template.
    model = load_gguf(path)
    ids = model.tokenizer.encode(model.processor.chat_prompt([{"role": "user", "content": prompt}]))
    assert ids[:3] == model.tokenizer.encode("<|im_start|>system\n")  # SmolLM2's template default
    cache, out = model.make_cache(), []
    logits = model.language_model(mx.array([ids]), cache=cache)
    for _ in range(n):
        token = int(mx.argmax(logits[0, -1]).item())
        if token in model.tokenizer.eos_ids:
            break
        out.append(token)
        logits = model.language_model(mx.array([[token]]), cache=cache)
    assert run.stdout == model.tokenizer.decode(out) + "\n"
    assert "Paris" in run.stdout
    assert "tok/s" in run.stderr and "framecast:" not in run.stdout


def test_convert_text_only_gguf_then_load(tiny_pair):
    from framecast.model.gguf.model import load_gguf
    from framecast.model.load import load_model

    root, lm, _mm = tiny_pair
    out = root / "converted-lm"
    run = framecast("convert", str(lm), str(out))
    assert run.returncode == 0, run.stderr
    ids = mx.array([[5, 70, 71, 72, 260, 12, 13, 99, 100]])
    a = np.array(load_gguf(lm).language_model(ids))
    b = np.array(load_model(out).language_model(ids))
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    gen = framecast("generate", "--model", str(out), "--prompt", "hi", "--max-tokens", "4")
    assert gen.returncode == 0, gen.stderr


def test_convert_gguf_pair_then_load(tiny_pair):
    from framecast.model.gguf.model import load_gguf
    from framecast.model.load import load_model

    root, lm, mm = tiny_pair
    out = root / "converted-pair"
    run = framecast("convert", str(lm), "--mmproj", str(mm), str(out))
    assert run.returncode == 0, run.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "minicpmv" and cfg["version"] == 2.6
    ours, converted = load_gguf(lm, mmproj=mm), load_model(out)
    image = random_image(60, 90, seed=3)
    fa = ours.encode_images([image])
    fb = converted.encode_images([image])
    np.testing.assert_allclose(np.array(fb[0].features), np.array(fa[0].features), rtol=1e-5, atol=1e-5)
    ids = mx.array([ours.tokenizer.encode(ours.image_placeholder(fa[0]) + "\nwhat is it?")])
    la = np.array(ours.forward(ids, ours.make_cache(), images=fa))
    lb = np.array(converted.forward(ids, converted.make_cache(), images=fb))
    np.testing.assert_allclose(lb, la, rtol=1e-5, atol=1e-5)


def test_run_with_a_gguf_pair(tiny_pair):
    root, lm, mm = tiny_pair
    jsonl = root / "run.jsonl"
    run = framecast("run", "--model", str(lm), "--mmproj", str(mm), "--source", "demo", "--max-frames", "6",
                    "--interval", "0.2", "--max-tokens", "4", "--jsonl", str(jsonl), "--no-console")
    assert run.returncode == 0, run.stderr
    events = [json.loads(line) for line in jsonl.read_text().splitlines()]
    narrations = [e for e in events if e["type"] == "narration"]
    assert narrations and all(e["tokens"] >= 1 for e in narrations)


def test_bad_gguf_is_one_line_and_exit_2(tmp_path, tiny_pair):
    _root, lm, mm = tiny_pair
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"NOTAGGUF" * 8)
    for args, needle in [
        (("generate", "--model", str(bogus), "--prompt", "x"), "not a GGUF file"),
        (("generate", "--model", str(mm), "--prompt", "x"), "mmproj"),
        (("convert", str(lm), "--mmproj", str(lm), str(tmp_path / "o")), "is not an mmproj"),
    ]:
        run = framecast(*args)
        assert run.returncode == 2, (args, run.stderr)
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("framecast: ") and needle in lines[0], run.stderr


def test_convert_real_gguf_with_chat_template(tmp_path):
    """SmolLM2 (Q4_1 + Q8_0 embedding, a chat template): converts and reloads to the same logits."""
    from framecast.model.gguf.model import load_gguf
    from framecast.model.load import load_model

    path = smollm_path()
    out = tmp_path / "smollm-mlx"
    run = framecast("convert", str(path), str(out))
    assert run.returncode == 0, run.stderr
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    ids = mx.array([[1, 4093, 198, 19556, 905, 17, 2, 198]])
    a = np.array(load_gguf(path).language_model(ids))
    b = np.array(load_model(out).language_model(ids))
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-4)
