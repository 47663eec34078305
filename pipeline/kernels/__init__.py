"""Fused custom ops: one interface per op, with a pure-MLX reference, a Metal and a CUDA kernel.

Every op module (`rope_shift.py`, ...) exposes `reference(...)` (runs everywhere, the CPU path
and the ground truth in tests), `metal()` / `cuda()` (kernel sources for
`mx.fast.metal_kernel` / `mx.fast.cuda_kernel`) and a public function with the same signature
as the reference that dispatches on `backend()`, chosen once per process.

`FRAMECAST_KERNELS=reference` forces the pure-MLX reference everywhere (a bisecting switch
when a kernel is suspected); `auto` (or unset) picks the kernel for the GPU backend.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from typing import Callable

import mlx.core as mx

from framecast.errors import UserError

ENV_VAR = "FRAMECAST_KERNELS"
BACKENDS = ("reference", "metal", "cuda")

log = logging.getLogger(__name__)


def gpu() -> str | None:
    """'cuda' | 'metal' when MLX computes on that GPU (it is the default device), else None.

    What the device is, whatever `FRAMECAST_KERNELS` says: code that works around a backend's
    own ops (not ours) asks this, not `backend()`.
    """
    if mx.default_device() != mx.gpu:
        return None
    if mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return None


@functools.cache
def backend() -> str:
    """'cuda' | 'metal' | 'reference' for this process (env override, then the GPU present).

    A GPU kernel is only chosen when the default device is the GPU: custom kernels raise on
    the CPU stream, and the reference is what MLX would run there anyway.
    """
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in ("auto", "reference"):
        raise UserError(f"{ENV_VAR}={choice!r}: expected 'auto' or 'reference'")
    return (None if choice == "reference" else gpu()) or "reference"


@functools.cache
def build_kernel(kind: str, name: str, input_names: tuple[str, ...], output_names: tuple[str, ...],
                 source: str, *, row_contiguous: bool = True, header: str = ""):
    """The `mx.fast` kernel object for `kind` ('metal' | 'cuda'), built once and cached.

    MLX compiles per template instantiation on first call and caches that too, so callers pass
    dtypes and head sizes as template arguments and everything that changes per call (token
    counts) through input shapes. `row_contiguous=False` hands strided views to the kernel as
    they are (it must then index with `<input>_strides`) instead of copying them first.
    """
    # MLX's CUDA backend caches compiled PTX on disk by kernel name (+ template args), across
    # processes: a name that carries the source hash means an edited kernel is never served stale.
    tag = hashlib.sha1((header + source).encode()).hexdigest()[:10]
    make = mx.fast.metal_kernel if kind == "metal" else mx.fast.cuda_kernel
    return make(name=f"{name}_{tag}", input_names=list(input_names), output_names=list(output_names),
                source=source, header=header, ensure_row_contiguous=row_contiguous)


_VERIFIED: dict[tuple, bool] = {}


def kernel_verified(key: tuple, relative_error: Callable[[], float], tolerance: float) -> bool:
    """Whether the kernel for `key` passed its one-time self-check (run now if not yet).

    The kernels are compiled on the user's GPU, not in CI, so a compile error or a wrong result
    on an untested driver falls back to the reference with one warning instead of breaking the
    stream. `relative_error()` runs kernel and reference on a small input; tests call the
    kernels directly, so they still fail loudly.
    """
    if key not in _VERIFIED:
        try:
            err = relative_error()
            ok, why = err <= tolerance, f"relative error {err:.2e} > {tolerance:.1e}"
        except Exception as exc:  # noqa: BLE001 - any compile/launch failure means "use the reference"
            ok, why = False, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        if not ok:
            log.warning("kernel %s failed its self-check (%s); using the MLX reference", key, why)
        _VERIFIED[key] = ok
    return _VERIFIED[key]
