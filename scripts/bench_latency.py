"""Frame arrival -> first narration token, part by part, at 1-10 minutes of streamed context.

Issue 14's breakdown of one streaming step (a new frame arrives and a narration is due on it):

  cpu        preprocessing on the CPU (resize, normalise, patchify: `processor` + `batch_views`)
  tower      SigLIP vision tower on the one 448-px view
  resampler  perceiver resampler -> query_num features
  frame      frame prefill: its placeholder span onto the cache
  prompt     narration prompt prefill (`{prompt}<|im_end|>\\n<|im_start|>assistant\\n...`)
  first      sampling the first token (argmax, read back)
  total      frame arrival -> first token (the sum, measured end to end)

`--fused on` prefills the frame and the prompt in ONE pass (`SessionCore.generate(frame=...)`,
the narration-due path): `frame` is then 0 and `prompt` holds both; `--fused both` measures
each implementation both ways (rows `impl` and `impl+fused`). `--compile` picks the layers'
`mx.compile`d bodies (`framecast.model.compiled`: auto = as the product does on this device;
`both` adds `+compiled` rows beside the eager ones, decode rows too).

For each context length (`--minutes` at `--fps`, precomputed random features fill the window)
and each attention implementation (`--attention`, see `framecast.kernels.cache_attention`), it
runs `--steps` streaming steps (>= 10 for the README) on the same window (the frames a step
adds are trimmed before the next implementation), then `--steps` re-prefill steps: the new
frame's vision as above, then a fresh cache with the whole window + prompt prefilled in
`--chunk`-token chunks and the first token (what tools without a persistent cache do; older
frames are not re-encoded, which flatters the baseline). Rows: median and p95 in ms.

    python scripts/bench_latency.py                              # tiny fp32 shapes (CPU smoke)
    python scripts/bench_latency.py --shape real --json          # MiniCPM-V 4.5 / Qwen3-8B, bf16
    python scripts/bench_latency.py --shape real --attention sdpa bucket matmul kernel
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time

import framecast  # noqa: F401  (OpenBLAS preload before mlx)
import mlx.core as mx
import numpy as np
from bench_streaming import PROMPT, build_model, random_features, reprefill_turn

from framecast.engine.session import SessionCore
from framecast.errors import UserError
from framecast.kernels import _VERIFIED
from framecast.kernels import cache_attention as ca
from framecast.model.compiled import compile_layers, wanted
import mlx.nn as nn  # noqa: E402

from framecast.model.lm.base import MLP, Attention
from framecast.model.resampler import sincos_2d
from framecast.model.vision import batch_views
from framecast.model.vlm import ImageFeatures
from framecast.testing import random_image

PARTS = ("cpu", "tower", "resampler", "frame", "prompt", "first", "total")


def _stats(samples: list[float]) -> dict:
    a = np.asarray(samples) * 1e3
    return {"median": round(float(np.median(a)), 2), "p95": round(float(np.percentile(a, 95)), 2)}


def encode_frame(model, image: np.ndarray) -> tuple[ImageFeatures, dict]:
    """One frame through vision, each part timed to completion (the GPU is drained first)."""
    t0 = time.perf_counter()
    processed = model.processor.preprocess(image, max_slice_nums=1)
    patches, pos, valid, sizes = batch_views(processed.views, model.vpm.args.patch_size,
                                             model.vpm.args.num_patches_per_side)
    t1 = time.perf_counter()
    hidden = model.vpm(mx.array(patches), mx.array(pos), mx.array(valid))
    mx.eval(hidden)
    t2 = time.perf_counter()
    feats = model.resampler(hidden, sizes)
    mx.eval(feats)
    t3 = time.perf_counter()
    return ImageFeatures(feats, processed.grid), {"cpu": t1 - t0, "tower": t2 - t1, "resampler": t3 - t2}


def streaming_step(model, core: SessionCore, image: np.ndarray, pts: float, *, fused: bool) -> dict:
    mx.synchronize()
    t0 = time.perf_counter()
    feat, parts = encode_frame(model, image)
    t_frame = time.perf_counter()
    if fused:
        turn = core.generate(PROMPT, max_tokens=1, ignore_eos=True, frame=feat, pts=pts)
        parts["frame"] = 0.0
    else:
        core.add_features(feat, pts)
        turn = core.generate(PROMPT, max_tokens=1, ignore_eos=True)
        parts["frame"] = time.perf_counter() - t_frame
    t_prompt = t_frame + parts["frame"]
    parts["prompt"] = turn.prefill_s
    parts["first"] = turn.first_token_s - turn.prefill_s
    parts["total"] = t_prompt + turn.first_token_s - t0
    mx.synchronize()  # the speculative next decode step must not leak into the next sample
    return parts


def reprefill_step(model, core: SessionCore, feats: list[ImageFeatures], image: np.ndarray, *, chunk: int) -> float:
    """Vision of the new frame, then the whole window + prompt from an empty cache up to the first
    token (bench_streaming's re-prefill turn): seconds."""
    mx.synchronize()
    t0 = time.perf_counter()
    feat, _ = encode_frame(model, image)
    reprefill_turn(model, core, feats + [feat], max_tokens=1, chunk=chunk)
    return time.perf_counter() - t0


def vision_variants(model, image: np.ndarray, samples: int) -> dict:
    """Tower and resampler eager vs `mx.compile`d (fixed 448-px shapes: one trace), ms."""
    processed = model.processor.preprocess(image, max_slice_nums=1)
    patches, pos, _valid, sizes = batch_views(processed.views, model.vpm.args.patch_size,
                                              model.vpm.args.num_patches_per_side)
    patches, pos = mx.array(patches), mx.array(pos)
    tower = lambda p, q: model.vpm(p, q, None)  # noqa: E731 - one view: every patch valid
    resampler = lambda h: model.resampler(h, sizes)  # noqa: E731

    def resampler_before(h: mx.array) -> mx.array:
        """The resampler as it was before issue 14: the position table rebuilt in numpy per call."""
        r = model.resampler
        x = r.ln_kv(r.kv_proj(h) if "kv_proj" in r else h)
        b, n, _ = x.shape
        table = np.zeros((b, n, r.embed_dim), np.float32)
        valid = np.zeros((b, n), bool)
        for i, (nh, nw) in enumerate(sizes):
            table[i, : nh * nw] = sincos_2d(r.embed_dim, nh, nw).reshape(nh * nw, -1)
            valid[i, : nh * nw] = True
        valid = mx.array(valid)
        out = r.attn(r.ln_q(r.query), x + mx.array(table).astype(x.dtype), x, None if bool(mx.all(valid)) else valid)
        return r.ln_post(out) @ r.proj

    fns = {"tower": (tower, mx.compile(tower), (patches, pos)),
           "resampler": (resampler, mx.compile(resampler), None),
           "resampler_before_fix": (resampler_before, None, None)}
    hidden = tower(patches, pos)
    mx.eval(hidden)
    resampler(hidden)  # fills the position-table cache outside any trace
    out = {}
    for name, (eager, compiled, inputs) in fns.items():
        inputs = inputs or (hidden,)
        for label, fn in (("eager", eager), ("compiled", compiled)):
            if fn is None:
                continue
            mx.eval(fn(*inputs))
            times = []
            for _ in range(samples):
                mx.synchronize()
                t0 = time.perf_counter()
                mx.eval(fn(*inputs))
                times.append(time.perf_counter() - t0)
            out[f"{name}_{label}"] = _stats(times)
        if compiled is None:
            continue
        ref, got = eager(*inputs).astype(mx.float32), compiled(*inputs).astype(mx.float32)
        scale = float(mx.max(mx.abs(ref)).item()) or 1.0  # random weights may give zeros (proj init)
        out[f"{name}_compiled_rel_err"] = float(f"{float(mx.max(mx.abs(ref - got)).item()) / scale:.3g}")
    return out


# ---- a prototype, measured here only: q/k/v and gate/up as one matmul each (fewer launches)


class _FusedQKV(Attention):
    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        B, L, _ = x.shape
        hd, nq, nkv = self.head_dim, self.n_heads, self.n_kv_heads
        qkv = (x @ self.qkv_weight.T).reshape(B, L, nq + 2 * nkv, hd)  # [B, L, heads, hd]
        q, k, v = qkv[:, :, :nq], qkv[:, :, nq:nq + nkv], qkv[:, :, nq + nkv:]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        q = self.rope(q, offset=cache.offset)
        k = self.rope(k, offset=cache.offset)
        k, v = cache.update_and_fetch(k, v)
        out = ca.cache_attention(q, k, v, scale=self.scale, buffers=getattr(cache, "buffers", None))
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class _FusedGateUp(MLP):
    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(x @ self.gate_up_weight.T, 2, axis=-1)
        return self.down_proj(nn.silu(gate) * up)


def fuse_projections(model, on: bool) -> None:
    """Switch every decoder layer to (on) / from (off) the fused projections; weights kept both ways."""
    for layer in model.language_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if on and "qkv_weight" not in attn:
            attn.qkv_weight = mx.concatenate([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            mlp.gate_up_weight = mx.concatenate([mlp.gate_proj.weight, mlp.up_proj.weight])
            mx.eval(attn.qkv_weight, mlp.gate_up_weight)
        attn.__class__ = _FusedQKV if on else Attention
        mlp.__class__ = _FusedGateUp if on else MLP


def decode_rate(core: SessionCore, tokens: int) -> float:
    """Decode tokens/s of one narration on the current window (turn trimmed afterwards)."""
    turn = core.generate(PROMPT, max_tokens=tokens, ignore_eos=True)
    return turn.tokens_per_s


def run(args: argparse.Namespace) -> dict:
    model, dtype = build_model(args.shape if args.shape == "real" else "tiny", args.version, args.layers)
    impls = args.attention or [ca.current_impl()]
    build_impl = args.build_attention or ca.current_impl()
    per_frame = 1  # features are precomputed for the window; a step encodes a real image
    frames_needed = int(max(args.minutes) * 60 * args.fps) + 2
    feats = random_features(model, frames_needed)
    size = model.processor.scale_resolution if hasattr(model.processor, "scale_resolution") else 448
    images = [random_image(size, size, seed=i) for i in range(4)]
    core = SessionCore(model, keep_generated=False, max_cache_tokens=args.max_cache_tokens)

    # warm-up: every implementation on both paths (kernel compilation, allocator, plans)
    ca.set_impl(build_impl)
    for i in range(3):
        core.add_features(feats[i], float(i))
    both = {"off": [False], "on": [True], "both": [False, True]}
    modes = {"off": [False], "on": [True], "both": [False, True], "tower": ["tower"], "auto": [wanted()]}
    compiles = [c for name in args.compile for c in modes[name]]
    # (attention impl, frame + prompt fused, fused projections, compiled layers) per row
    variants = [(impl, fused, False, comp) for impl in impls for fused in both[args.fused] for comp in compiles]
    variants += [(impl, True, True, False) for impl in args.fuse_proj or []]  # the prototype runs eager
    for impl, fused, fp, comp in variants:
        ca.set_impl(impl)
        fuse_projections(model, fp)
        compile_layers(model, comp)
        for _ in range(2):
            streaming_step(model, core, images[0], 0.0, fused=fused)
    fuse_projections(model, False)
    compile_layers(model, compiles[-1])
    ca.set_impl(build_impl)
    reprefill_step(model, core, feats[:3], images[0], chunk=args.chunk)
    core.reset()
    compile_layers(model, False)  # vision_variants times eager against its own mx.compile
    vision = vision_variants(model, images[0], max(args.steps, 3))
    compile_layers(model, compiles[-1])
    if not args.json:
        print("vision (median ms): " + ", ".join(f"{k} {v['median'] if isinstance(v, dict) else v}"
                                                 for k, v in vision.items()), flush=True)

    rows, added = [], 0
    for minutes in sorted(args.minutes):
        target = int(minutes * 60 * args.fps)
        ca.set_impl(build_impl)
        while added < target:
            core.add_features(feats[added], added / args.fps)
            added += per_frame
        mx.synchronize()
        row = {"minutes": minutes, "frames": added, "context_tokens": core.offset,
               "cache_mb": round(core.nbytes / 2**20, 1), "impls": {}}
        for impl, fused, fp, comp in variants:
            ca.set_impl(impl)
            fuse_projections(model, fp)
            compile_layers(model, comp)
            offset, n_spans, n_frames = core.offset, len(core.spans), core.frames_added
            samples = [streaming_step(model, core, images[s % len(images)], (added + s) / args.fps, fused=fused)
                       for s in range(args.steps)]
            core._rollback(offset)  # the window is the same for every implementation
            del core.spans[n_spans:]
            core.frames_added = n_frames
            entry = {p: _stats([s[p] for s in samples]) for p in PARTS}
            name = impl + ("+fused" if fused else "") + ("+qkv" if fp else "") + {False: "", True: "+compiled",
                                                                                  "tower": "+tower"}[comp]
            row["impls"][name] = entry
            if not args.json:
                print(_line(row, name, entry), flush=True)
        ca.set_impl(build_impl)
        fuse_projections(model, False)
        compile_layers(model, compiles[-1])
        if args.decode_tokens:  # decode attention is the same for every impl (one query)
            modes = [(False, comp) for comp in compiles] + ([(True, False)] if args.fuse_proj else [])
            for fp, comp in modes:
                fuse_projections(model, fp)
                compile_layers(model, comp)
                label = "decode" + ("+qkv" if fp else "") + {False: "", True: "+compiled", "tower": "+tower"}[comp]
                key = label.replace("decode", "decode_tok_s").replace("+", "_")
                rates = [decode_rate(core, args.decode_tokens) for _ in range(args.decode_samples)]
                row[key] = round(float(np.median(rates)), 1)
                row[key + "_p5"] = round(float(np.percentile(rates, 5)), 1)  # the slow end
                if not args.json:
                    print(f"{minutes:>5} {label:<20} {row[key]} tok/s (p5 {row[key + '_p5']}) over "
                          f"{args.decode_tokens} tokens, {args.decode_samples} narrations", flush=True)
            fuse_projections(model, False)
            compile_layers(model, compiles[-1])
        if args.reprefill_steps:
            base = [reprefill_step(model, core, feats[:added], images[s % len(images)], chunk=args.chunk)
                    for s in range(args.reprefill_steps)]
            row["reprefill_total"] = _stats(base)
            best = min(row["impls"].values(), key=lambda e: e["total"]["median"])
            row["ratio_reprefill_vs_best"] = round(row["reprefill_total"]["median"] / best["total"]["median"], 1)
            if not args.json:
                print(f"{minutes:>5} {'re-prefill':<20} total {row['reprefill_total']['median']:.1f} "
                      f"(p95 {row['reprefill_total']['p95']:.1f}); x {row['ratio_reprefill_vs_best']}", flush=True)
        rows.append(row)
    ca.set_impl(None)
    try:
        device_name = str(mx.device_info().get("device_name", mx.default_device()))
    except Exception:  # noqa: BLE001 - a label only
        device_name = platform.processor() or platform.machine()
    return {"bench": "latency", "shape": args.shape, "dtype": dtype, "device": str(mx.default_device()),
            "device_name": device_name, "mlx": mx.__version__, "fps": args.fps, "steps": args.steps,
            "reprefill_steps": args.reprefill_steps, "chunk": args.chunk, "fused": args.fused,
            "compile": args.compile,
            "layers": len(model.language_model.layers), "build_attention": build_impl,
            "kernels_verified": {"/".join(map(str, k)): v for k, v in _VERIFIED.items()}, "vision": vision,
            "rows": rows}


HEADER = (f"{'min':>5} {'impl':<20} {'ctx':>6} " + " ".join(f"{p:>10}" for p in PARTS)
          + "   (median ms; total p95)")


def _line(row: dict, impl: str, e: dict) -> str:
    cells = " ".join(f"{e[p]['median']:>10.2f}" for p in PARTS)
    return f"{row['minutes']:>5} {impl:<20} {row['context_tokens']:>6} {cells}   p95 {e['total']['p95']:.1f}"


def check_args(args: argparse.Namespace) -> str | None:
    """The first bad option as one line, or None."""
    for name in ("minutes", "fps"):
        values = getattr(args, name) if isinstance(getattr(args, name), list) else [getattr(args, name)]
        for v in values:
            if not 0 < v < math.inf:  # NaN fails too
                return f"--{name} {v}: must be a positive number"
    for name, low in (("steps", 1), ("reprefill_steps", 0), ("chunk", 1), ("layers", 1), ("decode_tokens", 0),
                      ("decode_samples", 1), ("max_cache_tokens", 1)):
        v = getattr(args, name)
        if v is not None and v < low:
            return f"--{name.replace('_', '-')} {v}: must be at least {low}"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--shape", choices=["tiny", "real"], default="tiny",
                    help="tiny fp32 config (CPU smoke) or MiniCPM-V 4.5 / Qwen3-8B shapes in bf16")
    ap.add_argument("--version", choices=["2.6", "4.0", "4.5"], default="4.5", help="tiny shapes only")
    ap.add_argument("--minutes", type=float, nargs="+", default=[1, 2, 5, 10])
    ap.add_argument("--fps", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=10, help="streaming steps per row and implementation")
    ap.add_argument("--reprefill-steps", type=int, default=None, help="re-prefill samples per row (default --steps; 0 = skip)")
    ap.add_argument("--attention", nargs="+", choices=ca.IMPLS, default=None,
                    help="prefill attention implementations to compare (default: this backend's default)")
    ap.add_argument("--build-attention", choices=ca.IMPLS, default=None,
                    help="implementation used to fill the window and for re-prefill (default: the backend's)")
    ap.add_argument("--fused", choices=["off", "on", "both"], default="off",
                    help="prefill frame + prompt in one pass (on), or measure both ways")
    ap.add_argument("--fuse-proj", nargs="+", choices=ca.IMPLS, default=None,
                    help="also measure these impls (fused frame+prompt) with q/k/v and gate/up as one matmul each")
    ap.add_argument("--compile", choices=["auto", "off", "on", "tower", "both"], nargs="+", default=["auto"],
                    help="what is compiled (framecast.model.compiled), one set of rows each: as the product does "
                         "here (auto), nothing, the tower and the decoder layers (on), the tower only; both = off on")
    ap.add_argument("--decode-tokens", type=int, default=0, help="also measure decode tok/s over this many tokens")
    ap.add_argument("--decode-samples", type=int, default=10, help="narrations per decode row (median, p5)")
    ap.add_argument("--chunk", type=int, default=None, help="re-prefill chunk (default 512 CPU, 2048 GPU)")
    ap.add_argument("--max-cache-tokens", type=int, default=None, help="session budget (default unbounded)")
    ap.add_argument("--layers", type=int, default=None, help="override the LM depth (smoke tests)")
    ap.add_argument("--json", action="store_true", help="one JSON object on the last line")
    ap.add_argument("--json-out", default=None, help="also write the JSON object to this file")
    args = ap.parse_args(argv)
    problem = check_args(args)
    if problem:
        ap.error(problem)  # one line, exit 2
    args.compile = list(dict.fromkeys(args.compile))  # a mode named twice is one set of rows
    if args.reprefill_steps is None:
        args.reprefill_steps = args.steps
    if args.chunk is None:
        args.chunk = 2048 if mx.default_device() == mx.gpu else 512
    if not args.json:
        print(f"bench_latency: shape={args.shape} device={mx.default_device()} fps={args.fps} steps={args.steps}"
              f" fused={args.fused}", flush=True)
        print(HEADER, flush=True)
    try:
        result = run(args)
    except UserError as e:  # a setting the model cannot honour (e.g. a budget below the prompt)
        print(f"bench_latency: {e}", file=sys.stderr)
        return 2
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    if args.json:
        for row in result["rows"]:
            for impl, e in row["impls"].items():
                print(_line(row, impl, e))
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
