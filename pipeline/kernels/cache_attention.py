"""Attention of a block of new queries onto a growing KV cache, without per-shape set-up cost.

The streaming session prefills a frame (tens of tokens) or a prompt onto a cache that holds tens
of thousands of keys and grows every frame. MLX's CUDA `scaled_dot_product_attention` with more
than one query runs cuDNN, which builds an execution plan for every new (q, k, v, mask) shape
and stride and caches it: 40-66 ms the first time a key length is seen (issue 14, one H200),
0.34-0.44 ms after. A live cache shows it a new key length on every frame, so every prefill paid
the plan build. This op offers five ways to compute the same thing, chosen per call by `impl`:

  sdpa     `mx.fast.scaled_dot_product_attention` on the exact keys, mask "causal" (what the
           layers did before this op; one plan build per new key length on CUDA);
  bucket   the same kernel on the cache BUFFER cut at a bucket boundary (`BUCKET_TOKENS`) with
           an additive mask hiding keys past the live ones: the shapes cuDNN sees change once
           per bucket, not once per frame;
  matmul   plain matmul-softmax-matmul (`reference`): cuBLAS GEMMs, no cuDNN plan build;
  matmul_bucket  the same on the buffer cut at a bucket boundary, masked (cuBLAS sees few shapes);
  kernel   a fused split-K kernel (`cuda()` / `metal()`): every key length runs the same
           compiled kernel (token counts travel in a small `meta` input, never as template
           arguments), keys and values are read in place from the strided cache buffers.

Semantics (all five): q [B, Hq, Tq, D], keys/values [B, Hkv, >= n_keys, D] (GQA: Hq is a
multiple of Hkv; query head h reads KV head h // (Hq / Hkv)). The first `n_keys` keys are live;
the last Tq of them are the new block itself, so query i sees keys j <= n_keys - Tq + i (causal
inside the block, everything before it). Returns [B, Hq, Tq, D] in q's dtype. After an eviction
the cache is compacted in place (sinks, then the window, re-rotated: `rope_shift.py`), so the
sink + window layout is a contiguous key range here and needs no special case.

The kernel (CUDA; the Metal twin is a plain simdgroup version of the same split): grid = (64-row
query tiles of the G*Tq rows one KV head serves) x (key splits) x KV heads x batch. Each of the
4 warps of a block takes 16 query rows and walks its split's keys in sub-tiles of 64: S = Q K^T
and O += P V on tensor cores (WMMA bf16/fp16, fp32 accumulation), online softmax in fp32
between them. Splits write un-normalised partial outputs and (max, sum) per row; a second
launch combines the splits (log-sum-exp weights). Source of the maths: FlashAttention
(Dao et al. 2022) and its split-K decoding variant (Flash-Decoding, Dao et al. 2023).
Measured on one H200 (README "GPU fast path"): correct, no per-shape cost, but 3-6x slower than
`matmul_bucket` (1.6 ms a layer at 20k keys, ~14 TFLOP/s: every warp loads its K/V fragments
straight from global memory, 64-key sub-tiles, accumulator rescaled through shared memory); the
CUDA default is `matmul_bucket`.
"""

from __future__ import annotations

import functools
import math
import os

import mlx.core as mx
import numpy as np

from framecast.errors import UserError
from framecast.kernels import backend, build_kernel, kernel_verified

IMPLS = ("sdpa", "bucket", "matmul", "matmul_bucket", "kernel")
ENV_VAR = "FRAMECAST_ATTENTION"
# Per backend. CUDA: `matmul_bucket` had the lowest median at 1, 2 and 10 minutes and the lowest
# p95 everywhere in one H200 run (README "GPU fast path"; `bucket` pays a cuDNN plan build at
# each bucket crossing, the fused kernel is correct but 3-6x slower).
# CPU and Metal keep MLX's SDPA (no per-shape set-up there).
DEFAULT_IMPL = {"cuda": "matmul_bucket", "metal": "sdpa", "reference": "sdpa"}
BUCKET_TOKENS = 2048  # `bucket`: key lengths are rounded up to this (one plan per bucket)
SUB = 64  # kernel: keys per sub-tile (the online-softmax step)
ROWS_PER_BLOCK = 64  # kernel: 4 warps x 16 query rows
THREADS = 128
TARGET_BLOCKS = 1024  # kernel: enough blocks to fill an H200 (132 SMs) several times over
COMBINE_THREADS = 256
# Kernel vs reference on first use: max error / max |reference|. bf16 P (probabilities rounded
# to 8 bits before P V) and bf16 output: a few output ulps; wrong indexing is off by >= 0.1.
SELF_CHECK_TOLERANCE = {mx.float16: 1e-2, mx.bfloat16: 4e-2}


# ---------------------------------------------------------------- reference (pure MLX)


def _check(q: mx.array, k: mx.array, v: mx.array, n_keys: int) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"cache_attention: q, k, v must be 4-D, got {q.shape}, {k.shape}, {v.shape}")
    B, Hq, Tq, D = q.shape
    if k.shape[0] != B or k.shape[1] != v.shape[1] or Hq % k.shape[1] or k.shape[3] != D or v.shape[3] != D:
        raise ValueError(f"cache_attention: shapes do not fit: q {q.shape}, k {k.shape}, v {v.shape}")
    if not Tq <= n_keys <= min(k.shape[2], v.shape[2]):
        raise ValueError(f"cache_attention: n_keys = {n_keys} must be in [Tq = {Tq}, {min(k.shape[2], v.shape[2])}]")


@functools.lru_cache(maxsize=4)  # every layer of one forward asks for the same mask
def causal_bias(tq: int, n_keys: int, length: int, dtype: mx.Dtype) -> mx.array:
    """[tq, length] additive mask: 0 where query i sees key j (j <= n_keys - tq + i), -inf else."""
    return rows_causal_bias((n_keys - tq,), tq, length, dtype)[0, 0, 0]


@functools.lru_cache(maxsize=4)
def rows_causal_bias(starts: tuple[int, ...], tq: int, length: int, dtype: mx.Dtype) -> mx.array:
    """[B, 1, 1, tq, length] additive mask for rows whose new block starts at `starts[b]`:
    query i of row b sees key j when j <= starts[b] + i, -inf else (keys past a row's end too)."""
    j = mx.arange(length, dtype=mx.int32)  # [length]
    last = mx.array(starts, dtype=mx.int32)[:, None] + mx.arange(tq, dtype=mx.int32)[None, :]  # [B, tq]
    seen = j[None, None, :] <= last[:, :, None]  # [B, tq, length]
    return mx.where(seen, mx.array(0.0, dtype), mx.array(-math.inf, dtype))[:, None, None]


def reference(q: mx.array, k: mx.array, v: mx.array, *, scale: float, n_keys: int | None = None,
              length: int | None = None, bias: mx.array | None = None) -> mx.array:
    """Matmul-softmax-matmul: q [B, Hq, Tq, D], k/v [B, Hkv, >= n_keys, D] -> [B, Hq, Tq, D].

    Scores in q's dtype (as MLX's own SDPA fallback), softmax in fp32 (`precise`). `length`
    (>= n_keys): attend over that many buffer rows, the ones past n_keys masked (bucketing).
    `bias` [B, 1, 1, Tq, length] (`rows_causal_bias`): rows of their own lengths, in place of
    the causal mask at n_keys.
    """
    n_keys = k.shape[2] if n_keys is None else n_keys
    _check(q, k, v, n_keys)
    B, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    length = n_keys if length is None else length
    k, v = k[:, :, :length], v[:, :, :length]
    qg = (q * mx.array(scale, q.dtype)).reshape(B, Hkv, G * Tq, D)  # rows of one KV head together
    scores = qg @ k.transpose(0, 1, 3, 2)  # [B, Hkv, G*Tq, length]
    if bias is None and (Tq > 1 or length > n_keys):
        bias = causal_bias(Tq, n_keys, length, scores.dtype)
    if bias is not None:
        scores = (scores.reshape(B, Hkv, G, Tq, length) + bias).reshape(B, Hkv, G * Tq, length)
    probs = mx.softmax(scores, axis=-1, precise=True)
    return (probs @ v).reshape(B, Hq, Tq, D)


def bucketed(q: mx.array, keys: mx.array, values: mx.array, *, scale: float, n_keys: int,
             bucket: int = BUCKET_TOKENS) -> mx.array:
    """MLX SDPA on the buffer cut at the next bucket boundary, masked past `n_keys`.

    keys/values: the cache buffers [B, Hkv, capacity, D]; keys past `n_keys` are never seen.
    """
    _check(q, keys, values, n_keys)
    length = min(-(-n_keys // bucket) * bucket, keys.shape[2], values.shape[2])
    mask = causal_bias(q.shape[2], n_keys, length, q.dtype)[None, None]  # [1, 1, Tq, length]
    return mx.fast.scaled_dot_product_attention(q, keys[:, :, :length], values[:, :, :length],
                                                scale=scale, mask=mask)


# ---------------------------------------------------------------- kernels

_HEADER = "#include <mma.h>\n"

# Template args: T (bf16 | fp16), D (head_dim, a multiple of 16). Inputs: q [B, Hkv,
# R_pad, D] (the G*Tq rows of each KV head, padded to whole 64-row tiles, contiguous), k/v the
# strided cache buffers (`_strides` locate rows), meta int32 [5] = (n_keys, Tq, rows, chunk,
# n_splits), scale float32 [1]. Outputs: o_part float [B, Hkv, S, R_pad, D] (un-normalised),
# ml float [B, Hkv, S, R_pad, 2] (running max, sum of exp).
_CUDA_SOURCE = """
    using namespace nvcuda;
    constexpr int WARPS = 4;
    constexpr int SUBK = 64;
    constexpr int STAGE = D > SUBK ? D : SUBK;
    // WMMA pointers must be 32-byte aligned: so are the arrays and every per-warp slice.
    __shared__ __align__(32) float s_o[WARPS][16 * STAGE];  // S tile [16][SUBK], then O staging [16][D]
    __shared__ __align__(32) T s_p[WARPS][16 * SUBK];       // P tile, input dtype (tensor-core operand)
    __shared__ float s_alpha[WARPS][16];
    const float NEG_INF = __int_as_float(0xff800000);  // no <math.h> INFINITY under NVRTC

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int n_keys = meta[0];
    const int tq = meta[1];
    const int rows = meta[2];
    const int chunk = meta[3];
    const int n_splits = meta[4];
    const float sc = scale[0];
    const int hkv = q_shape[1];
    const int r_pad = q_shape[2];
    const int n_rb = r_pad / (16 * WARPS);
    int bid = blockIdx.x;
    const int rb = bid % n_rb;
    bid /= n_rb;
    const int split = bid % n_splits;
    bid /= n_splits;
    const int h = bid % hkv;
    const int b = bid / hkv;
    const int r0 = rb * 16 * WARPS + warp * 16;

    const T* qp = q + ((int64_t(b) * hkv + h) * r_pad + r0) * D;
    const T* kp = k + int64_t(b) * k_strides[0] + int64_t(h) * k_strides[1];
    const T* vp = v + int64_t(b) * v_strides[0] + int64_t(h) * v_strides[1];
    const int64_t ks = k_strides[2];
    const int64_t vs = v_strides[2];

    // Two lanes per row: lane owns row `row`, columns [c0, c0 + SUBK/2) of each sub-tile.
    const int row = lane >> 1;
    const int c0 = (lane & 1) * (SUBK / 2);
    const int r = r0 + row;
    const int limit = r < rows ? n_keys - tq + (r % tq) + 1 : n_keys;  // keys j < limit visible
    int warp_limit = limit;
    for (int o = 16; o > 0; o >>= 1) {
        warp_limit = max(warp_limit, __shfl_xor_sync(0xffffffffu, warp_limit, o));
    }
    const int k_begin = split * chunk;
    const int k_end = min(n_keys, min(k_begin + chunk, warp_limit));

    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qf[D / 16];
    for (int kk = 0; kk < D / 16; ++kk) {
        wmma::load_matrix_sync(qf[kk], qp + kk * 16, D);
    }
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> of[D / 16];
    for (int n = 0; n < D / 16; ++n) {
        wmma::fill_fragment(of[n], 0.0f);
    }
    float* so = s_o[warp];
    T* sp = s_p[warp];
    float* sa = s_alpha[warp];
    float m_run = NEG_INF;
    float l_run = 0.0f;

    for (int key0 = k_begin; key0 < k_end; key0 += SUBK) {
        // S = Q K^T over 64 keys; K^T is K read column-major straight from the buffer.
        for (int n = 0; n < SUBK / 16; ++n) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> sf;
            wmma::fill_fragment(sf, 0.0f);
            for (int kk = 0; kk < D / 16; ++kk) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kf;
                wmma::load_matrix_sync(kf, kp + int64_t(key0 + n * 16) * ks + kk * 16, (unsigned)ks);
                wmma::mma_sync(sf, qf[kk], kf, sf);
            }
            wmma::store_matrix_sync(so + n * 16, sf, SUBK, wmma::mem_row_major);
        }
        __syncwarp();
        // Online softmax in fp32 (keys past the row's limit, or past n_keys, weigh 0).
        float tile_max = NEG_INF;
        for (int c = 0; c < SUBK / 2; ++c) {
            const int j = key0 + c0 + c;
            const float s = (j < limit && j < k_end) ? so[row * SUBK + c0 + c] * sc : NEG_INF;
            so[row * SUBK + c0 + c] = s;
            tile_max = fmaxf(tile_max, s);
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        const float m_new = fmaxf(m_run, tile_max);
        const float alpha = m_new == NEG_INF ? 1.0f : __expf(m_run - m_new);
        float sum = 0.0f;
        for (int c = 0; c < SUBK / 2; ++c) {
            const float s = so[row * SUBK + c0 + c];
            const float p = s == NEG_INF ? 0.0f : __expf(s - m_new);
            sum += p;
            sp[row * SUBK + c0 + c] = static_cast<T>(p);
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        l_run = l_run * alpha + sum;
        m_run = m_new;
        if ((lane & 1) == 0) {
            sa[row] = alpha;
        }
        const bool rescale = __any_sync(0xffffffffu, alpha != 1.0f);
        __syncwarp();
        if (rescale) {  // the accumulator's row layout is opaque: scale it through shared memory
            for (int n = 0; n < D / 16; ++n) {
                wmma::store_matrix_sync(so + n * 16, of[n], D, wmma::mem_row_major);
            }
            __syncwarp();
            for (int e = lane; e < 16 * D; e += 32) {
                so[e] *= sa[e / D];
            }
            __syncwarp();
            for (int n = 0; n < D / 16; ++n) {
                wmma::load_matrix_sync(of[n], so + n * 16, D, wmma::mem_row_major);
            }
        }
        // O += P V
        for (int kk = 0; kk < SUBK / 16; ++kk) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pf;
            wmma::load_matrix_sync(pf, sp + kk * 16, SUBK);
            for (int n = 0; n < D / 16; ++n) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vf;
                wmma::load_matrix_sync(vf, vp + int64_t(key0 + kk * 16) * vs + n * 16, (unsigned)vs);
                wmma::mma_sync(of[n], pf, vf, of[n]);
            }
        }
        __syncwarp();
    }

    const int64_t part = (int64_t(b) * hkv + h) * n_splits + split;
    float* op = o_part + (part * r_pad + r0) * D;
    for (int n = 0; n < D / 16; ++n) {
        wmma::store_matrix_sync(op + n * 16, of[n], D, wmma::mem_row_major);
    }
    if ((lane & 1) == 0) {
        ml[(part * r_pad + r) * 2] = m_run;
        ml[(part * r_pad + r) * 2 + 1] = l_run;
    }
"""

# One thread per output element (b, h, row, d): weigh each split by exp(m_s - max_s m_s).
_CUDA_COMBINE = """
    const float NEG_INF = __int_as_float(0xff800000);
    const int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    const int n_splits = o_part_shape[2];
    const int r_pad = o_part_shape[3];
    const int64_t total = int64_t(o_part_shape[0]) * o_part_shape[1] * r_pad * D;
    if (g >= total) {
        return;
    }
    const int d = int(g % D);
    const int64_t row = g / D;              // (b * hkv + h) * r_pad + r
    const int64_t bh = row / r_pad;
    const int64_t r = row % r_pad;
    float m_max = NEG_INF;
    for (int s = 0; s < n_splits; ++s) {
        m_max = fmaxf(m_max, ml[((bh * n_splits + s) * r_pad + r) * 2]);
    }
    float num = 0.0f;
    float den = 0.0f;
    for (int s = 0; s < n_splits; ++s) {
        const int64_t at = (bh * n_splits + s) * r_pad + r;
        const float m = ml[at * 2];
        const float w = m == NEG_INF ? 0.0f : __expf(m - m_max);
        num += w * o_part[at * D + d];
        den += w * ml[at * 2 + 1];
    }
    out[g] = static_cast<T>(den > 0.0f ? num / den : 0.0f);
"""

# Metal twin: one simdgroup per (row, split); each lane holds D/32 dims of q and o, dot products
# are simd sums; same partial layout and the same combine.
_METAL_SOURCE = """
    constexpr int PER = D / 32;
    uint lane = thread_index_in_simdgroup;
    uint gid = thread_position_in_grid.x / 32;
    int n_keys = meta[0];
    int tq = meta[1];
    int rows = meta[2];
    int chunk = meta[3];
    int n_splits = meta[4];
    float sc = scale[0];
    int hkv = q_shape[1];
    int r_pad = q_shape[2];
    uint total = uint(q_shape[0]) * uint(hkv) * uint(n_splits) * uint(r_pad);
    if (gid >= total) {
        return;
    }
    int r = int(gid % uint(r_pad));
    uint rest = gid / uint(r_pad);
    int split = int(rest % uint(n_splits));
    rest /= uint(n_splits);
    int h = int(rest % uint(hkv));
    int b = int(rest / uint(hkv));
    int limit = r < rows ? n_keys - tq + (r % tq) + 1 : n_keys;
    int k_begin = split * chunk;
    int k_end = min(min(n_keys, k_begin + chunk), limit);
    size_t qoff = ((size_t(b) * hkv + h) * r_pad + r) * D;
    float qv[PER];
    float acc[PER];
    for (int i = 0; i < PER; ++i) {
        qv[i] = float(q[qoff + lane + 32 * i]) * sc;
        acc[i] = 0.0f;
    }
    size_t kb = size_t(b) * k_strides[0] + size_t(h) * k_strides[1];
    size_t vb = size_t(b) * v_strides[0] + size_t(h) * v_strides[1];
    float m_run = -INFINITY;
    float l_run = 0.0f;
    for (int j = k_begin; j < k_end; ++j) {
        float part = 0.0f;
        for (int i = 0; i < PER; ++i) {
            part += qv[i] * float(k[kb + size_t(j) * k_strides[2] + lane + 32 * i]);
        }
        float s = simd_sum(part);
        float m_new = max(m_run, s);
        float alpha = metal::exp(m_run - m_new);
        float p = metal::exp(s - m_new);
        l_run = l_run * alpha + p;
        for (int i = 0; i < PER; ++i) {
            acc[i] = acc[i] * alpha + p * float(v[vb + size_t(j) * v_strides[2] + lane + 32 * i]);
        }
        m_run = m_new;
    }
    size_t at = ((size_t(b) * hkv + h) * n_splits + split) * r_pad + r;
    for (int i = 0; i < PER; ++i) {
        o_part[at * D + lane + 32 * i] = acc[i];
    }
    if (lane == 0) {
        ml[at * 2] = m_run;
        ml[at * 2 + 1] = l_run;
    }
"""

_METAL_COMBINE = """
    uint g = thread_position_in_grid.x;
    int n_splits = o_part_shape[2];
    int r_pad = o_part_shape[3];
    uint total = uint(o_part_shape[0]) * uint(o_part_shape[1]) * uint(r_pad) * uint(D);
    if (g >= total) {
        return;
    }
    uint d = g % uint(D);
    uint row = g / uint(D);
    uint bh = row / uint(r_pad);
    uint r = row % uint(r_pad);
    float m_max = -INFINITY;
    for (int s = 0; s < n_splits; ++s) {
        m_max = max(m_max, ml[((bh * n_splits + s) * r_pad + r) * 2]);
    }
    float num = 0.0f;
    float den = 0.0f;
    for (int s = 0; s < n_splits; ++s) {
        uint at = (bh * n_splits + s) * r_pad + r;
        float m = ml[at * 2];
        float w = m == -INFINITY ? 0.0f : metal::exp(m - m_max);
        num += w * o_part[at * D + d];
        den += w * ml[at * 2 + 1];
    }
    out[g] = static_cast<T>(den > 0.0f ? num / den : 0.0f);
"""

INPUT_NAMES = ("q", "k", "v", "meta", "scale")
OUTPUT_NAMES = ("o_part", "ml")
COMBINE_INPUTS = ("o_part", "ml")
COMBINE_OUTPUTS = ("out",)


def cuda() -> str:
    """Body of the CUDA attention kernel (signature generated by `mx.fast.cuda_kernel`)."""
    return _CUDA_SOURCE


def cuda_combine() -> str:
    return _CUDA_COMBINE


def metal() -> str:
    """Body of the Metal attention kernel (signature generated by `mx.fast.metal_kernel`)."""
    return _METAL_SOURCE


def metal_combine() -> str:
    return _METAL_COMBINE


def split_plan(n_keys: int, blocks_per_split: int, target_blocks: int = TARGET_BLOCKS) -> tuple[int, int]:
    """(chunk, n_splits): keys per split (a multiple of SUB) so the grid has ~target_blocks blocks."""
    want = max(1, min(-(-target_blocks // max(1, blocks_per_split)), -(-n_keys // SUB)))
    chunk = -(-(-(-n_keys // want)) // SUB) * SUB
    return chunk, -(-n_keys // chunk)


def launch_plan(q: mx.array, keys: mx.array, values: mx.array, n_keys: int, *,
                target_blocks: int = TARGET_BLOCKS) -> dict:
    """Everything the kernels are launched with (shared by `kernel` and the CPU emulation test):
    q as [B, Hkv, R_pad, D] (rows of one KV head together, padded to whole 64-row tiles), the
    buffers (padded to whole 64-key sub-tiles if too short), meta, blocks and output shapes."""
    _check(q, keys, values, n_keys)
    B, Hq, Tq, D = q.shape
    Hkv = keys.shape[1]
    rows = (Hq // Hkv) * Tq
    r_pad = -(-rows // ROWS_PER_BLOCK) * ROWS_PER_BLOCK
    qr = q.reshape(B, Hkv, rows, D)
    if r_pad != rows:
        qr = mx.pad(qr, [(0, 0), (0, 0), (0, r_pad - rows), (0, 0)])
    # Sub-tiles read whole 64-key blocks: the buffers must reach the next multiple of 64 (the
    # cache's capacity does; an exact-length slice is padded, a copy, only on that path).
    need = -(-n_keys // SUB) * SUB
    if keys.shape[2] < need:
        keys = mx.pad(keys[:, :, :n_keys], [(0, 0), (0, 0), (0, need - n_keys), (0, 0)])
    if values.shape[2] < need:
        values = mx.pad(values[:, :, :n_keys], [(0, 0), (0, 0), (0, need - n_keys), (0, 0)])
    n_rb = r_pad // ROWS_PER_BLOCK
    chunk, n_splits = split_plan(n_keys, n_rb * Hkv * B, target_blocks)
    return {"q": qr, "keys": keys, "values": values, "meta": [n_keys, Tq, rows, chunk, n_splits],
            "blocks": n_rb * n_splits * Hkv * B, "rows": rows,
            "part_shape": (B, Hkv, n_splits, r_pad, D), "ml_shape": (B, Hkv, n_splits, r_pad, 2),
            "out_shape": (B, Hkv, r_pad, D)}


def kernel(kind: str, q: mx.array, keys: mx.array, values: mx.array, *, scale: float, n_keys: int) -> mx.array:
    """The fused op on `kind` ('cuda' | 'metal'); same contract as `reference` (bf16/fp16 on CUDA)."""
    plan = launch_plan(q, keys, values, n_keys)
    B, Hq, Tq, D = q.shape
    meta = mx.array(plan["meta"], dtype=mx.int32)
    sc = mx.array([scale], dtype=mx.float32)
    template = [("T", q.dtype), ("D", D)]
    if kind == "cuda":
        attn = build_kernel(kind, "framecast_cache_attention", INPUT_NAMES, OUTPUT_NAMES, cuda(),
                            row_contiguous=False, header=_HEADER)
        grid = (plan["blocks"] * THREADS, 1, 1)
        group = (THREADS, 1, 1)
        combine_src = cuda_combine()
    else:
        attn = build_kernel(kind, "framecast_cache_attention", INPUT_NAMES, OUTPUT_NAMES, metal(),
                            row_contiguous=False)
        grid = (int(np.prod(plan["ml_shape"][:4])) * 32, 1, 1)
        group = (256, 1, 1)
        combine_src = metal_combine()
    o_part, ml = attn(
        inputs=[plan["q"], plan["keys"], plan["values"], meta, sc], template=template, grid=grid,
        threadgroup=group, output_shapes=[plan["part_shape"], plan["ml_shape"]],
        output_dtypes=[mx.float32, mx.float32])
    combine = build_kernel(kind, "framecast_cache_attention_combine", COMBINE_INPUTS, COMBINE_OUTPUTS, combine_src)
    (out,) = combine(inputs=[o_part, ml], template=template, grid=(int(np.prod(plan["out_shape"])), 1, 1),
                     threadgroup=(COMBINE_THREADS, 1, 1), output_shapes=[plan["out_shape"]],
                     output_dtypes=[q.dtype])
    return out[:, :, :plan["rows"]].reshape(B, Hq, Tq, D)


def kernel_supported(kind: str, q: mx.array) -> bool:
    """The CUDA kernel runs on tensor cores: bf16/fp16 and head_dim a multiple of 16."""
    D = q.shape[-1]
    if kind == "cuda":
        return q.dtype in (mx.bfloat16, mx.float16) and D % 16 == 0
    return D % 32 == 0


def _kernel_ok(kind: str, dtype: mx.Dtype, head_dim: int) -> bool:
    """One-time check against the reference: GQA 4, 2 KV heads, 37 new rows on 300 keys."""

    def relative_error() -> float:
        rng = np.random.default_rng(0)
        q = mx.array(rng.standard_normal((1, 8, 37, head_dim)).astype(np.float32)).astype(dtype)
        kv = mx.array(rng.standard_normal((2, 1, 2, 384, head_dim)).astype(np.float32)).astype(dtype)
        got = kernel(kind, q, kv[0], kv[1], scale=head_dim**-0.5, n_keys=300).astype(mx.float32)
        want = reference(q.astype(mx.float32), kv[0].astype(mx.float32), kv[1].astype(mx.float32),
                         scale=head_dim**-0.5, n_keys=300)
        return float(mx.max(mx.abs(got - want)).item()) / float(mx.max(mx.abs(want)).item())

    key = ("cache_attention", kind, dtype, head_dim)
    return kernel_verified(key, relative_error, SELF_CHECK_TOLERANCE.get(dtype, 1e-3))


# ---------------------------------------------------------------- the public op


_IMPL_OVERRIDE: str | None = None


def set_impl(impl: str | None) -> None:
    """Force one implementation for this process (benchmarks); None = env / per-backend default."""
    global _IMPL_OVERRIDE
    if impl is not None and impl not in IMPLS:
        raise UserError(f"attention impl {impl!r}: expected one of {', '.join(IMPLS)}")
    _IMPL_OVERRIDE = impl


def current_impl() -> str:
    """The implementation prefill attention uses now: set_impl, then $FRAMECAST_ATTENTION, then
    the per-backend default."""
    if _IMPL_OVERRIDE is not None:
        return _IMPL_OVERRIDE
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env:
        if env not in IMPLS:
            raise UserError(f"{ENV_VAR}={env!r}: expected one of {', '.join(IMPLS)}")
        return env
    return DEFAULT_IMPL[backend()]


def cache_attention(q: mx.array, keys: mx.array, values: mx.array, *, scale: float,
                    buffers: tuple[mx.array, mx.array] | None = None, impl: str | None = None) -> mx.array:
    """Attention of q [B, Hq, Tq, D] onto the live keys/values [B, Hkv, n_keys, D] (the last Tq
    keys are q's own block, causal inside it) -> [B, Hq, Tq, D].

    `buffers`: the cache's whole (keys, values) buffers [B, Hkv, capacity, D] whose first
    n_keys rows are `keys`/`values`; `bucket` and `kernel` read them in place. One query (decode)
    always takes MLX's SDPA vector kernel, which has no per-shape set-up.
    """
    n_keys = keys.shape[2]
    tq = q.shape[2]
    if tq == 1:
        return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale)
    impl = impl or current_impl()
    kb, vb = buffers if buffers is not None else (keys, values)
    if impl == "bucket":
        return bucketed(q, kb, vb, scale=scale, n_keys=n_keys)
    if impl == "matmul_bucket":
        length = min(-(-n_keys // BUCKET_TOKENS) * BUCKET_TOKENS, kb.shape[2], vb.shape[2])
        return reference(q, kb, vb, scale=scale, n_keys=n_keys, length=length)
    if impl == "matmul":
        return reference(q, keys, values, scale=scale, n_keys=n_keys)
    if impl == "kernel":
        kind = backend()
        if kind != "reference" and kernel_supported(kind, q) and _kernel_ok(kind, q.dtype, q.shape[-1]):
            return kernel(kind, q, kb, vb, scale=scale, n_keys=n_keys)
        return reference(q, keys, values, scale=scale, n_keys=n_keys)
    return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask="causal")
