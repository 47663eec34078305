"""Move cached keys to new RoPE positions: k(p) -> k(p + shift), without the pre-RoPE key.

RoPE turns each pair of key dimensions by the angle `p * f_i`. A rotation by `a` followed by one
by `b` is a rotation by `a + b`, so a key cached at position p becomes exactly the key the
layer would have produced at position p + shift by turning every pair once more by
`shift * f_i`. The session uses this after evicting old frames (shift < 0) so positions stay
contiguous without re-running the model.

One interface (the kernel seam), chosen once by `pipeline.kernels.backend()`:
  `rope_shift(keys [B, H, T_src, D], shift, spec, *, index=None) -> [B, H, T, D]`
  - `shift`: int (every key moves by the same delta) or [T] int32 (one delta per token);
  - `spec`: a `RopeSpec` (per-pair frequencies, rotated dims, pairing layout). The plain
    `theta` form is `RopeSpec.from_base(dims, base=theta, traditional=...)`; the session
    probes the spec from the layer (`probe_rope`) so scaled RoPEs (linear, llama3, LongRoPE,
    yarn) shift correctly without this module knowing their formulas;
  - `index` [T] int32 (optional): which source token each output row comes from. This fuses
    eviction's compaction gather (`mx.take(keys, keep, axis=2)`) into the same pass, so an
    eviction reads every moved key once and writes it once, already rotated.
`reference` is pure MLX and runs everywhere (CPU included); `metal()` / `cuda()` are the
sources of the fused kernels, tested against it on their GPUs.

Why a kernel (read from `pipeline/model/cache.py` / `session.py`): eviction is the streaming
cache's own work, and the reference spends ~10 memory passes per moved key (take, fp32 casts,
four products, concatenate, cast back) where the kernel spends one read and one write. It runs
once per low-water eviction, not per token; the per-token cost of the quantised cache is
`dequantize_kv.py`'s.

`probe_rope(rope_fn, head_dim)` reads the frequencies and the pairing layout from the layer's
own RoPE function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

from framecast.kernels import backend, build_kernel, kernel_verified

PROBE_MAX_POSITION = 1 << 20  # refine frequencies up to this position (see probe_rope)
PROBE_TOLERANCE = 1e-3  # largest error accepted when checking a probed spec
THREADGROUP = 256  # threads per group/block; one thread per (row, pair), so any size fits
# Kernel vs reference on the first use of each (dtype, layout): max error / max |key|. The
# kernel rounds once to the output dtype like the reference; a last-bit sin/cos difference may
# flip that rounding, so the bound is one output ulp (fp16 2^-10, bf16 2^-7) plus slack.
SELF_CHECK_TOLERANCE = {mx.float32: 1e-5, mx.float16: 2e-3, mx.bfloat16: 1.6e-2}


INPUT_NAMES = ("keys", "src_token", "shift", "inv_freq")
OUTPUT_NAMES = ("out",)


@dataclass(frozen=True)
class RopeSpec:
    """What a RoPE does to one head: `dims` rotated dimensions, paired interleaved
    (`traditional`: (0,1), (2,3), ...) or by halves ((0, dims/2), ...), turned by
    `inv_freq[i]` radians per position."""

    inv_freq: mx.array  # [dims/2] float32
    dims: int
    traditional: bool

    @classmethod
    def from_base(cls, dims: int, *, base: float, scale: float = 1.0, traditional: bool = False) -> RopeSpec:
        """Plain RoPE: f_i = scale * base^(-2i/dims) (nn.RoPE / mx.fast.rope semantics)."""
        i = np.arange(0, dims, 2, dtype=np.float64)
        inv = scale * base ** (-i / dims)
        return cls(mx.array(inv.astype(np.float32)), dims, traditional)


# ---------------------------------------------------------------- reference (pure MLX)


def _pairs(x: mx.array, spec: RopeSpec) -> tuple[mx.array, mx.array, mx.array]:
    rot, rest = x[..., : spec.dims], x[..., spec.dims :]
    if spec.traditional:
        return rot[..., 0::2], rot[..., 1::2], rest
    half = spec.dims // 2
    return rot[..., :half], rot[..., half:], rest


def _unpairs(y1: mx.array, y2: mx.array, rest: mx.array, spec: RopeSpec) -> mx.array:
    if spec.traditional:
        rot = mx.stack([y1, y2], axis=-1).reshape(*y1.shape[:-1], spec.dims)
    else:
        rot = mx.concatenate([y1, y2], axis=-1)
    return mx.concatenate([rot, rest], axis=-1) if rest.shape[-1] else rot


def _per_token(shift: int | mx.array, n: int) -> mx.array:
    """The shift as [n] int32 (an int means the same delta for every token)."""
    if isinstance(shift, (int, np.integer)):
        return mx.full((n,), int(shift), dtype=mx.int32)
    if shift.shape != (n,):
        raise ValueError(f"rope_shift: shift has shape {shift.shape}, expected ({n},) or an int")
    return shift.astype(mx.int32)


def _check(keys: mx.array, spec: RopeSpec) -> None:
    if keys.ndim != 4:
        raise ValueError(f"rope_shift: keys must be [B, H, T, D], got shape {keys.shape}")
    D = keys.shape[-1]
    if spec.dims % 2 or spec.dims > D or D % 2 or spec.inv_freq.shape != (spec.dims // 2,):
        raise ValueError(f"rope_shift: spec (dims={spec.dims}, {spec.inv_freq.shape[0]} freqs) "
                         f"does not fit head_dim {D}")


def reference(keys: mx.array, shift: int | mx.array, spec: RopeSpec, *, index: mx.array | None = None) -> mx.array:
    """keys [B, H, T_src, D] -> keys[:, :, index] turned by `shift * inv_freq`, [B, H, T, D]."""
    _check(keys, spec)
    if index is not None:
        keys = mx.take(keys, index, axis=2)  # [B, H, T, D]
    shift = _per_token(shift, keys.shape[2])
    # Angles in float32 whatever the cache dtype: the rounding happens once, on the output.
    angle = shift.astype(mx.float32)[:, None] * spec.inv_freq[None, :]  # [T, dims/2]
    cos, sin = mx.cos(angle), mx.sin(angle)
    x1, x2, rest = _pairs(keys.astype(mx.float32), spec)
    y1 = x1 * cos - x2 * sin
    y2 = x1 * sin + x2 * cos
    return _unpairs(y1, y2, rest.astype(mx.float32), spec).astype(keys.dtype)


rope_shift_reference = reference  # the name the session's tests import


# ---------------------------------------------------------------- kernels
# One thread per (output row, pair): row = (b*H + h)*T + t, pair p < D/2. Pairs p < HALF are
# rotated ((p, p+HALF) by halves, (2p, 2p+1) interleaved); the rest, (2p, 2p+1) with
# 2p >= dims, is the unrotated tail of a partial-rotary head and is copied. Adjacent threads
# touch adjacent elements, so loads and stores coalesce. Template args: T (dtype), D
# (head_dim), HALF (dims/2), TRAD; token counts come from the input shapes, so a new eviction
# size never recompiles.

_METAL_SOURCE = """
    uint g = thread_position_in_grid.x;
    uint n_out = uint(shift_shape[0]);
    uint n_src = uint(keys_shape[2]);
    uint total = uint(keys_shape[0]) * uint(keys_shape[1]) * n_out * uint(D / 2);
    if (g >= total) {
        return;
    }
    uint p = g % uint(D / 2);
    uint row = g / uint(D / 2);
    uint t = row % n_out;
    size_t src = (size_t(row / n_out) * n_src + uint(src_token[t])) * D;
    size_t dst = size_t(row) * D;
    if (p >= uint(HALF)) {
        out[dst + 2 * p] = keys[src + 2 * p];
        out[dst + 2 * p + 1] = keys[src + 2 * p + 1];
        return;
    }
    uint i1 = TRAD ? 2 * p : p;
    uint i2 = TRAD ? 2 * p + 1 : p + uint(HALF);
    float x1 = float(keys[src + i1]);
    float x2 = float(keys[src + i2]);
    // fp32 angle like the reference; precise:: keeps sin/cos accurate at |angle| ~ 1e4-1e5.
    float a = float(shift[t]) * inv_freq[p];
    float s = metal::precise::sin(a);
    float c = metal::precise::cos(a);
    out[dst + i1] = static_cast<T>(x1 * c - x2 * s);
    out[dst + i2] = static_cast<T>(x1 * s + x2 * c);
"""

_CUDA_SOURCE = """
    const int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t n_out = shift_shape[0];
    const int64_t n_src = keys_shape[2];
    const int64_t total = int64_t(keys_shape[0]) * keys_shape[1] * n_out * (D / 2);
    if (g >= total) {
        return;
    }
    const int p = int(g % (D / 2));
    const int64_t row = g / (D / 2);
    const int64_t t = row % n_out;
    const int64_t src = ((row / n_out) * n_src + src_token[t]) * D;
    const int64_t dst = row * D;
    if (p >= HALF) {
        out[dst + 2 * p] = keys[src + 2 * p];
        out[dst + 2 * p + 1] = keys[src + 2 * p + 1];
        return;
    }
    const int i1 = TRAD ? 2 * p : p;
    const int i2 = TRAD ? 2 * p + 1 : p + HALF;
    const float x1 = static_cast<float>(keys[src + i1]);
    const float x2 = static_cast<float>(keys[src + i2]);
    // fp32 angle like the reference; sin/cos in fp64 so that fast-math intrinsics (whose
    // error grows with |angle|, and shifts reach tens of thousands) can never apply.
    const float a = static_cast<float>(shift[t]) * inv_freq[p];
    double s, c;
    sincos(static_cast<double>(a), &s, &c);
    out[dst + i1] = static_cast<T>(x1 * static_cast<float>(c) - x2 * static_cast<float>(s));
    out[dst + i2] = static_cast<T>(x1 * static_cast<float>(s) + x2 * static_cast<float>(c));
"""


def metal() -> str:
    """Body of the Metal kernel (signature generated by `mx.fast.metal_kernel`)."""
    return _METAL_SOURCE


def cuda() -> str:
    """Body of the CUDA kernel (signature generated by `mx.fast.cuda_kernel`)."""
    return _CUDA_SOURCE


def kernel(kind: str, keys: mx.array, shift: int | mx.array, spec: RopeSpec, *,
           index: mx.array | None = None) -> mx.array:
    """The fused op on `kind` ('metal' | 'cuda'); same contract as `reference`."""
    _check(keys, spec)
    B, H, T_src, D = keys.shape
    index = mx.arange(T_src, dtype=mx.int32) if index is None else index.astype(mx.int32)
    n = index.shape[0]
    shift = _per_token(shift, n)
    if B * H * n == 0:
        return mx.zeros((B, H, n, D), dtype=keys.dtype)
    source = metal() if kind == "metal" else cuda()
    fn = build_kernel(kind, "framecast_rope_shift", INPUT_NAMES, OUTPUT_NAMES, source)
    threads = B * H * n * (D // 2)
    (out,) = fn(
        inputs=[keys, index, shift, spec.inv_freq.astype(mx.float32)],
        template=[("T", keys.dtype), ("D", D), ("HALF", spec.dims // 2), ("TRAD", spec.traditional)],
        grid=(threads, 1, 1),
        threadgroup=(min(THREADGROUP, threads), 1, 1),
        output_shapes=[(B, H, n, D)],
        output_dtypes=[keys.dtype],
    )
    return out  # [B, H, n, D]


def _kernel_ok(kind: str, dtype: mx.Dtype, head_dim: int, spec: RopeSpec) -> bool:
    """One-time check of the kernel for this (dtype, layout) against the reference."""

    def relative_error() -> float:
        rng = np.random.default_rng(0)
        x = mx.array(rng.standard_normal((1, 2, 9, head_dim)).astype(np.float32)).astype(dtype)
        index = mx.array([0, 2, 3, 8, 7], dtype=mx.int32)
        shift = mx.array([0, -2, -2, -5000, 31], dtype=mx.int32)
        got = kernel(kind, x, shift, spec, index=index).astype(mx.float32)
        want = reference(x, shift, spec, index=index).astype(mx.float32)
        return float(mx.max(mx.abs(got - want)).item()) / float(mx.max(mx.abs(x)).item())

    key = ("rope_shift", kind, dtype, head_dim, spec.dims, spec.traditional)
    return kernel_verified(key, relative_error, SELF_CHECK_TOLERANCE.get(dtype, 1e-5))


def rope_shift(keys: mx.array, shift: int | mx.array, spec: RopeSpec, *, index: mx.array | None = None) -> mx.array:
    """keys [B, H, T_src, D] -> keys[:, :, index] turned by `shift * inv_freq`, [B, H, T, D].

    Same dtype as `keys`; `index=None` means every token in order.
    """
    kind = backend()
    if kind != "reference" and _kernel_ok(kind, keys.dtype, keys.shape[-1], spec):
        return kernel(kind, keys, shift, spec, index=index)
    return reference(keys, shift, spec, index=index)


# ---------------------------------------------------------------- probing a layer's RoPE


def _angles(rope_fn: Callable, head_dim: int, position: int) -> tuple[np.ndarray, np.ndarray]:
    """Apply the layer's RoPE to every basis vector at `position`: out[j] = R(position) e_j."""
    eye = mx.eye(head_dim, dtype=mx.float32).reshape(1, head_dim, 1, head_dim)  # [1, H=D, T=1, D]
    out = rope_fn(eye, offset=position)
    return np.array(out.reshape(head_dim, head_dim), dtype=np.float64), np.eye(head_dim)


def probe_rope(rope_fn: Callable, head_dim: int) -> RopeSpec:
    """Measure a layer's RoPE: pairing layout, rotated dims and per-pair frequency.

    `rope_fn(x [B, H, T, D], offset=int)` is the layer's own rotary function. The angle at
    position 1 is coarse (abs. error ~1e-7, which grows to ~4e-3 rad after a 40k-position
    shift), so it is refined at positions 2, 4, ... 2^20, each estimate unwrapping the next
    measurement's multiple of 2*pi. Raises ValueError if the function is not a rotation that
    is linear in position (then cached keys cannot be re-positioned).
    """
    out1, _ = _angles(rope_fn, head_dim, 1)
    row0 = np.abs(out1[0]).copy()
    row0[0] = 0.0
    partner = int(np.argmax(row0))
    if row0[partner] < 1e-9:
        raise ValueError("RoPE probe: dimension 0 is not rotated")
    traditional = partner == 1
    if traditional:  # rotated dims = the leading pairs that move at some position
        far, _ = _angles(rope_fn, head_dim, 12345)
        eye = np.eye(head_dim)
        moved = (np.abs(out1 - eye).max(axis=1) > 1e-7) | (np.abs(far - eye).max(axis=1) > 1e-7)
        dims = 2 * int(np.sum(moved[0::2]))
    else:
        dims = 2 * partner
    if traditional:
        first, second = np.arange(0, dims, 2), np.arange(1, dims, 2)
    else:
        first, second = np.arange(0, dims // 2), np.arange(dims // 2, dims)

    def measure(position: int) -> np.ndarray:
        out, _ = _angles(rope_fn, head_dim, position)
        cos = out[first, first]
        sin = out[first, second]
        return np.arctan2(sin, cos)  # in (-pi, pi]; magnitude (yarn mscale) drops out

    freq = measure(1)
    p = 2
    while p <= PROBE_MAX_POSITION:
        theta = measure(p)
        turns = np.round((p * freq - theta) / (2 * math.pi))
        freq = (theta + 2 * math.pi * turns) / p
        p *= 2
    spec = RopeSpec(mx.array(freq.astype(np.float32)), dims, traditional)
    _check_spec(rope_fn, head_dim, spec)
    return spec


def _check_spec(rope_fn: Callable, head_dim: int, spec: RopeSpec) -> None:
    """R(p0 + s) x must equal shift(R(p0) x, s) for a random key: otherwise refuse."""
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((1, 1, 1, head_dim)).astype(np.float32))
    p0, s = 37, 1234
    direct = rope_fn(x, offset=p0 + s)
    shifted = reference(rope_fn(x, offset=p0), mx.array([s], dtype=mx.int32), spec)
    err = float(mx.max(mx.abs(direct - shifted)).item())
    if not err < PROBE_TOLERANCE:
        raise ValueError(f"RoPE probe: shifting keys does not reproduce the layer's RoPE (error {err:.2e})")

