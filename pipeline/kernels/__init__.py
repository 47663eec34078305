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
import logging
import os

import mlx.core as mx

from pipeline.errors import UserError

ENV_VAR = "FRAMECAST_KERNELS"
BACKENDS = ("reference", "metal", "cuda")

log = logging.getLogger(__name__)


@functools.cache
def backend() -> str:
    """'cuda' | 'metal' | 'reference' for this process (env override, then the GPU present).

    A GPU kernel is only chosen when the default device is the GPU: custom kernels raise on
    the CPU stream, and the reference is what MLX would run there anyway.
    """
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in ("auto", "reference"):
        raise UserError(f"{ENV_VAR}={choice!r}: expected 'auto' or 'reference'")
    if choice == "reference" or mx.default_device() != mx.gpu:
        return "reference"
    if mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return "reference"


@functools.cache
def build_kernel(kind: str, name: str, input_names: tuple[str, ...], output_names: tuple[str, ...],
                 source: str):
    """The `mx.fast` kernel object for `kind` ('metal' | 'cuda'), built once and cached.

    MLX compiles per template instantiation on first call and caches that too, so callers pass
    dtypes and head sizes as template arguments and everything that changes per call (token
    counts) through input shapes.
    """
    make = mx.fast.metal_kernel if kind == "metal" else mx.fast.cuda_kernel
    return make(name=name, input_names=list(input_names), output_names=list(output_names),
                source=source, ensure_row_contiguous=True)
