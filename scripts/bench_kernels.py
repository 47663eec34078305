"""Benchmark the fused kernels against their pure-MLX references (same run, same device).

    python scripts/bench_kernels.py            # table
    python scripts/bench_kernels.py --json     # table, then one JSON object on the last line

rope_shift cases: the real model's cache (4 KV heads x 128 dims x 8k tokens) and a tiny one,
each as a plain shift of every key and as an eviction (gather the kept 3/4 + shift, which is
what `KVCache.evict` asks for). Rows: `reference` (the baseline every ratio is against),
`mx.fast.rope` (MLX's own RoPE kernel with one offset per row: an alternative pure-MLX
formulation, plain shift only), `kernel` (our Metal/CUDA kernel, on a GPU backend only) and
`KVCache.evict` (the whole eviction of one layer, keys and values, through whatever backend is
active: an end-to-end time, no ratio). On CPU
there is no kernel: the script times the reference (and the mx.fast.rope alternative).
dequantize_kv cases: the quantised cache's per-step fetch of K and V (8-bit g128, 4-bit g64)
from buffers with one growth step of spare capacity. Rows: `reference` (mx.dequantize on the
strided views, what the cache did before), `contiguous` (mx.dequantize on contiguous copies
made outside the timing: MLX's own kernel without the view copies, a floor for the reference)
and `kernel` (GPU only).
quantized_rows cases (`--op quantized_rows`): one 4-bit (group 64) linear layer of a Qwen2-7B
shape (3584 -> 3584 and 3584 -> 18944; a tiny one on CPU) for 1-64 rows (`QMM_ROWS`), the rows
of a batched decode step. Rows: `reference` (MLX's quantized_matmul, the baseline), `dequant+mm`
(dequantise the whole weight, then one float matmul: the pure-MLX alternative), `pad16` (MLX's
op on the rows padded with zero rows to 16) and `kernel` (our few-rows kernel, GPU only); median
and p95.
Needs only MLX and numpy.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Iterator


import framecast  # noqa: E402,F401  (preloads OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402

from framecast.kernels import backend, gpu  # noqa: E402
from framecast.kernels import dequantize_kv as dq  # noqa: E402
from framecast.kernels import quantized_rows as qr  # noqa: E402
from framecast.kernels import rope_shift as rs  # noqa: E402
from framecast.model.cache import KVCache  # noqa: E402

THETA = 1e6  # MiniCPM-V 4.x / Qwen rope_theta
SHIFT = -2048  # a typical post-eviction delta
CASES = [  # name, B, n_kv, T, head_dim
    ("real 4x128x8k", 1, 4, 8192, 128),
    ("tiny 2x64x256", 1, 2, 256, 64),
]


def _time(fn, *, warmup: int, iters: int) -> float:
    """Median wall time of `fn()` (evaluated) in milliseconds."""
    return _time_p95(fn, warmup=warmup, iters=iters)[0]


def _fast_rope_shift(keys: mx.array, shift: int, freqs: mx.array, dims: int) -> mx.array:
    """Shift via mx.fast.rope: every row is its own batch entry of length 1 at position `shift`."""
    B, H, T, D = keys.shape
    rows = keys.reshape(B * H * T, 1, D)
    offsets = mx.full((B * H * T,), shift, dtype=mx.int32)
    out = mx.fast.rope(rows, dims, traditional=False, base=None, scale=1.0, offset=offsets, freqs=freqs)
    return out.reshape(B, H, T, D)


def bench_rope_shift(*, dtypes, warmup: int, iters: int) -> Iterator[dict]:
    kind = backend()
    for name, B, H, T, D in CASES:
        spec = rs.RopeSpec.from_base(D, base=THETA)
        freqs = 1.0 / spec.inv_freq
        for dtype in dtypes:
            keys = mx.random.normal((B, H, T, D)).astype(dtype)
            values = mx.random.normal((B, H, T, D)).astype(dtype)
            mx.eval(keys, values)
            drop = (T // 8, T // 8 + T // 4)  # evict a quarter after the sinks
            keep = mx.array(list(range(drop[0])) + list(range(drop[1], T)), dtype=mx.int32)
            shift = mx.array([0] * drop[0] + [drop[0] - drop[1]] * (T - drop[1]), dtype=mx.int32)
            n_keep = keep.shape[0]
            item = keys.itemsize
            for op, n_out in (("shift", T), ("evict", n_keep)):
                moved = 2 * B * H * n_out * D * item  # bytes read + written once each
                if op == "shift":
                    impls = {"reference": lambda: rs.reference(keys, SHIFT, spec),
                             "mx.fast.rope": lambda: _fast_rope_shift(keys, SHIFT, freqs, D)}
                    if kind != "reference":
                        impls["kernel"] = lambda: rs.kernel(kind, keys, SHIFT, spec)
                else:
                    impls = {"reference": lambda: rs.reference(keys, shift, spec, index=keep)}
                    if kind != "reference":
                        impls["kernel"] = lambda: rs.kernel(kind, keys, shift, spec, index=keep)

                    def evict_layer():
                        cache = KVCache.from_state((keys, values))
                        cache.evict([drop], rope=spec)
                        return cache.state

                    impls["KVCache.evict"] = evict_layer
                base_ms = None
                for impl, fn in impls.items():
                    ms = _time(fn, warmup=warmup, iters=iters)
                    base_ms = ms if base_ms is None else base_ms
                    end_to_end = impl == "KVCache.evict"  # keys + values + buffer writes: no ratio
                    yield ({"op": "rope_shift", "case": name, "variant": op,
                                 "dtype": str(dtype).replace("mlx.core.", ""),
                                 "impl": impl, "ms": round(ms, 4),
                                 "gbps": None if end_to_end else round(moved / ms / 1e6, 2),
                                 "speedup_vs_reference": None if end_to_end else round(base_ms / ms, 2)})


def bench_dequantize_kv(*, dtypes, warmup: int, iters: int) -> Iterator[dict]:
    """The quantised cache's per-step fetch: K and V live prefix out of buffers with spare capacity."""
    kind = backend()
    for name, B, H, T, D in CASES:
        cap = T + 256  # one growth step of headroom, as in QuantizedKVCache
        for bits, group in ((8, min(128, D)), (4, 64)):  # the cache picks the largest group dividing D
            for dtype in dtypes:
                qk = tuple(mx.quantize(mx.random.normal((B, H, cap, D)).astype(dtype), group_size=group, bits=bits))
                qv = tuple(mx.quantize(mx.random.normal((B, H, cap, D)).astype(dtype), group_size=group, bits=bits))
                mx.eval(qk, qv)
                contiguous = [mx.contiguous(t[..., :T, :]) for t in (*qk, *qv)]
                mx.eval(contiguous)
                moved = sum(t.nbytes for t in contiguous) + 2 * B * H * T * D * mx.zeros((), dtype=dtype).itemsize
                args = dict(end=T, bits=bits, group_size=group, dtype=dtype)
                impls = {"reference": lambda: dq.reference(qk, qv, **args),
                         "contiguous": lambda: (mx.dequantize(*contiguous[:3], group_size=group, bits=bits),
                                                mx.dequantize(*contiguous[3:], group_size=group, bits=bits))}
                if kind != "reference":
                    impls["kernel"] = lambda: dq.kernel(kind, qk, qv, **args)
                base_ms = None
                for impl, fn in impls.items():
                    ms = _time(fn, warmup=warmup, iters=iters)
                    base_ms = ms if base_ms is None else base_ms
                    yield ({"op": "dequantize_kv", "case": name, "variant": f"q{bits} g{group}",
                                 "dtype": str(dtype).replace("mlx.core.", ""), "impl": impl, "ms": round(ms, 4),
                                 "gbps": round(moved / ms / 1e6, 2), "speedup_vs_reference": round(base_ms / ms, 2)})


def _time_p95(fn, *, warmup: int, iters: int) -> tuple[float, float]:
    """(median, p95) wall time of `fn()` (evaluated) in milliseconds."""
    for _ in range(warmup):
        mx.eval(fn())
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        mx.eval(fn())
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(round(0.95 * (len(samples) - 1))))]


QMM_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)
QMM_SHAPES = {"gpu": [("7B qkv/o 3584->3584", 3584, 3584), ("7B up 3584->18944", 3584, 18944)],
              "cpu": [("tiny 512->256", 512, 256)]}


def bench_quantized_rows(*, dtypes, warmup: int, iters: int) -> Iterator[dict]:
    """One 4-bit linear layer for 1-64 rows: MLX's op, dequantise + matmul, MLX's op on rows
    padded to `PAD_ROWS`, our kernel."""
    kind = backend()
    for name, k, n in QMM_SHAPES["gpu" if kind != "reference" else "cpu"]:
        for dtype in dtypes:
            wq, s, b = mx.quantize(mx.random.normal((n, k)).astype(dtype), group_size=64, bits=4)
            mx.eval(wq, s, b)
            for m in QMM_ROWS:
                x = mx.random.normal((m, k)).astype(dtype)
                mx.eval(x)
                impls = {"reference": lambda: qr.reference(x, wq, s, b, group_size=64, bits=4),
                         "dequant+mm": lambda: x @ mx.dequantize(wq, s, b, group_size=64, bits=4).T}
                if 2 <= m < qr.PAD_ROWS:
                    impls[f"pad{qr.PAD_ROWS}"] = lambda: qr.padded(x, wq, s, b, group_size=64, bits=4)
                if kind != "reference":  # our kernel, 1-64 rows
                    impls["kernel"] = lambda: qr.kernel(kind, x, wq, s, b, group_size=64, bits=4)
                base_ms = None
                moved = wq.nbytes + s.nbytes + b.nbytes + x.nbytes + m * n * x.itemsize
                for impl, fn in impls.items():
                    ms, p95 = _time_p95(fn, warmup=warmup, iters=iters)
                    base_ms = ms if base_ms is None else base_ms
                    yield ({"op": "quantized_rows", "case": name, "variant": f"{m} rows",
                                 "dtype": str(dtype).replace("mlx.core.", ""), "impl": impl, "ms": round(ms, 4),
                                 "p95_ms": round(p95, 4), "gbps": round(moved / ms / 1e6, 2),
                                 "speedup_vs_reference": round(base_ms / ms, 2)})


OPS = ("rope_shift", "dequantize_kv", "quantized_rows")
DTYPES = ("float16", "bfloat16", "float32")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per row (default: 30 GPU, 5 CPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--op", choices=OPS, action="append", help="only these ops (repeatable; default all)")
    parser.add_argument("--dtype", choices=DTYPES, action="append",
                        help="only these dtypes on a GPU (repeatable; default all three; the CPU runs float32)")
    args = parser.parse_args(argv)

    kind = backend()
    on_gpu = mx.default_device() == mx.gpu
    dtypes = [getattr(mx, d) for d in (args.dtype or DTYPES)] if on_gpu else [mx.float32]
    iters = args.iters or (30 if on_gpu else 5)
    device = gpu() or "cpu"
    try:
        device_name = str(mx.device_info().get("device_name", device))
    except Exception:  # noqa: BLE001 - a label only
        device_name = platform.processor() or platform.machine()
    benches = {"rope_shift": bench_rope_shift, "dequantize_kv": bench_dequantize_kv,
               "quantized_rows": bench_quantized_rows}
    print(f"kernels on {device} ({device_name}); backend: {kind}; mlx {mx.__version__}; median of {iters} runs; "
          "GB/s = bytes the op must read + write once", flush=True)
    header = (f"{'op':<14} {'case':<20} {'variant':<9} {'dtype':<9} {'impl':<14} {'ms':>9} {'p95 ms':>9} "
              f"{'GB/s':>8} {'x ref':>7}")
    print(header)
    print("-" * len(header), flush=True)
    rows = []
    for op in args.op or OPS:  # each row as soon as it is measured: a killed run keeps them
        for r in benches[op](dtypes=dtypes, warmup=args.warmup, iters=iters):
            rows.append(r)
            gbps = "-" if r["gbps"] is None else f"{r['gbps']:.1f}"
            ratio = "-" if r["speedup_vs_reference"] is None else f"{r['speedup_vs_reference']:.2f}"
            p95 = f"{r['p95_ms']:.3f}" if "p95_ms" in r else "-"
            print(f"{r['op']:<14} {r['case']:<20} {r['variant']:<9} {r['dtype']:<9} {r['impl']:<14} {r['ms']:>9.3f} "
                  f"{p95:>9} {gbps:>8} {ratio:>7}", flush=True)
    if args.json:
        print(json.dumps({"bench": "kernels", "device": device, "device_name": device_name, "backend": kind,
                          "mlx": mx.__version__, "iters": iters, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
