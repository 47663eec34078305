"""Capture-side throughput: what the pipeline adds on top of the decoding library.

Writes a test video with PyAV, then measures, in the same run:
  - raw PyAV decode to RGB (the baseline),
  - the FileSource through the runtime (thread bridge, events, edges) into a null stage,
  - the same with the change detector and a JSONL output,
  - FileSource at --sample-fps (decode all, convert only kept frames),
  - the demo source (synthetic scene rendering) and the change detector alone.

    python scripts/bench_capture.py [--frames 300] [--width 640 --height 480] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path


import framecast  # noqa: E402,F401
import av  # noqa: E402

from framecast.config import ChangeConfig, OutputsConfig, SourceConfig  # noqa: E402
from framecast.events import Frame  # noqa: E402
from framecast.runtime import Runtime, Stage  # noqa: E402
from framecast.stages.change import ChangeDetector  # noqa: E402
from framecast.stages.outputs import make_outputs  # noqa: E402
from framecast.stages.sources import make_source  # noqa: E402
from framecast.stages.sources.scene import SceneGenerator  # noqa: E402


def write_clip(path: Path, n: int, width: int, height: int, fps: int = 30) -> None:
    gen = SceneGenerator(seed=1, width=width, height=height, fps=fps)
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.codec_context.options = {"preset": "veryfast"}
        for img, _ in gen.frames(n):
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


def raw_decode(path: Path) -> int:
    n = 0
    with av.open(str(path)) as c:
        c.streams.video[0].thread_type = "AUTO"
        for f in c.decode(video=0):
            f.to_ndarray(format="rgb24")
            n += 1
    return n


class Null(Stage):
    name = "null"

    def __init__(self):
        super().__init__()
        self.frames = 0

    async def process(self, item):
        if isinstance(item, Frame):
            self.frames += 1
        yield item


def run_graph(cfg: SourceConfig, extra: list[Stage]) -> int:
    sink = Null()
    asyncio.run(Runtime(make_source(cfg), [*extra, sink], edge_size=8).run(handle_signals=False))
    return sink.frames


def timed(fn) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn()
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--sample-fps", type=float, default=2.0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as d:
        clip = Path(d) / "clip.mp4"
        write_clip(clip, a.frames, a.width, a.height)
        jsonl = str(Path(d) / "o.jsonl")
        rows: list[tuple[str, float, int]] = []
        rows.append(("pyav decode+rgb (baseline)", *timed(lambda: raw_decode(clip))))
        rows.append(("FileSource -> null", *timed(lambda: run_graph(SourceConfig(uri=str(clip)), []))))
        rows.append(("FileSource -> change -> jsonl", *timed(lambda: run_graph(
            SourceConfig(uri=str(clip)),
            [ChangeDetector(ChangeConfig()), *make_outputs(OutputsConfig(console=False, jsonl=jsonl, progress=False),
                                                           live=False)]))))
        # Counted per decoded frame: every frame is decoded, only the kept ones become RGB.
        secs, _kept = timed(lambda: run_graph(SourceConfig(uri=str(clip), fps=a.sample_fps), []))
        rows.append((f"FileSource fps={a.sample_fps:g} (per decoded)", secs, a.frames))
        rows.append(("demo source -> null", *timed(lambda: run_graph(
            SourceConfig(uri="demo", max_frames=a.frames, width=a.width, height=a.height), []))))
        gen = SceneGenerator(seed=1, width=a.width, height=a.height)
        imgs = [gen.frame(i)[0] for i in range(min(a.frames, 100))]
        det = ChangeDetector(ChangeConfig())

        def change_only() -> int:
            for img in imgs:
                det.score(Frame(pixels=img))
            return len(imgs)

        rows.append(("change detector alone", *timed(change_only)))

    base_fps = rows[0][2] / rows[0][1]
    result = {"machine": f"{os.cpu_count()} cpus", "width": a.width, "height": a.height, "rows": []}
    print(f"{'what':<36}{'frames':>8}{'s':>8}{'fps':>10}{'vs baseline':>13}")
    for name, secs, n in rows:
        fps = n / secs if secs else 0.0
        print(f"{name:<36}{n:>8}{secs:>8.3f}{fps:>10.1f}{fps / base_fps:>12.2f}x")
        result["rows"].append({"name": name, "frames": n, "seconds": round(secs, 4), "fps": round(fps, 1),
                               "vs_baseline": round(fps / base_fps, 3)})
    if a.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
