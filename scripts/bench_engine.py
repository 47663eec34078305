"""Engine micro-benchmark: per-component timings of MiniCPM-V on random weights.

For each shape (tiny test config; MiniCPM-V 4.0- and 2.6-sized) and each weight format
(float baseline: fp32 on CPU / bf16 on GPU; 4-bit group-64), measures:
  processor  - slicing/resize/normalise of one image (host work)
  vision     - SigLIP tower on one image's single view (448x448 -> 1024 patches for real shapes)
  resampler  - that view's tokens -> query_num tokens
  prefill64  - 64 prompt tokens on a fresh KV cache
  decode     - tokens/s of greedy decoding after the prefill (pipelined `generate_tokens`)
  peak       - peak device memory of the case (weights included)
Ratios compare each format with the float baseline of the same shape, measured in this run.

    python scripts/bench_engine.py                      # CPU: tiny only (real shapes are slow)
    python scripts/bench_engine.py --shapes tiny,v4.0,v2.6 --json
Prints a table; with --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import framecast  # noqa: E402,F401  (OpenBLAS preload before mlx)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from framecast.model.convert import quantize_linears  # noqa: E402
from framecast.engine.generate import generate_tokens  # noqa: E402
from framecast.model.vlm import MiniCPMV, VLMArgs  # noqa: E402

SIGLIP_400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16,
               "num_hidden_layers": 27, "patch_size": 14, "image_size": 980}
REAL_COMMON = {"query_num": 64, "image_size": 448, "patch_size": 14, "slice_mode": True,
               "slice_config": {"max_slice_nums": 9, "patch_size": 14}, "vision_config": SIGLIP_400M,
               "rms_norm_eps": 1e-6, "max_position_embeddings": 32768}
SHAPES = {
    # MiniCPM-V 2.6: Qwen2-7B
    "v2.6": {**REAL_COMMON, "model_type": "minicpmv", "version": 2.6, "hidden_size": 3584,
             "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "vocab_size": 151666, "rope_theta": 1e6, "tie_word_embeddings": False},
    # MiniCPM-V 4.0: Llama-class MiniCPM4 LM, hidden 2560 (layer count / MLP / KV heads approximate)
    "v4.0": {**REAL_COMMON, "model_type": "minicpmv", "version": 4.0, "hidden_size": 2560,
             "intermediate_size": 10240, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 2, "head_dim": 80, "vocab_size": 73448, "rope_theta": 1e4,
             "tie_word_embeddings": False},
}


def tiny_shape() -> dict:
    from framecast.testing import tiny_config

    return tiny_config("2.6", scale_resolution=56)


def build(config: dict, fmt: str, float_dtype) -> tuple[MiniCPMV, float]:
    """Random-weight model in `fmt` ('float' or '4bit'); returns (model, weights MB)."""
    model = MiniCPMV(VLMArgs.from_config(config), tokenizer=None)
    model.set_dtype(float_dtype)
    for _, p in tree_flatten(model.parameters()):  # materialise one tensor at a time (bounded peak)
        mx.eval(p)
    if fmt == "4bit":
        quantize_linears(model, 4)
        for _, p in tree_flatten(model.parameters()):
            mx.eval(p)
    nbytes = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    return model, nbytes / 1e6


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() (which must evaluate its own result), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class _NoStopTokenizer:
    eos_ids: set[int] = set()


def bench_case(name: str, config: dict, fmt: str, float_dtype, *, repeats: int, decode_tokens: int) -> dict:
    mx.clear_cache()
    model, weights_mb = build(config, fmt, float_dtype)
    model.tokenizer = _NoStopTokenizer()
    mx.reset_peak_memory()
    rng = np.random.default_rng(0)
    side = model.processor.scale_resolution
    image = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)

    t_proc = timed(lambda: model.processor.preprocess(image, max_slice_nums=1), repeats)
    view = model.processor.preprocess(image, max_slice_nums=1).views
    hidden, sizes = model.vpm.encode_views(view)
    mx.eval(hidden)

    def vision():
        h, _ = model.vpm.encode_views(view)
        mx.eval(h)

    def resample():
        mx.eval(model.resampler(hidden, sizes))

    t_vis = timed(vision, repeats)
    t_res = timed(resample, repeats)

    vocab = config["vocab_size"]
    prompt = rng.integers(0, vocab, size=64).tolist()

    def prefill():
        cache = model.make_cache()
        mx.eval(model.forward(mx.array([prompt]), cache)[:, -1])

    t_pre = timed(prefill, repeats)

    def decode():
        cache = model.make_cache()
        gen = generate_tokens(model, prompt, max_tokens=decode_tokens + 1, cache=cache, stop_ids=set())
        next(gen)  # prefill + first token
        t = time.perf_counter()
        n = sum(1 for _ in gen)
        return n / (time.perf_counter() - t)

    decode()  # warm-up
    tps = statistics.median(decode() for _ in range(max(1, repeats // 2)))
    peak = mx.get_peak_memory() / 1e6
    return {"shape": name, "format": fmt if fmt == "4bit" else str(float_dtype).split(".")[-1],
            "weights_mb": round(weights_mb, 1), "processor_ms": round(t_proc * 1e3, 2),
            "vision_ms_per_image": round(t_vis * 1e3, 2), "vision_patches": int(sizes[0][0] * sizes[0][1]),
            "resampler_ms": round(t_res * 1e3, 2), "prefill64_ms": round(t_pre * 1e3, 2),
            "prefill_tok_s": round(64 / t_pre, 1), "decode_tok_s": round(tps, 1), "peak_mb": round(peak, 1)}


def main(argv: list[str] | None = None) -> int:
    on_cpu = mx.default_device() == mx.cpu
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--shapes", default="tiny" if on_cpu else "tiny,v4.0,v2.6",
                   help="comma list of: tiny, v4.0, v2.6 (default on CPU: tiny)")
    p.add_argument("--formats", default="float,4bit", help="comma list of: float, 4bit")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--max-layers", type=int, default=None,
                   help="cap vision and LM layers (smoke test of real widths; not a real timing)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    # CPU: fp32 activations (bf16 into quantized matmuls is very slow there); GPU: bf16.
    float_dtype = mx.float32 if on_cpu else mx.bfloat16
    rows = []
    for shape in a.shapes.split(","):
        config = tiny_shape() if shape == "tiny" else SHAPES[shape]
        if a.max_layers:  # smoke-test real widths cheaply (timings then are not the real model's)
            config = {**config, "num_hidden_layers": min(config["num_hidden_layers"], a.max_layers),
                      "vision_config": {**config["vision_config"], "num_hidden_layers": min(
                          config["vision_config"]["num_hidden_layers"], a.max_layers)}}
        base = None
        for fmt in a.formats.split(","):
            r = bench_case(shape, config, fmt, float_dtype, repeats=a.repeats, decode_tokens=a.decode_tokens)
            base = base or r
            r["decode_vs_float"] = round(r["decode_tok_s"] / base["decode_tok_s"], 2)
            r["prefill_vs_float"] = round(base["prefill64_ms"] / r["prefill64_ms"], 2)
            rows.append(r)
            print(f"  done {shape} {r['format']}", file=sys.stderr, flush=True)
    device = str(mx.default_device())
    head = (f"{'shape':<6}{'format':<9}{'weights MB':>11}{'proc ms':>9}{'vision ms':>10}{'resamp ms':>10}"
            f"{'prefill64 ms':>13}{'decode tok/s':>13}{'peak MB':>10}{'decode x':>9}{'prefill x':>10}")
    print(f"engine benchmark on {device} (random weights; vision = one single-view image)")
    print(head)
    for r in rows:
        print(f"{r['shape']:<6}{r['format']:<9}{r['weights_mb']:>11.1f}{r['processor_ms']:>9.2f}"
              f"{r['vision_ms_per_image']:>10.2f}{r['resampler_ms']:>10.2f}{r['prefill64_ms']:>13.2f}"
              f"{r['decode_tok_s']:>13.1f}{r['peak_mb']:>10.1f}{r['decode_vs_float']:>9.2f}{r['prefill_vs_float']:>10.2f}")
    if a.json:
        print(json.dumps({"bench": "engine", "device": device, "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
