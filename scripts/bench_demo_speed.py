"""How much faster than real time the main job runs on this machine (CPU): the demo source and
the embedded demo model through the whole `framecast run` graph.

    python scripts/bench_demo_speed.py [--frames 60] [--repeats 10] [--compare-model DIR] [--json]

Ratio = wall time / video duration (below 1 = faster than real time), median and p95 of
`--repeats` runs per row, the rows interleaved in one process so load changes hit them alike.
The baseline row is the same run without a model (`--capture-only`: source, change detector,
outputs), so the model's own share is the difference; `--compare-model DIR` adds a row for
another model directory (e.g. the previous demo weights, `git show REV:pipeline/demo_model/...`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

import framecast  # noqa: E402,F401  (OpenBLAS preload before mlx)

DEMO_FPS = 10.0  # stages/sources/demo.py DEFAULT_DEMO_FPS


def run_once(frames: int, *, capture_only: bool = False, model: str | None = None) -> tuple[float, int]:
    from framecast.stages.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.jsonl"
        args = ["run", "--source", "demo", "--max-frames", str(frames), "--jsonl", str(out), "--no-console"]
        if capture_only:
            args.append("--capture-only")
        if model:
            args += ["--model", model]
        t0 = time.perf_counter()
        rc = main(args)
        wall = time.perf_counter() - t0
        if rc != 0:
            raise SystemExit(f"framecast run exited with {rc}")
        events = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return wall, sum(e["type"] == "narration" for e in events)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=10, help="runs per row (median and p95)")
    ap.add_argument("--compare-model", default=None, help="another model directory to time beside the embedded one")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    duration = a.frames / DEMO_FPS
    kinds = {"capture only (baseline)": dict(capture_only=True), "demo model": {}}
    if a.compare_model:
        kinds[f"--model {Path(a.compare_model).name}"] = dict(model=a.compare_model)
    walls: dict[str, list[float]] = {k: [] for k in kinds}
    narrations: dict[str, int] = {}
    for _ in range(a.repeats):
        for name, kw in kinds.items():
            wall, n = run_once(a.frames, **kw)
            walls[name].append(wall)
            narrations[name] = n
    rows = {}
    for name, w in walls.items():
        med, p95 = float(np.median(w)), float(np.percentile(w, 95))
        rows[name] = {"median_s": round(med, 2), "p95_s": round(p95, 2), "ratio": round(med / duration, 3),
                      "narrations": narrations[name], "samples": len(w)}
    print(f"{a.frames} demo frames = {duration:.1f} s of video; {a.repeats} runs per row, interleaved")
    print(f"{'run':<28}{'median s':>9}{'p95 s':>8}{'ratio':>8}{'narrations':>12}")
    for name, r in rows.items():
        print(f"{name:<28}{r['median_s']:>9.2f}{r['p95_s']:>8.2f}{r['ratio']:>8.3f}{r['narrations']:>12}")
    if a.json:
        print(json.dumps({"frames": a.frames, "video_s": duration, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
