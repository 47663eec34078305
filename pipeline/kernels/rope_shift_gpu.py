"""Fused RoPE-shift kernels for Metal and CUDA, same interface as `rope_shift_reference`:

    kernel(keys [B, H, T, D], shift [T] int32, spec) -> keys [B, H, T, D] (same dtype)

One thread per output element: it reads its own value and its RoPE partner (interleaved pairs
or halves, by `spec.traditional`), turns them by `shift[t] * inv_freq[pair]` in float32 and
writes one element in the cache dtype — one read pass and one write pass over the moved keys,
instead of the reference's split / multiply / concatenate temporaries.

`select()` returns the kernel for the default device's backend, or None (CPU, or a GPU backend
that is not available): callers then use the pure-MLX reference. Tests compare each kernel with
the reference on the machine that has it.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

THREADS_PER_GROUP = 256

# Shared element logic; `x(i)` reads keys as float, `ang(pair)` is the angle of a pair.
_BODY = """
    if (elem >= N) { return; }
    uint j = elem % D;            // dimension within the head
    uint row = elem / D;          // (b, h, t) row
    uint t = row % TLEN;
    if (j >= DIMS) { out[elem] = keys[elem]; return; }
    uint half_dims = DIMS / 2;
    uint pair, partner;
    bool first;
    if (TRAD) { pair = j / 2; first = (j % 2) == 0; partner = first ? elem + 1 : elem - 1; }
    else { pair = j % half_dims; first = j < half_dims; partner = first ? elem + half_dims : elem - half_dims; }
    float a = static_cast<float>(shift[t]) * inv_freq[pair];
    float c = COS(a);
    float s = SIN(a);
    float x = static_cast<float>(keys[elem]);
    float y = static_cast<float>(keys[partner]);
    float r = first ? (x * c - y * s) : (y * s + x * c);
    out[elem] = static_cast<T>(r);
"""

_METAL_SOURCE = "    uint elem = thread_position_in_grid.x;\n" + _BODY.replace("COS", "metal::precise::cos").replace(
    "SIN", "metal::precise::sin")
_CUDA_SOURCE = ("    unsigned int elem = cooperative_groups::this_grid().thread_rank();\n"
                + _BODY.replace("uint ", "unsigned int ").replace("COS", "cosf").replace("SIN", "sinf"))


def _launcher(kernel) -> Callable:
    def run(keys: mx.array, shift: mx.array, spec) -> mx.array:
        B, H, T, D = keys.shape
        n = B * H * T * D
        (out,) = kernel(
            inputs=[keys, shift.astype(mx.int32), spec.inv_freq.astype(mx.float32)],
            template=[("T", keys.dtype), ("N", n), ("D", D), ("DIMS", spec.dims), ("TLEN", T),
                      ("TRAD", bool(spec.traditional))],
            grid=(n, 1, 1),
            threadgroup=(THREADS_PER_GROUP, 1, 1),
            output_shapes=[keys.shape],
            output_dtypes=[keys.dtype],
        )
        return out

    return run


def metal_rope_shift() -> Callable:
    kernel = mx.fast.metal_kernel(name="framecast_rope_shift", input_names=["keys", "shift", "inv_freq"],
                                  output_names=["out"], source=_METAL_SOURCE)
    return _launcher(kernel)


def cuda_rope_shift() -> Callable:
    kernel = mx.fast.cuda_kernel(name="framecast_rope_shift", input_names=["keys", "shift", "inv_freq"],
                                 output_names=["out"], source=_CUDA_SOURCE)
    return _launcher(kernel)


def backend() -> str:
    """'metal', 'cuda' or 'cpu': what the default device runs on."""
    if mx.default_device() != mx.gpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return "cpu"


def select() -> Callable | None:
    kind = backend()
    if kind == "metal":
        return metal_rope_shift()
    if kind == "cuda":
        return cuda_rope_shift()
    return None
