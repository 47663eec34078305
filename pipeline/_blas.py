"""Make MLX's Linux CPU build use an optimised BLAS.

The `mlx[cpu]` wheel links the netlib reference BLAS (fp32 GEMM ~4-8 GFLOP/s on this
machine's class of CPU). The opencv-python wheel ships an OpenBLAS with the same symbol names
(`sgemm_`, `cblas_sgemm`); loading it with RTLD_GLOBAL before `mlx.core` is imported makes the
dynamic linker resolve MLX's BLAS calls to it (measured 85-107 GFLOP/s vs 7.8, 1024^3 fp32).
Set FRAMECAST_OPENBLAS=0 to keep the reference BLAS (e.g. to measure the difference).
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import sys

_loaded: str | None = None


def _find_opencv_openblas() -> str | None:
    spec = importlib.util.find_spec("cv2")  # locate without importing cv2 (slow)
    if spec is None or not spec.submodule_search_locations:
        return None
    site = os.path.dirname(list(spec.submodule_search_locations)[0])
    hits = sorted(glob.glob(os.path.join(site, "opencv_python*.libs", "libopenblas*.so*")))
    return hits[0] if hits else None


def preload_openblas() -> str | None:
    """Load OpenBLAS globally if we are on Linux, MLX is not imported yet and it is allowed."""
    global _loaded
    if _loaded is not None:
        return _loaded
    if not sys.platform.startswith("linux") or os.environ.get("FRAMECAST_OPENBLAS", "1") == "0":
        return None
    if "mlx.core" in sys.modules:  # too late: MLX already bound its BLAS
        return None
    path = _find_opencv_openblas()
    if path is None:
        return None
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None
    _loaded = path
    return path


def blas_in_use() -> str:
    """A short label for reports: which BLAS MLX's CPU matmuls go through."""
    return f"openblas ({os.path.basename(_loaded)})" if _loaded else "reference BLAS (mlx wheel)"
