"""Quantised matmul for a few rows: y = x @ dequantize(w).T, x with 1-64 rows (decode, batched decode).

Why this op (issue 15): several streams decode together, so every linear layer of the LM sees
one row per stream. With 2-64 rows the work is still a weight read: each weight word should be
loaded and dequantised once and used for every row, which is what this kernel does.

Measured on one H200 (MLX 0.32.4 CUDA, 2026-12-01; README "A few-rows 4-bit matmul"): the
kernel equals MLX's op but is not faster (0.98x at 4 rows, 0.05-0.21x at 16-64), while MLX's
op itself is slower at 4 rows than at 16. Hence `FRAMECAST_QMM_ROWS=pad`, which pads 2-15 rows
to `PAD_ROWS` for MLX's op. A second measurement (2026-12-01, session 2) found padding slower on a
small layer (3584 -> 3584), so `=pad-large` pads only large weights (`PAD_LARGE_MIN_BYTES`; not yet
measured). All stay opt-in; the default is MLX's op as it is.

Layout: one warp (CUDA) / SIMD group (Metal) per COLS consecutive output columns (4 up to 8
rows, 2 at 16, 1 from 32: `COLS_BY_ROWS`). Lane l takes the packed words l, l + 32, ... of each
of its columns' rows of `w`, dequantises each word's 32/bits values once in fp32 (affine, LSB
first: w = scale * q + bias, MLX's `mx.quantize` format), reads the same slice of each row of x
once for all COLS columns and keeps one fp32 sum per (column, row); a warp reduction finishes
each. 1-64 rows (1: the decode GEMV). The version measured on 2026-12-01 had COLS = 1 and no
1-row bucket; this one was measured on 2026-12-01 (session 2): 0.66-0.96x MLX's op for 1-8
rows, 0.19-0.70x for 12-64 (3584 -> 3584, fp16), still not faster.

One interface, chosen once by `framecast.kernels.backend()`:
  `quantized_rows_matmul(x, w, scales, biases, *, group_size, bits) -> y`
x [..., K] (1-`MAX_ROWS` rows in all), w uint32 [N, K*bits/32], scales and biases
[N, K/group_size] -> y [..., N] in x's dtype; the same contract as
`mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=..., bits=...)` when
scales share x's dtype (mixed dtypes stay with MLX's op, which promotes), which is the
reference and what every other shape, the CPU and CI run. Not for decoder layers compiled
shapeless (`FRAMECAST_COMPILE=on`: a trace would keep its first row count): `compile_layers`
refuses the pair in one line.

`scripts/bench_kernels.py --op quantized_rows` compares MLX's op, the padding and the kernel
on the GPU machine.
"""

from __future__ import annotations

import functools
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from framecast.errors import UserError
from framecast.kernels import backend, build_kernel, kernel_verified

ENV_VAR = "FRAMECAST_QMM_ROWS"  # "mlx" (default) | "pad" | "pad-large" | "kernel"
MODES = ("mlx", "pad", "pad-large", "kernel")
MAX_ROWS = 64
# "pad": 2..PAD_ROWS-1 rows are padded with zero rows to PAD_ROWS before MLX's op, whose
# few-rows path was measured slower than its PAD_ROWS-rows one on the H200 (see README)
PAD_ROWS = 16
# "pad-large": pad only layers whose packed weight is at least this many bytes. Measured on the
# H200 (fp16, 4 bits): padding 2-12 rows to 16 lost on a 3584 -> 3584 layer (6.4 MB: 0.58-0.80x
# MLX's op) and won on a 3584 -> 18944 one (34 MB: MLX's op 0.206 ms at 4 rows, 0.111 ms at 16).
# The line is a guess between those two measured sizes.
PAD_LARGE_MIN_BYTES = 16 << 20
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # one compiled instance per bucket; rows past M are skipped
# output columns per warp, by row bucket: each x slice a lane reads serves COLS columns (the first
# design, one column a warp, re-read x per column and lost to MLX's op from 16 rows on); the fp32
# accumulators (COLS x ROWS a lane) bound it for many rows
COLS_BY_ROWS = {1: 4, 2: 4, 4: 4, 8: 4, 16: 2, 32: 1, 64: 1}
WARPS = 8  # warps (SIMD groups) per thread group, each on COLS columns
SUPPORTED_BITS = (2, 4, 8)
# Kernel vs reference, relative to max |y|: both sum in fp32, in different orders, then round
# once to the output dtype; a wrong word, group or shift is off by far more.
SELF_CHECK_TOLERANCE = {mx.float32: 1e-4, mx.float16: 4e-3, mx.bfloat16: 3.2e-2}
SELF_CHECK_ROWS = (1, 3, 16, 33)  # one row count per COLS_BY_ROWS value (4, 4, 2, 1), partial buckets

INPUT_NAMES = ("x", "w", "scales", "biases")
OUTPUT_NAMES = ("y",)

_CUDA_SOURCE = """
    constexpr int PER = 32 / BITS;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int64_t n0 = (int64_t(blockIdx.x) * WARPS + warp) * COLS;  // this warp's first column
    const int64_t N = w_shape[0];
    const int64_t K = x_shape[1];
    const int M = int(x_shape[0]);
    if (n0 >= N) {
        return;  // the whole warp leaves together: n0 is the same for its 32 lanes
    }
    float acc[COLS][ROWS];
    #pragma unroll
    for (int c = 0; c < COLS; ++c) {
        #pragma unroll
        for (int m = 0; m < ROWS; ++m) {
            acc[c][m] = 0.0f;
        }
    }
    const int64_t groups = K / GROUP;
    for (int64_t word = lane; word < WORDS; word += 32) {
        const int64_t g = word * PER / GROUP;
        float wv[COLS][PER];  // this word of each column, dequantised once for every row
        #pragma unroll
        for (int c = 0; c < COLS; ++c) {
            const int64_t n = n0 + c;
            const uint32_t packed = n < N ? w[n * WORDS + word] : 0u;
            const float s = n < N ? static_cast<float>(scales[n * groups + g]) : 0.0f;
            const float b = n < N ? static_cast<float>(biases[n * groups + g]) : 0.0f;
            #pragma unroll
            for (int j = 0; j < PER; ++j) {
                wv[c][j] = s * static_cast<float>((packed >> (BITS * j)) & ((1u << BITS) - 1u)) + b;
            }
        }
        const int64_t k0 = word * PER;
        #pragma unroll
        for (int m = 0; m < ROWS; ++m) {
            if (m < M) {
                const T* xr = x + int64_t(m) * K + k0;
                float xv[PER];  // read once, used for every column of the warp
                #pragma unroll
                for (int j = 0; j < PER; ++j) {
                    xv[j] = static_cast<float>(xr[j]);
                }
                #pragma unroll
                for (int c = 0; c < COLS; ++c) {
                    float sum = 0.0f;
                    #pragma unroll
                    for (int j = 0; j < PER; ++j) {
                        sum += xv[j] * wv[c][j];
                    }
                    acc[c][m] += sum;
                }
            }
        }
    }
    #pragma unroll
    for (int c = 0; c < COLS; ++c) {
        #pragma unroll
        for (int m = 0; m < ROWS; ++m) {
            float v = acc[c][m];
            for (int off = 16; off > 0; off >>= 1) {
                v += __shfl_down_sync(0xffffffff, v, off);
            }
            if (lane == 0 && m < M && n0 + c < N) {
                y[int64_t(m) * N + n0 + c] = static_cast<T>(v);
            }
        }
    }
"""

_METAL_SOURCE = """
    constexpr int PER = 32 / BITS;
    uint lane = thread_index_in_simdgroup;
    uint n0 = (threadgroup_position_in_grid.x * WARPS + simdgroup_index_in_threadgroup) * COLS;
    uint N = w_shape[0];
    uint K = x_shape[1];
    int M = int(x_shape[0]);
    if (n0 >= N) {
        return;
    }
    float acc[COLS][ROWS];
    for (int c = 0; c < COLS; ++c) {
        for (int m = 0; m < ROWS; ++m) {
            acc[c][m] = 0.0f;
        }
    }
    uint groups = K / GROUP;
    for (uint word = lane; word < uint(WORDS); word += 32) {
        uint g = word * PER / GROUP;
        float wv[COLS][PER];
        for (int c = 0; c < COLS; ++c) {
            uint n = n0 + c;
            uint32_t packed = n < N ? w[size_t(n) * WORDS + word] : 0u;
            float s = n < N ? float(scales[size_t(n) * groups + g]) : 0.0f;
            float b = n < N ? float(biases[size_t(n) * groups + g]) : 0.0f;
            for (int j = 0; j < PER; ++j) {
                wv[c][j] = s * float((packed >> (BITS * j)) & ((1u << BITS) - 1u)) + b;
            }
        }
        size_t k0 = size_t(word) * PER;
        for (int m = 0; m < ROWS; ++m) {
            if (m < M) {
                float xv[PER];
                for (int j = 0; j < PER; ++j) {
                    xv[j] = float(x[size_t(m) * K + k0 + j]);
                }
                for (int c = 0; c < COLS; ++c) {
                    float sum = 0.0f;
                    for (int j = 0; j < PER; ++j) {
                        sum += xv[j] * wv[c][j];
                    }
                    acc[c][m] += sum;
                }
            }
        }
    }
    for (int c = 0; c < COLS; ++c) {
        for (int m = 0; m < ROWS; ++m) {
            float v = simd_sum(acc[c][m]);
            if (lane == 0 && m < M && n0 + c < N) {
                y[size_t(m) * N + n0 + c] = static_cast<T>(v);
            }
        }
    }
"""


def cuda() -> str:
    """Body of the CUDA kernel (signature generated by `mx.fast.cuda_kernel`)."""
    return _CUDA_SOURCE


def metal() -> str:
    """Body of the Metal kernel (signature generated by `mx.fast.metal_kernel`)."""
    return _METAL_SOURCE


def reference(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, *, group_size: int,
              bits: int) -> mx.array:
    """MLX's own op: x [..., K] -> [..., N] (runs everywhere; the ground truth in tests)."""
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)


def _check(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> None:
    K = x.shape[-1]
    if bits not in SUPPORTED_BITS or group_size % 32 or K % group_size:
        raise ValueError(f"quantized_rows: bits={bits} group_size={group_size} K={K} not supported by the kernel")
    if w.dtype != mx.uint32 or w.shape[-1] * 32 // bits != K or scales.shape != (w.shape[0], K // group_size) \
            or biases.shape != scales.shape:
        raise ValueError(f"quantized_rows: x [..., {K}] does not match w {w.shape} {w.dtype} / "
                         f"scales {scales.shape} / biases {biases.shape} at {bits} bits, group {group_size}")


def rows_bucket(m: int) -> int:
    """The compiled row count that serves m rows (1 <= m <= MAX_ROWS)."""
    return next(b for b in ROW_BUCKETS if b >= m)


def kernel(kind: str, x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, *, group_size: int,
           bits: int) -> mx.array:
    """The kernel on `kind` ('metal' | 'cuda'); same contract as `reference`."""
    _check(x, w, scales, biases, group_size, bits)
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)  # [M, K]
    M, N = x2.shape[0], w.shape[0]
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"quantized_rows: {M} rows; the kernel takes 1-{MAX_ROWS}")
    source = metal() if kind == "metal" else cuda()
    fn = build_kernel(kind, "framecast_quantized_rows", INPUT_NAMES, OUTPUT_NAMES, source)
    bucket = rows_bucket(M)
    cols = COLS_BY_ROWS[bucket]
    groups = -(-N // (WARPS * cols))
    (y,) = fn(
        inputs=[x2, w, scales, biases],
        template=[("T", x.dtype), ("BITS", bits), ("GROUP", group_size), ("WORDS", w.shape[1]),
                  ("ROWS", bucket), ("WARPS", WARPS), ("COLS", cols)],
        grid=(groups * 32 * WARPS, 1, 1),
        threadgroup=(32 * WARPS, 1, 1),
        output_shapes=[(M, N)],
        output_dtypes=[x.dtype],
    )
    return y.reshape(*lead, N)  # [..., N]


def _kernel_ok(kind: str, dtype: mx.Dtype, k: int, bits: int, group_size: int) -> bool:
    """One-time check of the kernel for this (dtype, K, bits, group) against the reference."""

    def relative_error() -> float:
        rng = np.random.default_rng(0)
        w_f = mx.array(rng.standard_normal((40, k)).astype(np.float32))  # 40: a partial thread group
        wq, s, b = mx.quantize(w_f, group_size=group_size, bits=bits)
        s, b = s.astype(dtype), b.astype(dtype)
        worst = 0.0
        for rows in SELF_CHECK_ROWS:
            x = mx.array(rng.standard_normal((rows, k)).astype(np.float32)).astype(dtype)
            got = kernel(kind, x, wq, s, b, group_size=group_size, bits=bits).astype(mx.float32)
            want = reference(x, wq, s, b, group_size=group_size, bits=bits).astype(mx.float32)
            worst = max(worst, float(mx.max(mx.abs(got - want)).item()) / float(mx.max(mx.abs(want)).item()))
        return worst

    key = ("quantized_rows", kind, dtype, k, bits, group_size)
    return kernel_verified(key, relative_error, SELF_CHECK_TOLERANCE.get(dtype, 1e-4))


@functools.cache
def mode() -> str:
    """What `FRAMECAST_QMM_ROWS` asks for: 'mlx' (default, MLX's op as it is), 'pad' (few rows
    padded to `PAD_ROWS` for MLX's op), 'pad-large' (the same, for large weights only) or
    'kernel' (our kernel); read once per process (every quantised projection asks), in any case.
    Raises UserError, naming the value as it was set, for any other value."""
    raw = os.environ.get(ENV_VAR, "mlx")
    choice = raw.strip().lower() or "mlx"
    if choice not in MODES:
        raise UserError(f"{ENV_VAR}={raw!r}: expected one of {', '.join(repr(m) for m in MODES)}")
    return choice


def wanted() -> bool:
    """Whether `FRAMECAST_QMM_ROWS` asks for our dispatch ('pad', 'pad-large' or 'kernel') rather
    than MLX's op."""
    return mode() != "mlx"


def padded(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, *, group_size: int, bits: int,
           rows: int = PAD_ROWS) -> mx.array:
    """MLX's op on x padded with zero rows to `rows` rows, then cut back: x [..., K] (fewer
    than `rows` rows in all) -> [..., N]; every output row equals `reference`'s up to the
    summation order of the op's other path."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)  # [M, K]
    M = x2.shape[0]
    if M >= rows:
        raise ValueError(f"quantized_rows: {M} rows cannot be padded to {rows}")
    x2 = mx.concatenate([x2, mx.zeros((rows - M, K), dtype=x.dtype)])  # [rows, K]
    y = reference(x2, w, scales, biases, group_size=group_size, bits=bits)[:M]  # [M, N]
    return y.reshape(*lead, w.shape[0])


def quantized_rows_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, *, group_size: int,
                          bits: int) -> mx.array:
    """x [..., K] @ dequantize(w).T -> [..., N], on a GPU: with `FRAMECAST_QMM_ROWS=pad`, 2 to
    PAD_ROWS-1 rows padded to PAD_ROWS for MLX's op (`=pad-large`: only where w, the packed
    weight, holds at least PAD_LARGE_MIN_BYTES); with `=kernel`, 1-MAX_ROWS rows through the
    kernel when its self-check passed; MLX's `quantized_matmul` otherwise (and on the CPU)."""
    kind = backend()
    rows = x.size // max(x.shape[-1], 1)
    choice = mode() if kind != "reference" else "mlx"  # on the CPU MLX's op, whatever the switch says
    if choice in ("pad", "pad-large") and 2 <= rows < PAD_ROWS \
            and (choice == "pad" or w.nbytes >= PAD_LARGE_MIN_BYTES):
        return padded(x, w, scales, biases, group_size=group_size, bits=bits)
    # the kernel writes x's dtype; MLX's op promotes x with the scales' dtype: mixed ones stay with MLX
    if choice == "kernel" and 1 <= rows <= MAX_ROWS and bits in SUPPORTED_BITS \
            and scales.dtype == x.dtype and x.shape[-1] % group_size == 0 \
            and _kernel_ok(kind, x.dtype, x.shape[-1], bits, group_size):
        return kernel(kind, x, w, scales, biases, group_size=group_size, bits=bits)
    return reference(x, w, scales, biases, group_size=group_size, bits=bits)


def quantized_linear(layer: nn.QuantizedLinear, x: mx.array) -> mx.array:
    """`layer(x)` for an affine `nn.QuantizedLinear`, through `quantized_rows_matmul`."""
    y = quantized_rows_matmul(x, layer["weight"], layer["scales"], layer["biases"], group_size=layer.group_size,
                              bits=layer.bits)
    return y + layer["bias"] if "bias" in layer else y
