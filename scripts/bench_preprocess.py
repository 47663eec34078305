"""CPU preprocessing of one frame (issue 14: it is on the path from frame arrival to first token):
normalisation as the arithmetic, as the per-channel table lookup it was, and through `cv2.LUT`
(what `MiniCPMVProcessor.normalize` does now), then the whole `preprocess` and `batch_views`.
Median and p95 of `--samples` calls each, interleaved, in one process; every variant is checked
to give the same bits.

    python scripts/bench_preprocess.py [--size 448] [--samples 50]
"""

from __future__ import annotations

import argparse
import platform
import time

import framecast  # noqa: F401  (OpenBLAS preload)
import numpy as np

from framecast.model.processor import MiniCPMVProcessor
from framecast.model.vision import batch_views
from framecast.testing import random_image


def per_channel_take(p: MiniCPMVProcessor, pixels: np.ndarray) -> np.ndarray:
    """The table lookup as it was before cv2.LUT: one strided np.take per channel."""
    lut = p._normalize_table()[0].T  # [C, 256]
    out = np.empty(pixels.shape, np.float32)
    for c in range(pixels.shape[2]):
        np.take(lut[c], pixels[..., c], out=out[..., c])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--samples", type=int, default=50)
    a = ap.parse_args(argv)
    p = MiniCPMVProcessor()
    image = random_image(a.size, a.size, seed=0)
    view = np.asarray(image)
    variants = {
        "normalize: arithmetic": lambda: p._arithmetic(view),
        "normalize: per-channel take (before)": lambda: per_channel_take(p, view),
        "normalize: cv2.LUT (now)": lambda: p.normalize(view),
        "preprocess (resize + normalize)": lambda: p.preprocess(image, max_slice_nums=1),
    }
    ref = variants["normalize: arithmetic"]()
    for name in ("normalize: per-channel take (before)", "normalize: cv2.LUT (now)"):
        assert np.array_equal(variants[name](), ref), name
    processed = p.preprocess(image, max_slice_nums=1)
    variants["batch_views (patchify)"] = lambda: batch_views(processed.views, p.patch_size, 70)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.samples):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    print(f"bench_preprocess: {a.size}x{a.size} RGB frame, {a.samples} samples each, {platform.machine()} "
          f"({platform.processor() or 'cpu'}); ms median (p95)")
    for name, t in times.items():
        print(f"  {name:<40} {np.median(t):7.3f} ({np.percentile(t, 95):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
