"""Dequantise the live prefix of a quantised KV cache: keys and values, in place, one launch.

Why this op (read from `pipeline/model/cache.py`): `QuantizedKVCache.update_and_fetch` hands
the layers the whole cache dequantised, at every step of every layer, so this is the per-token
cost of the quantised cache. The reference, `mx.dequantize` on `buffer[..., :end, :]` for the
packed words, scales and biases of K and of V, does more work than the maths needs: the
buffers are preallocated along T (capacity > end), so each slice is a strided view, and MLX's
GPU dequantise first copies every non-contiguous input into a contiguous one (CUDA:
`ensure_row_contiguous` on all three). Per layer per token that is 6 copies + 2 dequantise
launches and one extra read and write of the whole packed cache (8-bit, 4 KV heads x 128 x
8k tokens: 8 MB of the 40 MB moved per layer). The kernel reads the strided buffers where they
are and writes both outputs in one launch: 1 launch instead of 8, ~40% (8-bit) / ~30% (4-bit)
less memory traffic. `mx.dequantize` on a contiguous input is already a single fused kernel;
what this op fuses is the slice copies and the K/V pair.

One interface, chosen once by `pipeline.kernels.backend()`:
  `dequantize_kv(keys, values, *, end, bits, group_size, dtype) -> (k, v)`, each [B, H, end, D]
where `keys` / `values` are `mx.quantize` triples (packed uint32 [B, H, cap, D*bits/32],
scales and biases [B, H, cap, D/group_size]) and w = scale * q + bias (affine, LSB first).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from framecast.kernels import backend, build_kernel, kernel_verified

THREADGROUP = 256  # one thread per packed 32-bit word (4 values at 8 bits, 8 at 4 bits)
# Kernel vs reference, relative to max |w|: the kernel rounds scale*q+bias once from fp32, MLX's
# GPU dequantise computes `T(q) * scale + bias` in the output dtype (product and sum each
# rounded, the product up to ~2x larger than the result), so they may differ by a few output
# ulps (fp16 2^-10, bf16 2^-7); a wrong word, group or shift is off by >= 0.1.
SELF_CHECK_TOLERANCE = {mx.float32: 2e-6, mx.float16: 4e-3, mx.bfloat16: 3.2e-2}

INPUT_NAMES = ("kq", "ks", "kb", "vq", "vs", "vb")
OUTPUT_NAMES = ("k_out", "v_out")


def reference(keys: tuple, values: tuple, *, end: int, bits: int, group_size: int,
              dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
    """(k, v) [B, H, end, D] in `dtype`: exactly what QuantizedKVCache fetched before this op."""

    def one(q: tuple) -> mx.array:
        parts = [t[..., :end, :] for t in q]
        return mx.dequantize(*parts, group_size=group_size, bits=bits).astype(dtype)

    return one(keys), one(values)


# Thread g < n_words decodes word g of K, the others word g - n_words of V. A word never spans
# two groups (group_size is a multiple of 32 values), so it needs one scale and one bias.
# Inputs are the strided views themselves; `_strides` locate rows inside the capacity.
# Template args: T (output dtype), BITS, GROUP (group_size), WORDS (packed words per row).

_METAL_SOURCE = """
    constexpr int PER = 32 / BITS;
    uint g = thread_position_in_grid.x;
    uint n_tok = uint(kq_shape[2]);
    uint heads = uint(kq_shape[1]);
    uint n_words = uint(kq_shape[0]) * heads * n_tok * uint(WORDS);
    if (g >= 2 * n_words) {
        return;
    }
    bool is_v = g >= n_words;
    uint w = is_v ? g - n_words : g;
    uint word = w % uint(WORDS);
    uint row = w / uint(WORDS);
    size_t t = row % n_tok;
    size_t h = (row / n_tok) % heads;
    size_t b = row / (n_tok * heads);
    size_t grp = word * PER / GROUP;
    uint32_t packed;
    float scale, bias;
    if (is_v) {
        packed = vq[b * vq_strides[0] + h * vq_strides[1] + t * vq_strides[2] + word * vq_strides[3]];
        scale = float(vs[b * vs_strides[0] + h * vs_strides[1] + t * vs_strides[2] + grp * vs_strides[3]]);
        bias = float(vb[b * vb_strides[0] + h * vb_strides[1] + t * vb_strides[2] + grp * vb_strides[3]]);
    } else {
        packed = kq[b * kq_strides[0] + h * kq_strides[1] + t * kq_strides[2] + word * kq_strides[3]];
        scale = float(ks[b * ks_strides[0] + h * ks_strides[1] + t * ks_strides[2] + grp * ks_strides[3]]);
        bias = float(kb[b * kb_strides[0] + h * kb_strides[1] + t * kb_strides[2] + grp * kb_strides[3]]);
    }
    device T* out = is_v ? v_out : k_out;
    size_t o = size_t(row) * (WORDS * PER) + word * PER;
    for (int j = 0; j < PER; ++j) {
        float q = float((packed >> (BITS * j)) & ((1u << BITS) - 1u));
        out[o + j] = static_cast<T>(scale * q + bias);
    }
"""

_CUDA_SOURCE = """
    constexpr int PER = 32 / BITS;
    const int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t n_tok = kq_shape[2];
    const int64_t heads = kq_shape[1];
    const int64_t n_words = int64_t(kq_shape[0]) * heads * n_tok * WORDS;
    if (g >= 2 * n_words) {
        return;
    }
    const bool is_v = g >= n_words;
    const int64_t w = is_v ? g - n_words : g;
    const int64_t word = w % WORDS;
    const int64_t row = w / WORDS;
    const int64_t t = row % n_tok;
    const int64_t h = (row / n_tok) % heads;
    const int64_t b = row / (n_tok * heads);
    const int64_t grp = word * PER / GROUP;
    uint32_t packed;
    float scale, bias;
    if (is_v) {
        packed = vq[b * vq_strides[0] + h * vq_strides[1] + t * vq_strides[2] + word * vq_strides[3]];
        scale = static_cast<float>(vs[b * vs_strides[0] + h * vs_strides[1] + t * vs_strides[2] + grp * vs_strides[3]]);
        bias = static_cast<float>(vb[b * vb_strides[0] + h * vb_strides[1] + t * vb_strides[2] + grp * vb_strides[3]]);
    } else {
        packed = kq[b * kq_strides[0] + h * kq_strides[1] + t * kq_strides[2] + word * kq_strides[3]];
        scale = static_cast<float>(ks[b * ks_strides[0] + h * ks_strides[1] + t * ks_strides[2] + grp * ks_strides[3]]);
        bias = static_cast<float>(kb[b * kb_strides[0] + h * kb_strides[1] + t * kb_strides[2] + grp * kb_strides[3]]);
    }
    T* out = is_v ? v_out : k_out;
    const int64_t o = row * (WORDS * PER) + word * PER;
    for (int j = 0; j < PER; ++j) {
        const float q = static_cast<float>((packed >> (BITS * j)) & ((1u << BITS) - 1u));
        out[o + j] = static_cast<T>(scale * q + bias);
    }
"""


def metal() -> str:
    """Body of the Metal kernel (signature generated by `mx.fast.metal_kernel`)."""
    return _METAL_SOURCE


def cuda() -> str:
    """Body of the CUDA kernel (signature generated by `mx.fast.cuda_kernel`)."""
    return _CUDA_SOURCE


def _views(keys: tuple, values: tuple, end: int) -> list[mx.array]:
    views = [t[..., :end, :] for t in (*keys, *values)]  # strided: no copy
    kq, ks, kb, vq, vs, vb = views
    if kq.ndim != 4 or kq.shape != vq.shape or ks.shape != vs.shape or ks.shape != kb.shape or vs.shape != vb.shape:
        raise ValueError(f"dequantize_kv: mismatched K/V quantised shapes "
                         f"{kq.shape} {ks.shape} / {vq.shape} {vs.shape}")
    return views


def kernel(kind: str, keys: tuple, values: tuple, *, end: int, bits: int, group_size: int,
           dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
    """The fused op on `kind` ('metal' | 'cuda'); same contract as `reference`."""
    if bits not in (2, 4, 8) or group_size % 32:
        raise ValueError(f"dequantize_kv: bits={bits} group_size={group_size} not supported by the kernel")
    views = _views(keys, values, end)
    B, H, n, W = views[0].shape
    D = W * 32 // bits
    if B * H * n == 0:
        empty = mx.zeros((B, H, n, D), dtype=dtype)
        return empty, empty
    source = metal() if kind == "metal" else cuda()
    fn = build_kernel(kind, "framecast_dequantize_kv", INPUT_NAMES, OUTPUT_NAMES, source, row_contiguous=False)
    threads = 2 * B * H * n * W
    k, v = fn(
        inputs=views,
        template=[("T", dtype), ("BITS", bits), ("GROUP", group_size), ("WORDS", W)],
        grid=(threads, 1, 1),
        threadgroup=(min(THREADGROUP, threads), 1, 1),
        output_shapes=[(B, H, n, D), (B, H, n, D)],
        output_dtypes=[dtype, dtype],
    )
    return k, v  # [B, H, end, D] each


def _kernel_ok(kind: str, dtype: mx.Dtype, head_dim: int, bits: int, group_size: int) -> bool:
    """One-time check of the kernel for this (dtype, bits, group) against the reference, on
    buffers with spare capacity so the strided path is what gets checked."""

    def relative_error() -> float:
        rng = np.random.default_rng(0)
        k, v = (mx.array(rng.standard_normal((2, 2, 12, head_dim)).astype(np.float32)).astype(dtype)
                for _ in range(2))
        qk = tuple(mx.quantize(k, group_size=group_size, bits=bits))
        qv = tuple(mx.quantize(v, group_size=group_size, bits=bits))
        got = kernel(kind, qk, qv, end=7, bits=bits, group_size=group_size, dtype=dtype)
        want = reference(qk, qv, end=7, bits=bits, group_size=group_size, dtype=dtype)
        scale = float(mx.max(mx.abs(want[0].astype(mx.float32))).item())
        return max(float(mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))).item())
                   for a, b in zip(got, want)) / scale

    key = ("dequantize_kv", kind, dtype, head_dim, bits, group_size)
    return kernel_verified(key, relative_error, SELF_CHECK_TOLERANCE.get(dtype, 1e-6))


def dequantize_kv(keys: tuple, values: tuple, *, end: int, bits: int, group_size: int,
                  dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
    """(k, v) [B, H, end, D] in `dtype` from the quantised buffers' first `end` tokens."""
    kind = backend()
    head_dim = keys[0].shape[-1] * 32 // bits
    # Measured on an H200 (scripts/bench_kernels.py, 4 KV heads x 128 x 8k): the CUDA kernel is
    # 1.18x the reference for 8-bit but 0.77-0.94x for 4-bit, so 4-bit keeps MLX's own path there.
    if kind == "cuda" and bits == 4:
        kind = "reference"
    if kind != "reference" and _kernel_ok(kind, dtype, head_dim, bits, group_size):
        return kernel(kind, keys, values, end=end, bits=bits, group_size=group_size, dtype=dtype)
    return reference(keys, values, end=end, bits=bits, group_size=group_size, dtype=dtype)
