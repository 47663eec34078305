"""The GPU-only paths against their eager twins on this device: compiled layers
(`framecast.model.compiled`) and batched rows of pooled caches (`framecast.model.kv_pool`).

    python scripts/check_device_paths.py        # prints one line per check, exit 1 if one fails

On the CPU the tests cover both (tests/test_fast_path.py, tests/test_kv_pool.py); this is for
the GPU machine, where pytest is not installed: tiny configs in fp32 and bf16, random weights.
"""

from __future__ import annotations

import framecast  # noqa: F401  (OpenBLAS preload before mlx)
import mlx.core as mx
import numpy as np
from bench_streaming import build_model

from framecast.model.compiled import compile_layers
from framecast.model.kv_pool import KVPoolSet, attend_rows
from framecast.model.cache import KVCache

TOL = {mx.float32: 1e-4, mx.bfloat16: 3e-2}


def rel_err(a: mx.array, b: mx.array) -> float:
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


def check_compiled(dtype) -> float:
    model, _ = build_model("tiny", "4.5")
    model.set_dtype(dtype)
    ids = mx.array([[3, 5, 7, 9, 11]], dtype=mx.int32)
    out = {}
    for on in (False, True):
        compile_layers(model, on)
        cache = model.make_cache()
        rows = [model(ids, cache)] + [model(mx.array([[t]], dtype=mx.int32), cache) for t in (4, 8, 2)]
        image = np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8)
        out[on] = rows + [model.encode_images([image, image[::-1]])[1].features]
    return max(rel_err(a, b) for a, b in zip(out[True], out[False]))


def check_rows(dtype) -> float:
    rng = np.random.default_rng(1)
    model, _ = build_model("tiny", "2.6")
    attn = model.language_model.layers[0].self_attn
    pools = KVPoolSet(1, rows=3, capacity=300)
    pooled = [pools.acquire(300)[0] for _ in range(3)]
    own = [KVCache() for _ in range(3)]
    hd, nkv, nq = attn.head_dim, attn.n_kv_heads, attn.n_heads

    def arr(*shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)

    for r, n in enumerate((5, 130, 61)):
        kv = (arr(1, nkv, n, hd), arr(1, nkv, n, hd))
        pooled[r].update_and_fetch(*kv)
        own[r].update_and_fetch(*kv)
    worst = 0.0
    for rows, t in (([0, 1, 2], 7), ([2, 0], 1)):
        q, k, v = arr(len(rows), nq, t, hd), arr(len(rows), nkv, t, hd), arr(len(rows), nkv, t, hd)
        got = attend_rows(q, k, v, [pooled[r] for r in rows], attn.rope, scale=attn.scale)
        for b, r in enumerate(rows):
            c = own[r]
            qb, kb = attn.rope(q[b:b + 1], offset=c.offset), attn.rope(k[b:b + 1], offset=c.offset)
            keys, values = c.update_and_fetch(kb, v[b:b + 1])
            ref = mx.fast.scaled_dot_product_attention(qb, keys, values, scale=attn.scale,
                                                       mask="causal" if t > 1 else None)
            worst = max(worst, rel_err(got[b:b + 1], ref))
    return worst


def main() -> int:
    print(f"device {mx.default_device()}")
    failed = 0
    for name, fn in (("compiled layers vs eager", check_compiled), ("pooled rows vs each row alone", check_rows)):
        for dtype in (mx.float32, mx.bfloat16):
            err = fn(dtype)
            ok = err <= TOL[dtype]
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name} ({str(dtype).split('.')[-1]}): max rel err {err:.2e} "
                  f"(tolerance {TOL[dtype]:.0e})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
