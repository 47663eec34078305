"""Recorded-video analysis speed: how much faster than real time a file goes through, and what
chapters, the summary and the saved session add.

    python scripts/bench_recorded.py [--repeats 10] [--fps 1] [--json]

The clip is the test clip (three 10-s scenes, 224x224 h264, `framecast.stages.sources.clips`),
sampled at `--fps`, with the embedded demo model. Rows, measured in the same process, each
`--repeats` times (the graph is built outside the timing, so model loading is not counted):

  capture only      source + change detector (the baseline: no model)
  narration         + encode + decode (narration every 2 s), no analysis
  analysis          + chapters (titles) + summary + saved session (.fcs)

Speed = media seconds / wall seconds (above 1 = faster than real time); "x narration" is a
row's wall time over the narration row's (what recorded analysis costs). CPU s is the process's
CPU time (all threads) for the same run: on a shared, loaded machine it moves far less than
the wall time, so its ratio is the steadier figure. The load average is printed with the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import framecast  # noqa: F401  (OpenBLAS preload before mlx)

from framecast.config import load_config
from framecast.runtime import Runtime
from framecast.stages.app import build_graph
from framecast.stages.sources.clips import write_scene_video

VIDEO_S = 30.0


def once(video: Path, tmp: Path, row: str, fps: float) -> tuple[float, float]:
    over = {"source.uri": str(video), "source.fps": fps, "outputs.console": False,
            "outputs.jsonl": str(tmp / f"{row}.jsonl")}
    if row == "capture only":
        over["runtime.capture_only"] = True
    elif row == "narration":
        over.update({"chapters.enabled": False, "summary.enabled": False})
    else:
        over.update({"outputs.chapters": str(tmp / "c.vtt"), "outputs.summary": str(tmp / "s.md"),
                     "outputs.session": str(tmp / "s.fcs")})
    source, stages = build_graph(load_config(None, over))
    t0, c0 = time.perf_counter(), time.process_time()
    result = asyncio.run(Runtime(source, stages).run(handle_signals=False))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if result.exit_code:
        raise SystemExit(f"{row}: exit {result.exit_code}: {[e.text for e in result.errors]}")
    return wall, cpu


def p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--fps", type=float, default=1.0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    rows: dict[str, list[tuple[float, float]]] = {"capture only": [], "narration": [], "analysis": []}
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        video = write_scene_video(tmp / "three.mp4")
        once(video, tmp, "analysis", a.fps)  # warm-up (first MLX kernels, file cache)
        for _ in range(a.repeats):  # interleaved, so load changes on a shared machine hit every row
            for row in rows:
                rows[row].append(once(video, tmp, row, a.fps))
    load1 = os.getloadavg()[0]
    base = statistics.median(w for w, _ in rows["narration"])
    base_cpu = statistics.median(c for _, c in rows["narration"])
    table = {}
    for row, runs in rows.items():
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        med, cpu = statistics.median(walls), statistics.median(cpus)
        table[row] = {"wall_s_median": round(med, 3), "wall_s_p95": round(p95(walls), 3),
                      "speed_median": round(VIDEO_S / med, 2), "speed_p95": round(VIDEO_S / p95(walls), 2),
                      "x_narration": round(med / base, 3), "cpu_s_median": round(cpu, 3),
                      "cpu_s_p95": round(p95(cpus), 3), "cpu_x_narration": round(cpu / base_cpu, 3),
                      "samples": len(runs)}
    print(f"{VIDEO_S:.0f} s clip at {a.fps:g} fps, {a.repeats} samples per row (median, p95 = slowest 5%), "
          f"load average {load0:.1f} -> {load1:.1f}")
    print(f"{'row':<14}{'wall s':>9}{'p95':>8}{'speed':>8}{'p95':>8}{'x narr.':>9}{'CPU s':>8}{'p95':>8}{'x narr.':>9}")
    for row, r in table.items():
        print(f"{row:<14}{r['wall_s_median']:>9.2f}{r['wall_s_p95']:>8.2f}{r['speed_median']:>7.1f}x"
              f"{r['speed_p95']:>7.1f}x{r['x_narration']:>9.2f}{r['cpu_s_median']:>8.2f}{r['cpu_s_p95']:>8.2f}"
              f"{r['cpu_x_narration']:>9.2f}")
    if a.json:
        print(json.dumps({"video_s": VIDEO_S, "fps": a.fps, "load_average": [load0, load1], "rows": table}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
