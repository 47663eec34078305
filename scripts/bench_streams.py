"""Several streams on one model: aggregate frames/s, narration tok/s and first-token latency
for 1, 4, 16, 64 streams sharing one loaded model and one worker thread.

Each row runs N streams the way `framecast run` with `[[streams]]` does: every tick, one frame
per stream arrives at once; the frames go through the shared `BatchEncoder` (one vision-tower
call for all streams) and onto the sessions' caches: `--prefill batched` (the default, as `framecast
run` does) appends all streams' frame spans in one batched prefill (`BatchPrefill`), `separate`
prefills each stream's span alone (as before), `both` measures the two in the same run; every
`--narrate-every` ticks all N streams narrate at once (`--max-tokens` tokens, EOS ignored),
their turns interleaving step by step on the worker. Measured per row:

  frames/s      N x group / (tick wall time): encode + per-stream prefill (median and the
                slow 5 % of ticks)
  tok/s         narration tokens of all streams / narration wall time (median, p95 over rounds)
  first ms      trigger -> first token of each stream's narration (p50, p95 over N x rounds)
  peak MB       MLX peak memory during the row (weights included)

The turns' decode steps go through a shared `BatchDecode` in the batched rows (`--decode
batched`, the default, as `framecast run` does: the steps of turns that overlap run as one
batched forward) or one stream at a time (`--decode separate`, turns interleaving step by
step; `--decode both` measures the two in the same run). Ratios are against the 1-stream row
of the same run (always measured first, prefilled and decoded alone: with one stream the modes
are the same calls).

    python scripts/bench_streams.py                         # tiny config, fp32 (CPU smoke)
    python scripts/bench_streams.py --shapes real           # MiniCPM-V 4.5 shapes (Qwen3-8B +
                                                            # SigLIP-400M), random weights, bf16
    python scripts/bench_streams.py --shapes real --bits 4  # the LM's linears 4-bit (group 64)
    python scripts/bench_streams.py --shapes real --group 3 # 4.5's 3-frame groups per stream
    ... --json                                              # one JSON object on the last line
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time

import framecast  # noqa: F401  (OpenBLAS preload before mlx)
import mlx.core as mx
import numpy as np
from framecast.engine.scheduler import BatchDecode, BatchEncoder, BatchPrefill
from framecast.engine.session import StreamingSession, TurnDone
from framecast.engine.worker import worker_for
from framecast.errors import UserError
from framecast.model.compiled import compile_layers
from framecast.model.kv_pool import KVPoolSet
from framecast.model.tokenizer import Tokenizer
from framecast.model.vlm import MiniCPMV
from framecast.testing import REAL_45, build_tokenizer, random_image, tiny_config

PROMPT = "Describe what happens now in one short sentence."
DEFAULT_STREAMS = (1, 4, 16, 64)
DEFAULT_BUDGET = 4096  # tokens per session: the rows' frames and turns fit without eviction



def build_model(shapes: str, bits: int | None, layers: int | None, group: int = 1) -> tuple[MiniCPMV, str]:
    """Random weights with the chosen shapes and the tiny byte-level tokenizer (its ids are
    valid in any vocabulary at least that large: the text only shapes the token count)."""
    tokenizer = Tokenizer(build_tokenizer(), {"eos_token": "<|im_end|>"})
    if shapes == "real":
        cfg, dtype = dict(REAL_45), mx.bfloat16
    else:
        cfg, dtype = tiny_config("4.5" if group > 1 else "2.6", query_num=64), mx.float32
    if layers:
        cfg["num_hidden_layers"] = layers
    model = MiniCPMV.from_config(cfg, tokenizer=tokenizer)
    model.set_dtype(dtype)
    label = str(dtype).split(".")[-1]
    if bits:
        from framecast.model.convert import quantize_linears

        quantize_linears(model.language_model, bits)
        label += f"+{bits}bit"
    mx.eval(model.parameters())
    if compile_layers(model) and model.language_model.layers[0].compiled:  # as load_model does here
        label += "+compiled"
    return model, label


def _peak_mb() -> float:
    get = getattr(mx, "get_peak_memory", None) or mx.metal.get_peak_memory
    return get() / 2**20


def _reset_peak() -> None:
    reset = getattr(mx, "reset_peak_memory", None) or mx.metal.reset_peak_memory
    reset()


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


async def one_row(model: MiniCPMV, n: int, *, ticks: int, narrate_every: int, max_tokens: int,
                  image: np.ndarray, group: int = 1, batched: bool = True, decode: bool = False,
                  pooled: bool = False, max_cache_tokens: int = DEFAULT_BUDGET) -> dict:
    worker = worker_for(model)
    await worker.run(_reset_peak)
    encoder = BatchEncoder(model, worker=worker, max_batch=n * group)  # one call a tick
    prefill = BatchPrefill(model, worker=worker, max_rows=n) if batched else None
    decoder = BatchDecode(model) if decode and n > 1 else None
    pool = KVPoolSet(len(model.language_model.layers), rows=n, capacity=max_cache_tokens) if pooled and n > 1 else None
    sessions = [StreamingSession(model, worker=worker, keep_generated=False, prefill=prefill, decode=decoder,
                                 kv_pool=pool, max_cache_tokens=max_cache_tokens) for _ in range(n)]
    turn_started: dict[int, float] = {}
    for i, s in enumerate(sessions):  # when each turn really starts on the worker
        s.core.turn = _timed(s.core.turn, turn_started, i)
    await asyncio.gather(*(s.start() for s in sessions))

    async def add(s: StreamingSession, pts: float) -> None:
        if group > 1:  # MiniCPM-V 4.5: `group` frames per 3D-resampler group, one span per group
            feat = await encoder.group([image] * group, [round((pts + k / 10) * 10) for k in range(group)])
        else:
            (feat,) = await encoder([image])
        await s.add_frame(feat, pts)

    async def narrate(s: StreamingSession) -> TurnDone:
        async for ev in s.narrate(PROMPT, max_tokens=max_tokens, ignore_eos=True):
            if isinstance(ev, TurnDone):
                return ev

    frame_rates, tok_rates, first_ms = [], [], []
    for t in range(ticks):
        t0 = time.perf_counter()
        await asyncio.gather(*(add(s, t / 2) for s in sessions))
        frame_rates.append(n * group / (time.perf_counter() - t0))
        if (t + 1) % narrate_every:
            continue
        t1 = time.perf_counter()
        done = await asyncio.gather(*(narrate(s) for s in sessions))
        tok_rates.append(sum(d.tokens for d in done) / (time.perf_counter() - t1))
        first_ms += [(turn_started[i] - t1 + d.first_token_s) * 1e3 for i, d in enumerate(done)]
    peak = await worker.run(_peak_mb)
    return {
        "streams": n, "prefill": "batched" if batched else "separate", "frames": n * ticks * group,
        "encode_calls": encoder.calls, "encode_rows_max": encoder.max_rows,
        "prefill_rows_max": prefill.max_rows_seen if prefill is not None else 1,
        "decode": "batched" if decoder is not None else "separate",
        "cache": "pooled" if pool is not None else "own",
        "decode_rows_max": decoder.max_rows_seen if decoder is not None else 1,
        "decode_rows_mean": round(decoder.rows / decoder.calls, 2) if decoder is not None and decoder.calls else 1.0,
        "frames_per_s": round(float(np.median(frame_rates)), 2),
        "frames_per_s_p95_low": round(_pct(frame_rates, 5), 2),  # the slow 5 % of ticks
        "tok_per_s": round(float(np.median(tok_rates)), 2) if tok_rates else 0.0,
        "first_ms_p50": round(_pct(first_ms, 50), 2), "first_ms_p95": round(_pct(first_ms, 95), 2),
        "frame_samples": len(frame_rates), "first_samples": len(first_ms),
        "cache_tokens": sessions[0].cache_tokens, "peak_mb": round(peak, 1),
    }


def _timed(turn, started: dict[int, float], key: int):
    def wrapper(*a, **kw):
        started[key] = time.perf_counter()
        return turn(*a, **kw)
    return wrapper


async def run_async(args: argparse.Namespace) -> dict:
    model, dtype = build_model(args.shapes, args.bits, args.layers, args.group)
    size = 448 if args.shapes == "real" else 56
    image = random_image(size, size, seed=0)
    counts = sorted(set(args.streams) | {1})
    # warm-up: kernels, allocator, attention at the key lengths the rows will see
    modes = _modes(args.prefill, args.decode, args.cache)  # (batched prefill, batched decode, pooled) per row
    for batched, dec, pooled in modes:
        await one_row(model, 2, ticks=2, narrate_every=2, max_tokens=2, image=image, group=args.group, batched=batched,
                      decode=dec, pooled=pooled, max_cache_tokens=args.max_cache_tokens)
    rows = []
    for n in counts:
        for batched, dec, pooled in ([(False, False, False)] if n == 1 else modes):
            row = await one_row(model, n, ticks=args.ticks, narrate_every=args.narrate_every,
                                max_tokens=args.max_tokens, image=image, group=args.group, batched=batched,
                                decode=dec, pooled=pooled, max_cache_tokens=args.max_cache_tokens)
            _add_row(rows, row, args.json)
    return {
        "bench": "streams", "shapes": args.shapes, "dtype": dtype,
        "layers": len(model.language_model.layers), "device": str(mx.default_device()),
        "machine": platform.machine(), "ticks": args.ticks, "narrate_every": args.narrate_every,
        "max_tokens": args.max_tokens, "image": size, "group": args.group, "prefill": args.prefill, "rows": rows,
    }


def _modes(prefill: str, decode: str, cache: str = "own") -> list[tuple[bool, bool, bool]]:
    """The (batched prefill, batched decode, pooled caches) a row count is measured with; batched
    decode and pooled caches ride on batched prefill (a separate-prefill row has neither)."""
    pre = {"batched": [True], "separate": [False], "both": [False, True]}[prefill]
    dec = {"batched": [True], "separate": [False], "both": [False, True]}[decode]
    pool = {"pooled": [True], "own": [False], "both": [False, True]}[cache]
    rows = [(p, d, c) for p in pre for d in (dec if p else [False]) for c in (pool if p else [False])]
    return list(dict.fromkeys(rows))


def _add_row(rows: list[dict], row: dict, quiet: bool) -> None:
    base = rows[0] if rows else row
    row["x_frames_per_s"] = round(row["frames_per_s"] / base["frames_per_s"], 2)
    row["x_tok_per_s"] = round(row["tok_per_s"] / base["tok_per_s"], 2) if base["tok_per_s"] else 0.0
    rows.append(row)
    if not quiet:
        print(_row(row), flush=True)


HEADER = (f"{'streams':>7} {'prefill':>8} {'decode':>8} {'frames/s':>9} {'x':>6} {'p5 fr/s':>8} {'tok/s':>8} {'x':>6} "
          f"{'1st p50':>8} {'1st p95':>8} {'enc rows':>8} {'dec rows':>8} {'cache':>6} {'peak MB':>9}")


def _row(r: dict) -> str:
    return (f"{r['streams']:>7} {r['prefill']:>8} {r['decode']:>8} {r['frames_per_s']:>9.1f} {r['x_frames_per_s']:>6.2f} "
            f"{r['frames_per_s_p95_low']:>8.1f} {r['tok_per_s']:>8.1f} {r['x_tok_per_s']:>6.2f} "
            f"{r['first_ms_p50']:>8.1f} {r['first_ms_p95']:>8.1f} {r['encode_rows_max']:>8} {r['decode_rows_mean']:>8.2f} "
            f"{r['cache']:>6} {r['peak_mb']:>9.1f}")


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: must be at least 1")
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--shapes", choices=["tiny", "real"], default="tiny")
    ap.add_argument("--bits", type=int, choices=[4, 8], help="quantise the LM's linears (group 64)")
    ap.add_argument("--streams", type=_positive, nargs="+", default=list(DEFAULT_STREAMS))
    ap.add_argument("--ticks", type=_positive, default=20, help="frames per stream (>= 10 samples a row)")
    ap.add_argument("--narrate-every", type=_positive, default=2, help="ticks between narrations")
    ap.add_argument("--max-tokens", type=_positive, default=16)
    ap.add_argument("--group", type=int, default=1, choices=range(1, 7), metavar="1-6",
                    help="frames per 4.5 3D-resampler group (each tick: one group per stream)")
    ap.add_argument("--prefill", choices=["batched", "separate", "both"], default="batched",
                    help="frame spans of all streams in one batched prefill, each alone, or both rows")
    ap.add_argument("--decode", choices=["batched", "separate", "both"], default="batched",
                    help="the turns' decode steps of all streams as one batched forward (rows with batched "
                         "prefill), one stream at a time, or both rows")
    ap.add_argument("--cache", choices=["own", "pooled", "both"], default="pooled",
                    help="sessions' caches as rows of shared buffers (pooled, as multi-stream runs do: one "
                         "attention for a batch's rows), each its own, or both rows (1 stream: always its own)")
    ap.add_argument("--max-cache-tokens", type=_positive, default=DEFAULT_BUDGET,
                    help="every session's token budget (the pool's row length)")
    ap.add_argument("--layers", type=_positive, default=None, help="override the LM depth (smoke tests)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not args.json:
        print(f"bench_streams: shapes={args.shapes} bits={args.bits} device={mx.default_device()} "
              f"ticks={args.ticks} narrate_every={args.narrate_every} max_tokens={args.max_tokens} "
              f"(x = ratio to 1 stream, same run)", flush=True)
        print(HEADER, flush=True)
    try:
        result = asyncio.run(run_async(args))
    except UserError as e:  # a setting the model cannot honour (a budget below the prompt, ...)
        print(f"bench_streams: {e}", file=sys.stderr)
        return 2
    if args.json:
        for r in result["rows"]:
            print(_row(r))
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
