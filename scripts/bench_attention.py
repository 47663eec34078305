"""Prefill-over-cache attention: every implementation on a cache that grows like a live stream.

For each (new tokens Tq, cached keys) case and each implementation of
`framecast.kernels.cache_attention` (sdpa, bucket, matmul, kernel), run `--steps` streaming
steps; each step appends `--grow` keys (one frame) and calls attention once per layer
(`--layers`, same shape, as a forward pass does), so a per-shape set-up cost is paid once per
step where an implementation has one. Reported per step: median and p95 ms of the whole
layer stack's attention, the first step apart (cold), and the max error against the fp32
reference. The `sdpa` row is the baseline every ratio is against (what the layers did before).

    python scripts/bench_attention.py                # tiny shapes on CPU (smoke)
    python scripts/bench_attention.py --real --json  # MiniCPM-V 4.5 / Qwen3-8B heads, bf16 (GPU)
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import framecast  # noqa: F401  (OpenBLAS preload before mlx)
import mlx.core as mx
import numpy as np

from framecast.kernels import cache_attention as ca

REAL = {"hq": 32, "hkv": 8, "d": 128, "dtype": mx.bfloat16, "layers": 36,
        "cases": [(67, 4_102), (67, 20_182), (67, 40_282), (15, 20_182), (82, 20_182)]}
TINY = {"hq": 4, "hkv": 2, "d": 16, "dtype": mx.float32, "layers": 2,
        "cases": [(67, 500), (15, 2_000)]}


def bench_case(impl: str, tq: int, n_keys: int, *, shape: dict, steps: int, grow: int, layers: int) -> dict:
    hq, hkv, d, dtype = shape["hq"], shape["hkv"], shape["d"], shape["dtype"]
    cap = -(-(n_keys + grow * (steps + 1)) // 256) * 256
    kb = mx.random.normal((1, hkv, cap, d)).astype(dtype)
    vb = mx.random.normal((1, hkv, cap, d)).astype(dtype)
    q = mx.random.normal((1, hq, tq, d)).astype(dtype)
    mx.eval(kb, vb, q)
    times = []
    for s in range(steps + 1):
        n = n_keys + s * grow
        mx.synchronize()
        t0 = time.perf_counter()
        outs = [ca.cache_attention(q, kb[:, :, :n], vb[:, :, :n], scale=d**-0.5, buffers=(kb, vb), impl=impl)
                for _ in range(layers)]
        mx.eval(outs)
        times.append(time.perf_counter() - t0)
    got = ca.cache_attention(q, kb[:, :, :n_keys], vb[:, :, :n_keys], scale=d**-0.5, buffers=(kb, vb), impl=impl)
    want = ca.reference(q.astype(mx.float32), kb.astype(mx.float32), vb.astype(mx.float32), scale=d**-0.5,
                        n_keys=n_keys)
    err = float(mx.max(mx.abs(got.astype(mx.float32) - want)).item()) / float(mx.max(mx.abs(want)).item())
    warm = np.asarray(times[1:]) * 1e3
    return {"impl": impl, "tq": tq, "n_keys": n_keys, "cold_ms": round(times[0] * 1e3, 3),
            "median_ms": round(float(np.median(warm)), 3), "p95_ms": round(float(np.percentile(warm, 95)), 3),
            "rel_err": float(f"{err:.3g}")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--real", action="store_true", help="MiniCPM-V 4.5 / Qwen3-8B attention shapes in bf16")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--grow", type=int, default=67, help="keys added per step (one frame)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--impls", nargs="+", choices=ca.IMPLS, default=list(ca.IMPLS))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    shape = REAL if args.real else TINY
    layers = args.layers or shape["layers"]
    try:
        device_name = str(mx.device_info().get("device_name", mx.default_device()))
    except Exception:  # noqa: BLE001 - a label only
        device_name = platform.processor() or platform.machine()
    print(f"bench_attention on {mx.default_device()} ({device_name}), mlx {mx.__version__}; {layers} layers per "
          f"step, +{args.grow} keys per step, median/p95 of {args.steps} steps; x = sdpa / impl", flush=True)
    print(f"{'Tq':>4} {'keys':>7} {'impl':<7} {'cold ms':>9} {'median ms':>10} {'p95 ms':>9} {'x sdpa':>7} {'rel err':>9}")
    rows = []
    for tq, n_keys in shape["cases"]:
        base = None
        for impl in args.impls:
            r = bench_case(impl, tq, n_keys, shape=shape, steps=args.steps, grow=args.grow, layers=layers)
            base = r["median_ms"] if impl == "sdpa" or base is None else base
            r["x_sdpa"] = round(base / r["median_ms"], 2) if r["median_ms"] else None
            rows.append(r)
            print(f"{tq:>4} {n_keys:>7} {impl:<7} {r['cold_ms']:>9.2f} {r['median_ms']:>10.2f} {r['p95_ms']:>9.2f} "
                  f"{r['x_sdpa']:>7} {r['rel_err']:>9.2e}", flush=True)
    if args.json:
        print(json.dumps({"bench": "attention", "device": str(mx.default_device()), "device_name": device_name,
                          "mlx": mx.__version__, "layers": layers, "steps": args.steps, "grow": args.grow,
                          "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
