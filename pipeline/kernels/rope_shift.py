"""Move cached keys to new RoPE positions: k(p) -> k(p + shift), without the pre-RoPE key.

RoPE turns each pair of key dimensions by the angle `p * f_i`. A rotation by `a` followed by one
by `b` is a rotation by `a + b`, so a key cached at position p becomes exactly the key the
layer would have produced at position p + shift by turning every pair once more by
`shift * f_i`. The session uses this after evicting old frames (shift < 0) so positions stay
contiguous without re-running the model.

One interface, chosen once by backend:
  `rope_shift(keys [B, H, T, D], shift [T] int32, spec) -> keys [B, H, T, D]`
The pure-MLX reference runs everywhere (CPU included); `pipeline.kernels.rope_shift_gpu`
holds the Metal and CUDA versions, tested against this reference.

`probe_rope(rope_fn, head_dim)` reads the frequencies and the pairing layout from the layer's
own RoPE function, so the shift matches whatever scaling (linear, llama3, longrope, yarn) the
language model uses without this module knowing the formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

PROBE_MAX_POSITION = 1 << 20  # refine frequencies up to this position (see probe_rope)
PROBE_TOLERANCE = 1e-3  # largest error accepted when checking a probed spec


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


def rope_shift_reference(keys: mx.array, shift: mx.array, spec: RopeSpec) -> mx.array:
    """keys [B, H, T, D], shift [T] (positions to add; negative moves a key earlier)."""
    # Angles in float32 whatever the cache dtype: the rounding happens once, on the output.
    angle = shift.astype(mx.float32)[:, None] * spec.inv_freq[None, :]  # [T, dims/2]
    cos, sin = mx.cos(angle), mx.sin(angle)
    x1, x2, rest = _pairs(keys.astype(mx.float32), spec)
    y1 = x1 * cos - x2 * sin
    y2 = x1 * sin + x2 * cos
    return _unpairs(y1, y2, rest.astype(mx.float32), spec).astype(keys.dtype)


def _choose_impl() -> Callable[[mx.array, mx.array, RopeSpec], mx.array]:
    """Chosen once at import: a fused kernel on Metal/CUDA, the reference elsewhere."""
    try:
        from pipeline.kernels import rope_shift_gpu
    except ImportError:  # pragma: no cover - the module ships with the package
        return rope_shift_reference
    return rope_shift_gpu.select() or rope_shift_reference


def rope_shift(keys: mx.array, shift: mx.array, spec: RopeSpec) -> mx.array:
    """keys [B, H, T, D] turned by `shift[t] * inv_freq` per pair; same dtype and shape."""
    return _IMPL(keys, shift, spec)


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
        moved = (np.abs(out1 - np.eye(head_dim)).max(axis=1) > 1e-7) | (np.abs(far - np.eye(head_dim)).max(axis=1) > 1e-7)
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
    shifted = rope_shift_reference(rope_fn(x, offset=p0), mx.array([s], dtype=mx.int32), spec)
    err = float(mx.max(mx.abs(direct - shifted)).item())
    if not err < PROBE_TOLERANCE:
        raise ValueError(f"RoPE probe: shifting keys does not reproduce the layer's RoPE (error {err:.2e})")


_IMPL = _choose_impl()
