"""What each output costs the pipeline per frame, against a pass-through stage in the same run.

Every row runs the runtime over the same pre-rendered frames (demo scene, with a narration every
`--every` frames, recorded-input edges: a slow stage holds the source back), `--repeats` times;
the figures are the steady-state wall time per frame (first to last frame reaching a sink after
the output; median and p95 over the runs) and its ratio to the baseline row's median, and the
whole run's time (start and close included: a window process to spawn, an encoder to flush).
The preview row uses a window process that never reads (its worst case: what the stage itself
costs); with `--display` set to a running X server it uses the real window.

    python scripts/bench_outputs.py [--frames 60] [--width 448 --height 448] [--repeats 10] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import framecast  # noqa: F401  (OpenBLAS preload, as every entry point)
from framecast.events import Event, Frame, Narration, Status
from framecast.runtime import Runtime, Stage
from framecast.stages.outputs import (AnnotateOutput, ConsoleOutput, JsonlOutput, PreviewOutput, ReportOutput,
                                      SubtitleOutput)
from framecast.stages.outputs import preview as preview_mod
from framecast.stages.sources.scene import SceneGenerator
from framecast.testing import ListSource


class Null(Stage):
    """Pass-through; as the sink, it notes when the first and the last frame got through."""

    name = "null"

    def __init__(self):
        super().__init__()
        self.first: float | None = None
        self.last: float | None = None
        self.frames = 0

    async def process(self, item):
        if isinstance(item, Frame):
            self.last = time.perf_counter()
            self.first = self.first or self.last
            self.frames += 1
        yield item


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def make_events(n: int, width: int, height: int, every: int) -> list[Event]:
    gen = SceneGenerator(seed=1, width=width, height=height, fps=10)
    ev: list[Event] = [Status(state="running", text="bench", duration=n / 10, fps=10.0)]
    last = 0.0
    for i, (img, _) in enumerate(gen.frames(n)):
        t = i / 10
        ev.append(Frame(pixels=img, pts=t))
        if i % every == every - 1:
            ev.append(Narration(text=f"A shape moves across the frame, narration {i // every}.", pts=t,
                                pts_start=last, pts_end=t, first_token_ms=80.0, cache_tokens=100 + i))
            last = t
    return ev


def p95(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--width", type=int, default=448)
    ap.add_argument("--height", type=int, default=448)
    ap.add_argument("--every", type=int, default=15, help="a narration every N frames")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--display", help="an X display for a real preview window (default: a window that never reads)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    events = make_events(a.frames, a.width, a.height, a.every)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        stuck = tmp / "stuck-window"
        stuck.write_text("#!/bin/sh\necho ready\nexec sleep 600\n")
        stuck.chmod(0o755)
        preview_mod.CLOSE_TIMEOUT_S = 0.2
        if a.display:
            os.environ["DISPLAY"] = a.display
        else:
            os.environ["QT_QPA_PLATFORM"] = "offscreen"  # the stuck window needs no X server
        devnull = open(os.devnull, "w")
        rows = {
            "pass-through (baseline)": lambda: [],
            "console, plain lines": lambda: [ConsoleOutput(out=devnull, err=devnull)],
            "console, rich panel": lambda: [ConsoleOutput(out=Terminal(), err=devnull, progress=True, width=100)],
            "jsonl": lambda: [JsonlOutput(str(tmp / "o.jsonl"))],
            "vtt": lambda: [SubtitleOutput(str(tmp / "o.vtt"), fmt="vtt")],
            "preview" + (" (real window)" if a.display else " (window never reads)"):
                lambda: [PreviewOutput(python=None if a.display else str(stuck), err=devnull)],
            "annotate (H.264 veryfast)": lambda: [AnnotateOutput(str(tmp / "o.mp4"))],
            "report": lambda: [ReportOutput(str(tmp / "o.html"))],
        }
        results = []
        for name, make in rows.items():
            per_frame, whole = [], []
            for _ in range(a.repeats):
                sink = Null()
                stages = [*make(), sink]
                t0 = time.perf_counter()
                asyncio.run(Runtime(ListSource(events), stages).run(handle_signals=False))
                whole.append((time.perf_counter() - t0) * 1e3)
                per_frame.append((sink.last - sink.first) / (sink.frames - 1) * 1e3)
            results.append((name, statistics.median(per_frame), p95(per_frame), statistics.median(whole)))
        devnull.close()

    base = results[0][1]
    machine = f"{platform.node()} ({os.cpu_count()} cpus, {platform.machine()}), load {os.getloadavg()[0]:.1f}"
    print(f"# {a.frames} frames {a.width}x{a.height}, a narration every {a.every}, {a.repeats} runs per row; {machine}")
    print(f"{'output':<34}{'ms/frame p50':>14}{'p95':>9}{'vs baseline':>13}{'run ms p50':>12}")
    for name, med, hi, run_ms in results:
        print(f"{name:<34}{med:>14.3f}{hi:>9.3f}{med / base:>12.2f}x{run_ms:>12.1f}")
    if a.json:
        print(json.dumps({"machine": machine, "frames": a.frames, "size": [a.width, a.height],
                          "rows": [{"name": n, "ms_per_frame_p50": round(m, 4), "ms_per_frame_p95": round(h, 4),
                                    "vs_baseline": round(m / base, 3), "run_ms_p50": round(r, 1)}
                                   for n, m, h, r in results]}))


if __name__ == "__main__":
    main()
