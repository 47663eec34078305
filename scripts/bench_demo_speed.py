"""How much faster than real time the main job runs on this machine (CPU): the demo source and
the embedded demo model through the whole `framecast run` graph.

    python scripts/bench_demo_speed.py [--frames 120] [--repeats 2] [--json]

Ratio = wall time / video duration (below 1 = faster than real time). The baseline row is the
same run without a model (`--capture-only`: source, change detector, outputs), measured in the
same process, so the model's own share is the difference.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import framecast  # noqa: E402,F401  (OpenBLAS preload before mlx)

DEMO_FPS = 10.0  # stages/sources/demo.py DEFAULT_DEMO_FPS


def run_once(frames: int, *, capture_only: bool) -> tuple[float, int]:
    from framecast.stages.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.jsonl"
        args = ["run", "--source", "demo", "--max-frames", str(frames), "--jsonl", str(out), "--no-console"]
        if capture_only:
            args.append("--capture-only")
        t0 = time.perf_counter()
        rc = main(args)
        wall = time.perf_counter() - t0
        if rc != 0:
            raise SystemExit(f"framecast run exited with {rc}")
        events = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return wall, sum(e["type"] == "narration" for e in events)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    duration = a.frames / DEMO_FPS
    rows = {}
    for name, capture_only in (("capture only (baseline)", True), ("demo model", False)):
        best, narrations = min(run_once(a.frames, capture_only=capture_only) for _ in range(a.repeats))
        rows[name] = {"wall_s": round(best, 2), "ratio": round(best / duration, 3), "narrations": narrations}
    print(f"{a.frames} demo frames = {duration:.1f} s of video (best of {a.repeats})")
    print(f"{'run':<26}{'wall s':>8}{'ratio':>8}{'narrations':>12}")
    for name, r in rows.items():
        print(f"{name:<26}{r['wall_s']:>8.2f}{r['ratio']:>8.3f}{r['narrations']:>12}")
    if a.json:
        print(json.dumps({"frames": a.frames, "video_s": duration, **{k.split(" ")[0]: v for k, v in rows.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
