"""Sampling: filters equal transformers' logits processors; draws seeded and distributed right."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from framecast.engine.sampling import Sampler, make_sampler

V = 64


def _logits(b: int = 3, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((b, V)) * 3).astype(np.float32)


def _hf_process(logits: np.ndarray, history: list[int], *, temperature, top_k, top_p, penalty):
    scores = torch.tensor(logits)
    ids = torch.tensor([history] * logits.shape[0])
    if penalty is not None:
        scores = RepetitionPenaltyLogitsProcessor(penalty)(ids, scores)
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return scores.numpy()


@pytest.mark.parametrize(
    "temperature,top_k,top_p,penalty",
    [
        (1.0, None, None, 1.3),
        (0.7, 10, None, None),
        (0.7, None, 0.8, None),
        (1.3, 20, 0.5, 1.2),
        (0.5, 1, 0.9, 0.8),  # penalty < 1 rewards repeats
    ],
)
def test_filters_match_transformers(temperature, top_k, top_p, penalty):
    logits = _logits()
    history = [3, 7, 7, 11, 40, 63, 0]
    sampler = make_sampler(temperature, top_k, top_p, penalty)
    ours = np.array(sampler.process(mx.array(logits), history))
    ref = _hf_process(logits, history, temperature=temperature, top_k=top_k, top_p=top_p, penalty=penalty)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))  # same candidate sets
    kept = ~np.isinf(ref)
    np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-6, atol=1e-6)


def test_greedy_is_argmax_after_penalty():
    logits = _logits()
    assert np.array_equal(np.array(make_sampler()(mx.array(logits))), logits.argmax(-1))
    # Penalising each row's best token moves greedy to the runner-up.
    best = int(logits[0].argmax())
    sampler = make_sampler(0.0, repetition_penalty=100.0)
    token = int(sampler(mx.array(logits[:1]), [best])[0])
    if logits[0, best] > 0:
        assert token == int(np.argsort(logits[0])[-2])
    # Temperature 0 ignores top-k / top-p.
    assert np.array_equal(np.array(make_sampler(0.0, top_k=3, top_p=0.1)(mx.array(logits))), logits.argmax(-1))


def test_seeded_draws_are_reproducible_and_independent_of_global_state():
    logits = mx.array(_logits(b=2))
    draws = []
    for _ in range(2):
        sampler = make_sampler(1.0, top_k=20, seed=123)
        mx.random.seed(np.random.randint(1 << 30))  # global state must not matter
        draws.append([np.array(sampler(logits)).tolist() for _ in range(20)])
    assert draws[0] == draws[1]
    other = make_sampler(1.0, top_k=20, seed=124)
    assert [np.array(other(logits)).tolist() for _ in range(20)] != draws[0]


def test_draws_follow_the_filtered_distribution():
    logits = _logits(b=1, seed=5)
    sampler = make_sampler(0.9, top_k=8, top_p=0.95, seed=7)
    n = 4000
    # One batched draw of n rows: the same filtered distribution per row.
    tokens = np.array(sampler(mx.array(np.repeat(logits, n, axis=0))))
    probs = np.array(mx.softmax(sampler.process(mx.array(logits)), axis=-1))[0]
    counts = np.bincount(tokens, minlength=V) / n
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(probs))  # never outside the set
    assert np.abs(counts - probs).max() < 0.03


def test_logprobs_and_shapes():
    logits = _logits(b=2)
    tokens, logprobs = make_sampler()(mx.array(logits), return_logprobs=True)
    ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.array(logprobs), ref[np.arange(2), logits.argmax(-1)], rtol=1e-5)
    assert tokens.shape == (2,) and tokens.dtype == mx.uint32
    one = make_sampler()(mx.array(logits[0]))  # [V] -> scalar
    assert one.shape == () and int(one) == int(logits[0].argmax())
    last = make_sampler()(mx.array(np.stack([logits, logits[::-1]], axis=1)))  # [B, T, V]
    assert np.array(last).tolist() == logits[::-1].argmax(-1).tolist()


def test_repetition_context_limits_the_window():
    logits = np.zeros((1, V), dtype=np.float32) + 1.0
    sampler = Sampler(temperature=0.0, repetition_penalty=2.0, repetition_context=2)
    out = np.array(sampler.process(mx.array(logits), [5, 6, 7]))[0]
    assert out[5] == 1.0 and out[6] == 0.5 and out[7] == 0.5
    batched = np.array(sampler.process(mx.array(np.ones((2, V), np.float32)), mx.array([[1, 2], [3, 4]])))
    assert batched[0, 1] == 0.5 and batched[0, 3] == 1.0 and batched[1, 3] == 0.5


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(repetition_penalty=0)])
def test_rejects_bad_settings(bad):
    with pytest.raises(ValueError):
        Sampler(**bad)
