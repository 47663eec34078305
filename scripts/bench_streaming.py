"""Latency of a narration with the streaming session vs re-prefilling the whole window.

For growing context (1, 2, 5, 10 minutes of video at 1 fps, one frame = one image placeholder
span), measure on the same model and machine:

  streaming  — the session already holds the window; a new frame arrives: prefill its span,
               then the narration turn (prompt prefill + `--max-tokens` decoded tokens);
  re-prefill — what mlx-vlm and most tools do: a fresh cache, prefill the whole window plus
               the prompt (chunked, `--chunk` tokens at a time), then the same decode.

Both use precomputed vision features (the re-prefill baseline is NOT charged for re-encoding
every frame, which real tools also pay), the same prompt and a fixed number of generated tokens
(EOS ignored). Reported per row: the median (and p95) over `--repeats` samples (default 10;
each streaming sample adds one frame) of the time to first token and the total turn time, and
their ratio (re-prefill / streaming, medians).

    python scripts/bench_streaming.py                  # tiny config, fp32 (CPU-friendly)
    python scripts/bench_streaming.py --shapes real    # MiniCPM-V 4.5 shapes (Qwen3-8B), bf16,
                                                       # random weights: for the GPU machine
    ... --json                                         # one JSON object on the last line
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import framecast  # noqa: E402,F401  (OpenBLAS preload before mlx)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from framecast.model.tokenizer import Tokenizer  # noqa: E402
from framecast.model.vlm import ImageFeatures, MiniCPMV  # noqa: E402
from framecast.engine.session import SessionCore  # noqa: E402

PROMPT = "Describe what happens now in one short sentence."
DEFAULT_MINUTES = (1, 2, 5, 10)



def build_model(shapes: str, version: str, layers: int | None = None) -> tuple[MiniCPMV, str]:
    """Random-weight model with the chosen shapes and the tiny byte-level tokenizer (its ids are
    valid in any vocabulary at least that large: the text only shapes the token count)."""
    from framecast.testing import REAL_45, build_tokenizer, tiny_config

    tokenizer = Tokenizer(build_tokenizer(), {"eos_token": "<|im_end|>"})
    if shapes == "real":
        cfg, dtype = dict(REAL_45), mx.bfloat16
    else:
        cfg, dtype = tiny_config(version, query_num=64), mx.float32
    if layers:  # smoke tests of the real shapes on a small machine
        cfg["num_hidden_layers"] = layers
    model = MiniCPMV.from_config(cfg, tokenizer=tokenizer)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model, str(dtype).split(".")[-1]


def random_features(model: MiniCPMV, n: int, seed: int = 0) -> list[ImageFeatures]:
    """One overview view per frame: [1, query_num, D] features, like the encoder's output."""
    d, q = model.args.hidden_size, model.args.query_num
    dtype = model.language_model.layers[0].self_attn.q_proj.weight.dtype
    rng = np.random.default_rng(seed)
    base = [mx.array(rng.standard_normal((1, q, d)).astype(np.float32)).astype(dtype) for _ in range(8)]
    mx.eval(base)
    return [ImageFeatures(base[i % len(base)], None) for i in range(n)]


def reprefill_turn(model: MiniCPMV, core: SessionCore, feats: list[ImageFeatures], *, max_tokens: int,
                   chunk: int) -> tuple[float, float]:
    """Fresh cache, whole window + prompt prefilled in chunks, then greedy decode: (ttft, total)."""
    t0 = time.perf_counter()
    text = (f"<|im_start|>system\n{core.system_prompt}<|im_end|>\n<|im_start|>user\n"
            + "".join(model.image_placeholder(f) + "\n" for f in feats)
            + PROMPT + "<|im_end|>\n" + core.assistant_prefix)
    ids = model.tokenizer.encode(text)
    cache = model.make_cache()
    h = model.embed(mx.array([ids], dtype=mx.int32), feats)  # [1, T, D]
    lm = model.language_model
    for start in range(0, len(ids) - 1, chunk):
        end = min(start + chunk, len(ids) - 1)
        out = lm.model(h[:, start:end], cache)
        mx.eval(out, [c.state for c in cache])
    logits = lm(cache=cache, input_embeddings=h[:, len(ids) - 1:], last_only=True)[:, -1, :]
    token = mx.argmax(logits, axis=-1)
    mx.eval(token)
    ttft = time.perf_counter() - t0
    # the same pipelined decode as the session (next step queued before the token is read)
    for _ in range(max_tokens - 1):
        nxt = mx.argmax(lm(token.reshape(1, 1), cache=cache)[:, -1, :], axis=-1)
        mx.async_eval(nxt)
        token.item()
        token = nxt
    token.item()
    return ttft, time.perf_counter() - t0


def streaming_turn(core: SessionCore, feat: ImageFeatures, pts: float, *, max_tokens: int) -> tuple[float, float, float]:
    """A new frame arrives on a warm session, then a narration: (frame_ms, ttft, total)."""
    t0 = time.perf_counter()
    core.add_features(feat, pts)
    t_frame = time.perf_counter() - t0
    turn = core.generate(PROMPT, max_tokens=max_tokens, ignore_eos=True)
    total = time.perf_counter() - t0
    return t_frame, t_frame + turn.first_token_s, total


def run(args: argparse.Namespace) -> dict:
    model, dtype = build_model(args.shapes, args.version, args.layers)
    # the window, plus one frame per streaming sample of every row
    frames_needed = int(max(args.minutes) * 60 * args.fps) + args.repeats * len(args.minutes) + 2
    feats = random_features(model, frames_needed + 8)
    core = SessionCore(model, keep_generated=False)  # the cache holds frames only: same window
    # warm-up (kernel compilation, allocator) on both paths
    for i in range(3):
        core.add_features(feats[i], float(i))
    core.generate(PROMPT, max_tokens=2, ignore_eos=True)
    reprefill_turn(model, core, feats[:3], max_tokens=2, chunk=args.chunk)
    core.reset()

    rows, added = [], 0
    for minutes in sorted(args.minutes):
        target = int(minutes * 60 * args.fps)
        while added < target:
            core.add_features(feats[added], added / args.fps)
            added += 1
        window = core.offset
        stream, baseline = [], []
        for _ in range(args.repeats):
            stream.append(streaming_turn(core, feats[added], added / args.fps, max_tokens=args.max_tokens))
            added += 1
            baseline.append(reprefill_turn(model, core, feats[:added], max_tokens=args.max_tokens, chunk=args.chunk))
        s_frame, s_first, s_total = (float(np.median([r[i] for r in stream])) for i in range(3))
        b_first, b_total = (float(np.median([r[i] for r in baseline])) for i in range(2))
        s_first_p95 = float(np.percentile([r[1] for r in stream], 95))
        b_first_p95 = float(np.percentile([r[0] for r in baseline], 95))
        rows.append({
            "minutes": minutes, "frames": target, "context_tokens": window,
            "cache_mb": round(core.nbytes / 2**20, 1),
            "stream_frame_ms": round(s_frame * 1e3, 2),
            "stream_first_ms": round(s_first * 1e3, 2), "stream_total_ms": round(s_total * 1e3, 2),
            "stream_first_p95_ms": round(s_first_p95 * 1e3, 2), "reprefill_first_p95_ms": round(b_first_p95 * 1e3, 2),
            "reprefill_first_ms": round(b_first * 1e3, 2), "reprefill_total_ms": round(b_total * 1e3, 2),
            "ratio_first": round(b_first / s_first, 2), "ratio_total": round(b_total / s_total, 2),
        })
        if not args.json:
            print(_row(rows[-1]), flush=True)
    return {
        "bench": "streaming", "shapes": args.shapes, "version": "4.5" if args.shapes == "real" else args.version,
        "dtype": dtype, "layers": len(model.language_model.layers), "device": str(mx.default_device()), "machine": platform.machine(),
        "fps": args.fps, "max_tokens": args.max_tokens, "chunk": args.chunk, "repeats": args.repeats,
        "tokens_per_frame": len(model.tokenizer.encode(model.image_placeholder(feats[0]) + "\n")),
        "rows": rows,
    }


HEADER = (f"{'min':>4} {'frames':>6} {'ctx tok':>8} {'cache MB':>9} {'frame ms':>9} "
          f"{'stream 1st':>11} {'stream tot':>11} {'reprefill 1st':>14} {'reprefill tot':>14} "
          f"{'x 1st':>7} {'x tot':>7}")


def _row(r: dict) -> str:
    return (f"{r['minutes']:>4} {r['frames']:>6} {r['context_tokens']:>8} {r['cache_mb']:>9.1f} "
            f"{r['stream_frame_ms']:>9.1f} {r['stream_first_ms']:>11.1f} {r['stream_total_ms']:>11.1f} "
            f"{r['reprefill_first_ms']:>14.1f} {r['reprefill_total_ms']:>14.1f} "
            f"{r['ratio_first']:>7.1f} {r['ratio_total']:>7.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--shapes", choices=["tiny", "real"], default="tiny")
    ap.add_argument("--version", choices=["2.6", "4.0", "4.5"], default="2.6", help="tiny shapes only")
    ap.add_argument("--minutes", type=float, nargs="+", default=list(DEFAULT_MINUTES))
    ap.add_argument("--fps", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=None, help="re-prefill chunk (default 512 CPU, 2048 GPU)")
    ap.add_argument("--repeats", type=int, default=10, help="samples per row (median and p95)")
    ap.add_argument("--layers", type=int, default=None, help="override the LM depth (smoke tests)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.chunk is None:
        args.chunk = 2048 if mx.default_device() == mx.gpu else 512
    if not args.json:
        print(f"bench_streaming: shapes={args.shapes} device={mx.default_device()} fps={args.fps} "
              f"max_tokens={args.max_tokens} (times in ms; x = re-prefill / streaming)", flush=True)
        print(HEADER, flush=True)
    result = run(args)
    if args.json:
        for r in result["rows"]:
            print(_row(r))
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
