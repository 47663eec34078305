"""Prefill-over-cache attention (`framecast.kernels.cache_attention`): every implementation
against an independent float64 numpy attention on CPU; the CUDA body compiled with nvcc; the
real kernel against the reference on a GPU machine; the model's layers unchanged by the switch."""

from __future__ import annotations

import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest

import framecast.kernels.cache_attention as ca
from framecast.errors import UserError
from framecast.model.cache import KVCache

CUDA = mx.cuda.is_available()


def _arr(shape, seed, dtype=mx.float32):
    return mx.array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32)).astype(dtype)


def _numpy_attention(q, k, v, scale, n_keys):
    """float64, one query head at a time, explicit loops over the causal limit per query."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, Hq, Tq, D = q.shape
    G = Hq // k.shape[1]
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(Hq):
            for i in range(Tq):
                last = n_keys - Tq + i  # the query's own position in the cache
                s = k[b, h // G, : last + 1] @ q[b, h, i] * scale
                p = np.exp(s - s.max())
                out[b, h, i] = (p / p.sum()) @ v[b, h // G, : last + 1]
    return out


CASES = [  # B, Hq, Hkv, Tq, n_keys, capacity, D
    (1, 8, 2, 5, 40, 64, 16),     # GQA 4, short cache, spare capacity
    (1, 4, 4, 17, 17, 17, 32),    # no cache before the block (a first prefill), MHA
    (2, 6, 3, 3, 300, 512, 8),    # batch 2, GQA 2, a long cache
    (1, 4, 1, 67, 1000, 1024, 16),  # a frame's 67 tokens, MQA
]


@pytest.mark.parametrize("impl", ca.IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_every_impl_equals_float64_attention(impl, case):
    B, Hq, Hkv, Tq, n_keys, cap, D = case
    q = _arr((B, Hq, Tq, D), 1)
    kb, vb = _arr((B, Hkv, cap, D), 2), _arr((B, Hkv, cap, D), 3)
    want = _numpy_attention(np.array(q), np.array(kb), np.array(vb), D**-0.5, n_keys)
    got = ca.cache_attention(q, kb[:, :, :n_keys], vb[:, :, :n_keys], scale=D**-0.5, buffers=(kb, vb), impl=impl)
    assert got.shape == (B, Hq, Tq, D) and got.dtype == q.dtype
    np.testing.assert_allclose(np.array(got), want, rtol=2e-4, atol=2e-5)


def test_bucket_never_sees_keys_past_the_live_ones():
    """Garbage (huge values, as a trimmed tail could hold) past n_keys changes nothing."""
    q = _arr((1, 4, 6, 16), 4)
    kb, vb = _arr((1, 2, 2048, 16), 5), _arr((1, 2, 2048, 16), 6)
    clean = ca.bucketed(q, kb, vb, scale=0.25, n_keys=100)
    dirty_k = mx.concatenate([kb[:, :, :100], mx.full((1, 2, 1948, 16), 1e4)], axis=2)
    dirty_v = mx.concatenate([vb[:, :, :100], mx.full((1, 2, 1948, 16), 1e4)], axis=2)
    np.testing.assert_allclose(np.array(ca.bucketed(q, dirty_k, dirty_v, scale=0.25, n_keys=100)),
                               np.array(clean), rtol=1e-5, atol=1e-6)


def test_one_query_takes_the_decode_path_and_matches():
    q = _arr((1, 4, 1, 16), 7)
    k, v = _arr((1, 2, 50, 16), 8), _arr((1, 2, 50, 16), 9)
    want = _numpy_attention(np.array(q), np.array(k), np.array(v), 0.25, 50)
    for impl in ca.IMPLS:
        np.testing.assert_allclose(np.array(ca.cache_attention(q, k, v, scale=0.25, impl=impl)), want,
                                   rtol=2e-4, atol=2e-5)


def test_split_plan_covers_every_key_in_whole_sub_tiles():
    for n_keys in (1, 63, 64, 65, 1000, 20_182, 40_282):
        for blocks in (1, 8, 40, 5000):
            chunk, n_splits = ca.split_plan(n_keys, blocks)
            assert chunk % ca.SUB == 0 and chunk > 0
            assert (n_splits - 1) * chunk < n_keys <= n_splits * chunk


def test_impl_switch_and_bad_values(monkeypatch):
    monkeypatch.setenv(ca.ENV_VAR, "matmul")
    assert ca.current_impl() == "matmul"
    ca.set_impl("kernel")
    try:
        assert ca.current_impl() == "kernel"
    finally:
        ca.set_impl(None)
    monkeypatch.setenv(ca.ENV_VAR, "fast")
    with pytest.raises(UserError, match="FRAMECAST_ATTENTION"):
        ca.current_impl()
    with pytest.raises(UserError):
        ca.set_impl("nope")


def test_layers_give_the_same_logits_with_every_impl(tmp_path):
    """A frame + prompt streamed onto a cache: logits agree across implementations."""
    from framecast.model.load import load_model
    from framecast.testing import make_tiny_minicpmv

    make_tiny_minicpmv(tmp_path, "4.5")
    lm = load_model(str(tmp_path)).language_model
    ids = mx.array([list(range(3, 40))], dtype=mx.int32)
    outs = {}
    for impl in ca.IMPLS:
        ca.set_impl(impl)
        try:
            cache = [KVCache(step=64) for _ in lm.layers]
            lm(ids[:, :20], cache=cache)
            outs[impl] = np.array(lm(ids[:, 20:], cache=cache))
        finally:
            ca.set_impl(None)
    for impl in ca.IMPLS:
        np.testing.assert_allclose(outs[impl], outs["sdpa"], rtol=1e-4, atol=1e-4)


def test_cuda_body_compiles_with_nvcc(tmp_path):
    """The attention and combine bodies wrapped as `mx.fast.cuda_kernel` wraps them, compiled
    for sm_90 (bf16 and fp16, head_dim 128 / 64 / 96), no GPU needed."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: the CUDA source is compiled only on the GPU machine")
    from test_kernels import _NVCC_PRELUDE, _cuda_wrap

    src = []
    for i, (ct, d) in enumerate([("__nv_bfloat16", 128), ("__half", 64), ("__nv_bfloat16", 96)]):
        src.append(_cuda_wrap(f"attn_{i}", ca.cuda(), [("q", ct), ("k", ct), ("v", ct), ("meta", "int32_t"),
                                                        ("scale", "float")],
                              [("o_part", "float"), ("ml", "float")], [("T", ct), ("D", str(d))]))
        src.append(_cuda_wrap(f"combine_{i}", ca.cuda_combine(), [("o_part", "float"), ("ml", "float")],
                              [("out", ct)], [("T", ct), ("D", str(d))]))
    path = tmp_path / "attn.cu"
    path.write_text(_NVCC_PRELUDE + ca._HEADER + "\n".join(src))
    proc = subprocess.run(["nvcc", "-c", "-arch=sm_90", "-std=c++17", "-o", str(tmp_path / "a.o"), str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


GPU_CASES = [  # B, Hq, Hkv, Tq, n_keys, capacity, D
    (1, 32, 8, 67, 20_182, 20_480, 128),  # MiniCPM-V 4.5 frame onto 5 minutes of context
    (1, 32, 8, 15, 4_102, 4_352, 128),    # a narration prompt onto 1 minute
    (1, 8, 2, 37, 300, 384, 128),
    (2, 14, 2, 9, 1000, 1024, 64),        # batch 2, GQA 7, head_dim 64
    (1, 28, 4, 128, 128, 256, 128),       # a first prefill: the block is the whole cache
]


@pytest.mark.skipif(not CUDA, reason="no CUDA GPU on this machine: the fused kernel runs only on the GPU "
                                     "machine (the reference is tested above)")
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("case", GPU_CASES)
def test_cuda_kernel_equals_reference(case, dtype):
    B, Hq, Hkv, Tq, n_keys, cap, D = case
    q = _arr((B, Hq, Tq, D), 11, dtype)
    kb, vb = _arr((B, Hkv, cap, D), 12, dtype), _arr((B, Hkv, cap, D), 13, dtype)
    got = ca.kernel("cuda", q, kb, vb, scale=D**-0.5, n_keys=n_keys).astype(mx.float32)
    want = ca.reference(q.astype(mx.float32), kb.astype(mx.float32), vb.astype(mx.float32), scale=D**-0.5,
                        n_keys=n_keys)
    err = float(mx.max(mx.abs(got - want)).item()) / float(mx.max(mx.abs(want)).item())
    assert not np.isnan(np.array(got)).any()
    assert err < ca.SELF_CHECK_TOLERANCE[dtype], err
