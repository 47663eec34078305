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


# ---------------------------------------------------------------- the CUDA body, executed on CPU
# Each lane of a warp is an OS thread; warp collectives (__syncwarp, shuffles, votes) meet at a
# per-warp barrier. A WMMA fragment holds its whole 16x16 tile in every lane (each lane does the
# full tile product: redundant, but the body's indexing, masks, online softmax and split
# bookkeeping run exactly as written). T = float, so only the tensor-core rounding is not modelled.

_EMULATOR = r"""
#include <algorithm>
#include <array>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
using std::max;
using std::min;
struct U3 { unsigned x, y, z; };
using Shape = std::array<int32_t, 10>;
using Strides = std::array<int64_t, 10>;
struct Warp { std::barrier<>* bar; float f[32]; int i[32]; };
thread_local U3 blockIdx, threadIdx, blockDim;
thread_local Warp* W;
thread_local int LANE;
static void __syncwarp() { W->bar->arrive_and_wait(); }
static float __shfl_xor_sync(unsigned, float v, int o) {
  W->f[LANE] = v; __syncwarp(); float r = W->f[LANE ^ o]; __syncwarp(); return r;
}
static int __shfl_xor_sync(unsigned, int v, int o) {
  W->i[LANE] = v; __syncwarp(); int r = W->i[LANE ^ o]; __syncwarp(); return r;
}
static bool __any_sync(unsigned, bool p) {
  W->i[LANE] = p; __syncwarp(); bool r = false; for (int l = 0; l < 32; ++l) r = r || W->i[l]; __syncwarp(); return r;
}
#define __expf(x) std::exp(x)
#define __align__(n) __attribute__((aligned(n)))
static float __int_as_float(unsigned bits) { float f; std::memcpy(&f, &bits, 4); return f; }
namespace nvcuda { namespace wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {}; struct row_major {}; struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int N, int K, class T, class L = void> struct fragment { float x[256]; };
template <class Use, class T> void load_matrix_sync(fragment<Use, 16, 16, 16, T, row_major>& f, const T* p, unsigned ld) {
  for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = float(p[r * ld + c]);
}
template <class Use, class T> void load_matrix_sync(fragment<Use, 16, 16, 16, T, col_major>& f, const T* p, unsigned ld) {
  for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = float(p[c * ld + r]);
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ld, layout_t) {
  for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = p[r * ld + c];
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ld, layout_t) {
  __syncwarp();  // every lane holds the same tile: write it once
  if (LANE == 0) for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c) p[r * ld + c] = f.x[r * 16 + c];
  __syncwarp();
}
template <class F> void fill_fragment(F& f, float v) { for (float& e : f.x) e = v; }
template <class A, class B, class C> void mma_sync(C& d, const A& a, const B& b, const C& c) {
  float out[256];
  for (int r = 0; r < 16; ++r) for (int n = 0; n < 16; ++n) {
    float s = c.x[r * 16 + n];
    for (int k = 0; k < 16; ++k) s += a.x[r * 16 + k] * b.x[k * 16 + n];
    out[r * 16 + n] = s;
  }
  for (int e = 0; e < 256; ++e) d.x[e] = out[e];
}
}}  // namespace nvcuda::wmma
#define __shared__ static

template <typename T, int D>
static void attn_thread(const T* q, const Shape q_shape, const T* k, const Strides k_strides, const T* v,
                        const Strides v_strides, const int32_t* meta, const float* scale, float* o_part, float* ml) {
ATTN_BODY
}

template <typename T, int D>
static void combine_thread(const float* o_part, const Shape o_part_shape, const float* ml, T* out) {
COMBINE_BODY
}

extern "C" void run_attn(int blocks, const float* q, const int* qs, const float* k, const int64_t* ks, const float* v,
                         const int64_t* vs, const int32_t* meta, const float* scale, float* o_part, float* ml) {
  Shape q_shape{}; Strides k_strides{}, v_strides{};
  for (int i = 0; i < 4; ++i) { q_shape[i] = qs[i]; k_strides[i] = ks[i]; v_strides[i] = vs[i]; }
  for (int b = 0; b < blocks; ++b) {
    std::barrier<> b0(32), b1(32), b2(32), b3(32);
    std::barrier<>* bars[4] = {&b0, &b1, &b2, &b3};
    std::vector<Warp> warps(4);
    for (int w = 0; w < 4; ++w) warps[w].bar = bars[w];
    std::vector<std::thread> threads;
    for (int t = 0; t < 128; ++t) {
      threads.emplace_back([&, t] {
        blockIdx = U3{unsigned(b), 0, 0}; threadIdx = U3{unsigned(t), 0, 0}; blockDim = U3{128, 1, 1};
        W = &warps[t / 32]; LANE = t % 32;
        attn_thread<float, EMU_D>(q, q_shape, k, k_strides, v, v_strides, meta, scale, o_part, ml);
      });
    }
    for (auto& th : threads) th.join();
  }
}

extern "C" void run_combine(long total, const float* o_part, const int* ps, const float* ml, float* out) {
  Shape o_part_shape{};
  for (int i = 0; i < 5; ++i) o_part_shape[i] = ps[i];
  for (long g = 0; g < total; ++g) {
    blockIdx = U3{unsigned(g / 256), 0, 0}; threadIdx = U3{unsigned(g % 256), 0, 0}; blockDim = U3{256, 1, 1};
    combine_thread<float, EMU_D>(o_part, o_part_shape, ml, out);
  }
}
"""


def _emulator(tmp_path, head_dim):
    import ctypes

    if shutil.which("g++") is None:
        pytest.skip("g++ not installed: the CUDA body is executed only on the GPU machine")
    src = (_EMULATOR.replace("ATTN_BODY", ca.cuda()).replace("COMBINE_BODY", ca.cuda_combine())
           .replace("EMU_D", str(head_dim)))
    path = tmp_path / f"emu{head_dim}.cpp"
    path.write_text(src)
    lib = tmp_path / f"emu{head_dim}.so"
    proc = subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-o", str(lib), str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0 and "barrier: No such file" in proc.stderr:
        pytest.skip("this g++ has no C++20 <barrier>")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ctypes.CDLL(str(lib))


EMU_CASES = [  # B, Hq, Hkv, Tq, n_keys, capacity, D, target blocks (few = long splits)
    (1, 8, 2, 37, 300, 320, 64, ca.TARGET_BLOCKS),  # GQA 4: 148 rows -> 3 row tiles, 5 splits
    (1, 8, 2, 37, 300, 320, 64, 1),   # one split of 5 sub-tiles: the online-softmax rescale path
    (1, 4, 1, 9, 700, 768, 128, 3),   # head_dim 128, MQA, 3 splits of several sub-tiles
    (1, 2, 1, 5, 70, 70, 64, ca.TARGET_BLOCKS),  # buffer shorter than whole sub-tiles: host pads
    (2, 3, 3, 20, 20, 64, 32, ca.TARGET_BLOCKS),  # batch 2, first prefill (block = cache), D 32
]


@pytest.mark.parametrize("case", EMU_CASES)
def test_cuda_body_executed_on_cpu_equals_float64_attention(tmp_path, case):
    import ctypes

    B, Hq, Hkv, Tq, n_keys, cap, D, target = case
    lib = _emulator(tmp_path, D)
    q = _arr((B, Hq, Tq, D), 21)
    kb, vb = _arr((B, Hkv, cap, D), 22), _arr((B, Hkv, cap, D), 23)
    plan = ca.launch_plan(q, kb, vb, n_keys, target_blocks=target)
    qr, keys, values = (np.ascontiguousarray(np.array(plan[n]), dtype=np.float32) for n in ("q", "keys", "values"))
    o_part = np.full(plan["part_shape"], np.nan, np.float32)  # poisoned: every element must be written
    ml = np.full(plan["ml_shape"], np.nan, np.float32)
    out = np.full(plan["out_shape"], np.nan, np.float32)
    meta = np.array(plan["meta"], np.int32)
    scale = np.array([D**-0.5], np.float32)

    def ptr(a, ct=ctypes.c_float):
        return a.ctypes.data_as(ctypes.POINTER(ct))

    def strides(a):
        return np.array([s // a.itemsize for s in a.strides], np.int64)

    qs = np.array(qr.shape, np.int32)
    ks, vs = strides(keys), strides(values)
    lib.run_attn(ctypes.c_int(plan["blocks"]), ptr(qr), ptr(qs, ctypes.c_int), ptr(keys), ptr(ks, ctypes.c_int64),
                 ptr(values), ptr(vs, ctypes.c_int64), ptr(meta, ctypes.c_int32), ptr(scale), ptr(o_part), ptr(ml))
    ps = np.array(plan["part_shape"], np.int32)
    lib.run_combine(ctypes.c_long(out.size), ptr(o_part), ptr(ps, ctypes.c_int), ptr(ml), ptr(out))
    assert not np.isnan(o_part).any() and not np.isnan(ml).any() and not np.isnan(out).any()
    got = out[:, :, : plan["rows"]].reshape(B, Hq, Tq, D)
    want = _numpy_attention(np.array(q), np.array(kb), np.array(vb), D**-0.5, n_keys)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
