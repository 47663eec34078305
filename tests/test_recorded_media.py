"""Recorded and odd media (issue 12), each kind with several members, on files written with PyAV:
frames without or with repeated timestamps, checked seeking in every container, all eight
display orientations, the video stream's own duration, time that goes backwards, and a
closing narration so that every second of a file is covered by a cue."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from framecast.config import SourceConfig
from framecast.events import Error
from framecast.runtime import Runtime
from framecast.stages.cli import main
from framecast.stages.sources import make_source
from framecast.stages.sources.base import FALLBACK_FPS, MediaClock
from video_fixtures import corner_of, index_of, write_video
from collect import Collect

U = 1 << 16  # 1.0 in a display matrix's 16.16 fixed point
W1 = 1 << 30  # its last element (2.30 fixed point)
RAW = {"h264": "libx264", "hevc": "libx265"}  # elementary streams: no container, no timestamps


def run_source(**kw):
    source, sink = make_source(SourceConfig(**kw)), Collect()
    res = asyncio.run(Runtime(source, [sink]).run(handle_signals=False))
    return res, sink, source


def media(tmp: Path, name: str, n: int, **kw) -> Path:
    ext = name.rsplit(".", 1)[1]
    return write_video(tmp / name, n, codec=RAW.get(ext, "libx264"), **kw)


# ---------------------------------------------------------------- 1. missing and repeated pts


@pytest.mark.parametrize("ext", ["h264", "hevc"])
def test_raw_elementary_stream_gets_timestamps_from_its_rate(tmp_path, ext):
    p = media(tmp_path, f"raw.{ext}", 30, fps=25)
    res, sink, src = run_source(uri=str(p))
    frames = sink.frames()
    assert res.exit_code == 0 and not res.errors
    assert [index_of(f.pixels) for f in frames] == [i % 39 for i in range(30)]
    assert [f.pts for f in frames] == pytest.approx([i / 25 for i in range(30)])
    assert "no timestamps (made up at 25 fps)" in sink.statuses()[0].text
    assert src.metrics.extra["made_up_pts"] == 30


@pytest.mark.parametrize("name,pts", [
    ("one_repeat.mkv", [0.0, 0.1, 0.1, 0.2, 0.3, 0.4]),  # one repeated pts
    ("all_zero.flv", [0.0] * 6),  # every frame at 0
    ("pairs.mkv", [0.0, 0.0, 0.2, 0.2, 0.4, 0.4]),  # each pts twice
])
def test_repeated_pts_become_increasing_media_time(tmp_path, name, pts):
    p = write_video(tmp_path / name, len(pts), fps=10, pts_s=pts)
    res, sink, src = run_source(uri=str(p))
    frames = sink.frames()
    got = [f.pts for f in frames]
    assert res.exit_code == 0 and [index_of(f.pixels) for f in frames] == list(range(len(pts)))
    assert all(b > a for a, b in zip(got, got[1:])), got  # strictly increasing, no frame lost
    assert src.metrics.extra["made_up_pts"] >= 1 and "discontinuities" not in src.metrics.extra


def test_media_clock_members_of_the_kind():
    c = MediaClock(0.1)  # no pts at all: frame order at the stream's rate
    assert [round(c.time(None), 6) for _ in range(3)] == [0.0, 0.1, 0.2] and c.made_up == 3
    c = MediaClock(0.0)  # no rate either: FFmpeg's 25 fps
    assert [round(c.time(None), 6) for _ in range(3)] == [0.0, 1 / FALLBACK_FPS, 2 / FALLBACK_FPS]
    c = MediaClock(0.1, origin=1.4)  # a pts reset keeps the spacing of the frames after it
    got = [round(c.time(r), 6) for r in (1.4, 1.5, 1.6, 0.0, 0.1, 0.3)]
    assert got == [0.0, 0.1, 0.2, 0.3, 0.4, 0.6] and c.discontinuities == 1 and c.last_jump == (1.6, 0.0)
    c = MediaClock(0.1)  # some frames without pts between timed ones
    got = [round(c.time(r), 6) for r in (0.0, None, 0.2, None, None, 0.5)]
    assert got == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5] and c.discontinuities == 0


# ---------------------------------------------------------------- 2. seeking lands where asked

SEEK_CONTAINERS = ["mp4", "mkv", "ts", "avi", "mov", "h264", "hevc"]


@pytest.mark.parametrize("ext", SEEK_CONTAINERS)
def test_start_lands_on_the_asked_frame_in_every_container(tmp_path, ext):
    # 20 s at 10 fps with a keyframe every 2 s: the target (7.5) sits mid-GOP
    p = media(tmp_path, f"long.{ext}", 200, fps=10, gop=20)
    res, sink, _ = run_source(uri=str(p), start=7.5, end=9)
    frames = sink.frames()
    assert res.exit_code == 0 and not res.errors
    assert [f.pts for f in frames] == pytest.approx([7.5 + i / 10 for i in range(15)])
    assert [index_of(f.pixels) for f in frames] == [i % 39 for i in range(75, 90)]


@pytest.mark.parametrize("ext", SEEK_CONTAINERS)
def test_start_near_the_end_of_a_short_file(tmp_path, ext):
    p = media(tmp_path, f"short.{ext}", 30, fps=10, gop=10)  # 3 s, keyframe every 1 s
    res, sink, _ = run_source(uri=str(p), start=2.5)
    assert res.exit_code == 0 and not res.errors
    assert [index_of(f.pixels) for f in sink.frames()] == [25, 26, 27, 28, 29]


def test_start_with_fps_sampling_and_max_frames(tmp_path):
    p = media(tmp_path, "s.ts", 200, fps=10, gop=20)
    _, sink, _ = run_source(uri=str(p), start=7.5, fps=2, max_frames=3)
    assert [f.pts for f in sink.frames()] == pytest.approx([7.5, 8.0, 8.5])


def test_start_past_the_end_is_one_line_exit_2(capsys, tmp_path):
    p = media(tmp_path, "short.mp4", 30, fps=10)
    code = main(["run", "--no-console", "--capture-only", "--source", str(p), "--start", "30"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines == [f"framecast: {p}: source.start = 30 s is past the end of the video (3.00 s)"]


# ---------------------------------------------------------------- 3. all eight orientations

# (a, b, c, d) of the display matrix -> where the marker stored bottom-right is shown. Expected
# corners worked out by hand from FFmpeg's command-line autorotation (fftools: theta from
# av_display_rotation_get; 90 -> transpose clock / cclock_flip, 180 -> hflip / vflip by the
# signs of a and d, 270 -> cclock / clock_flip, 0 -> vflip when d < 0).
ORIENTATIONS = {
    "upright": ((1, 0, 0, 1), "br", False),
    "mirror-left-right": ((-1, 0, 0, 1), "bl", False),
    "mirror-top-bottom": ((1, 0, 0, -1), "tr", False),
    "rotate-180": ((-1, 0, 0, -1), "tl", False),
    "rotate-90-ccw": ((0, -1, 1, 0), "tr", True),
    "rotate-90-cw": ((0, 1, -1, 0), "bl", True),
    "transpose": ((0, 1, 1, 0), "br", True),  # rotate 90 and mirror
    "anti-transpose": ((0, -1, -1, 0), "tl", True),  # rotate 270 and mirror
}


@pytest.mark.parametrize("ext", ["mp4", "mkv"])
@pytest.mark.parametrize("case", list(ORIENTATIONS))
def test_display_matrix_rotation_and_mirror(tmp_path, case, ext):
    (a, b, c, d), corner, swapped = ORIENTATIONS[case]
    p = write_video(tmp_path / f"{case}.{ext}", 2, matrix=[a * U, b * U, 0, c * U, d * U, 0, 0, 0, W1])
    res, sink, _ = run_source(uri=str(p))
    img = sink.frames()[0].pixels
    assert res.exit_code == 0
    assert img.shape == ((64, 48, 3) if swapped else (48, 64, 3))
    assert corner_of(img) == corner
    running = sink.statuses()[0]
    assert (running.text.endswith("mirrored")) == (case in ("mirror-left-right", "mirror-top-bottom",
                                                           "transpose", "anti-transpose"))


# ---------------------------------------------------------------- 4. duration of the video stream


@pytest.mark.parametrize("ext", ["mkv", "mp4", "ts"])
def test_longer_audio_track_is_not_a_truncated_video(capsys, tmp_path, ext):
    p = write_video(tmp_path / f"av.{ext}", 30, fps=10, audio_s=5.0)  # 3 s video, 5 s AAC
    out = tmp_path / "o.jsonl"
    code = main(["run", "--no-console", "--capture-only", "--source", str(p), "--jsonl", str(out)])
    assert code == 0 and capsys.readouterr().err == ""
    events = [json.loads(line) for line in out.read_text().splitlines()]
    assert not any(e["type"] == "error" for e in events)
    eof = [e for e in events if e["type"] == "status" and e["state"] == "eof"][0]
    assert eof["text"].endswith("after 30 frames") and eof["pts"] == pytest.approx(3.0)


def test_truncated_mkv_is_still_truncated_by_its_video_duration(capsys, tmp_path):
    full = write_video(tmp_path / "full.mkv", 100, fps=10, width=128, height=96)
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])  # the header keeps its durations
    code = main(["run", "--no-console", "--capture-only", "--source", str(cut)])
    line = capsys.readouterr().err.strip()
    want = rf"framecast: {re.escape(str(cut))}: truncated: video ends at [\d.]+ s of 10\.00 s"
    assert code == 1 and re.fullmatch(want, line), line


# ---------------------------------------------------------------- 5. time that goes backwards


def _joined_ts(tmp: Path, parts: list[list[float]]) -> Path:
    data = b""
    for k, pts in enumerate(parts):
        data += write_video(tmp / f"part{k}.ts", len(pts), fps=10, pts_s=pts).read_bytes()
    joined = tmp / "joined.ts"
    joined.write_bytes(data)
    return joined


FIVE_S = [i / 10 for i in range(50)]


@pytest.mark.parametrize("parts,jumps", [
    ([FIVE_S, FIVE_S], 1),  # two 5 s files joined with `cat`
    ([FIVE_S, FIVE_S, FIVE_S], 2),  # three
    ([[10 + t for t in FIVE_S], FIVE_S], 1),  # a pts reset to zero
])
def test_time_going_backwards_stays_monotonic_with_one_warning(capsys, tmp_path, parts, jumps):
    p = _joined_ts(tmp_path, parts)
    out = tmp_path / "o.jsonl"
    code = main(["run", "--no-console", "--capture-only", "--source", str(p), "--jsonl", str(out),
                 "--set", "outputs.jsonl_frames=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 0 and len(err) == 1 and "time jumps back at 5.00 s" in err[0] and str(p) in err[0]
    events = [json.loads(line) for line in out.read_text().splitlines()]
    pts = [e["pts"] for e in events if e["type"] == "frame"]
    n = 50 * len(parts)
    assert pts == pytest.approx([i / 10 for i in range(n)])  # one clock across the joins
    eof = [e for e in events if e["type"] == "status" and e["state"] == "eof"][0]
    assert eof["discontinuities"] == jumps and eof["pts"] == pytest.approx(n / 10)
    assert sum(e["type"] == "error" for e in events) == 1


def test_time_going_backwards_in_a_live_stream(tmp_path):
    """The same file served over HTTP (a live stream): media time carries on across the jump."""
    import http.server
    import threading

    _joined_ts(tmp_path, [FIVE_S, FIVE_S])

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(tmp_path), **k)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        cfg = SourceConfig(uri=f"http://127.0.0.1:{srv.server_port}/joined.ts", max_frames=80)
        source, sink = make_source(cfg), Collect()
        res = asyncio.run(Runtime(source, [sink], edge_size=256).run(handle_signals=False))
    finally:
        srv.shutdown()
    frames = sink.frames()
    assert res.exit_code == 0 and len(frames) + source.metrics.extra.get("drops", 0) == 80
    # live: a lagging loop may lose frames, but each one delivered has its own time (frame k of
    # the joined file at k/10 s, right across the jump: no stall)
    ks = [round(f.pts * 10) for f in frames]
    assert ks == sorted(set(ks)) and ks[-1] >= 60
    assert [f.pts for f in frames] == pytest.approx([k / 10 for k in ks])
    assert [index_of(f.pixels) for f in frames] == [k % 50 % 39 for k in ks]
    assert source.metrics.extra["discontinuities"] == 1
    assert sum(isinstance(e, Error) for e in sink.seen) == 1


# ---------------------------------------------------------------- 6. the end of a file is narrated


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from framecast.testing import make_tiny_minicpmv

    return make_tiny_minicpmv(tmp_path_factory.mktemp("tiny") / "m", "2.6")


def srt_cues(path: Path) -> list[tuple[float, float]]:
    def sec(t: str) -> float:
        h, m, s = t.replace(",", ".").split(":")
        return int(h) * 3600 + int(m) * 60 + float(s)

    return [(sec(a), sec(b)) for a, b in re.findall(r"^(\S+) --> (\S+)$", path.read_text(), re.M)]


@pytest.mark.parametrize("n,args,until", [
    (200, ["--end", "1.9"], 1.9),  # a window shorter than the interval
    (20, [], 2.0),  # a 2 s clip
    (200, ["--fps", "2"], 20.0),  # a 20 s clip: cues used to stop at 18 s
    (33, ["--fps", "2"], 3.3),  # a length that is no multiple of anything
])
def test_every_second_of_a_recorded_file_is_covered_by_a_cue(tmp_path, tiny_model_dir, n, args, until):
    p = write_video(tmp_path / "clip.mp4", n, fps=10)
    srt, out = tmp_path / "o.srt", tmp_path / "o.jsonl"
    code = main(["run", "--no-console", "--model", str(tiny_model_dir), "--source", str(p), "--srt", str(srt),
                 "--jsonl", str(out), "--interval", "2", "--max-tokens", "3", *args])
    assert code == 0
    cues = srt_cues(srt)
    assert cues and cues[0][0] == 0.0 and cues[-1][1] == pytest.approx(until)
    assert all(b[0] == pytest.approx(a[1]) for a, b in zip(cues, cues[1:])), cues  # no gap, no overlap
    narrations = [json.loads(line) for line in out.read_text().splitlines() if '"narration"' in line]
    assert narrations[-1]["trigger"] == "end" and narrations[-1]["pts_end"] == pytest.approx(until)


def test_joined_ts_is_narrated_to_its_end(tmp_path, tiny_model_dir):
    p = _joined_ts(tmp_path, [FIVE_S, FIVE_S])
    out = tmp_path / "o.jsonl"
    code = main(["run", "--no-console", "--model", str(tiny_model_dir), "--source", str(p), "--fps", "2",
                 "--jsonl", str(out), "--interval", "2", "--max-tokens", "3"])
    assert code == 0
    nar = [json.loads(line) for line in out.read_text().splitlines() if '"narration"' in line]
    assert [n["pts"] for n in nar if n["trigger"] == "interval"] == pytest.approx([2.0, 4.0, 6.0, 8.0])
    assert nar[-1]["pts_end"] == pytest.approx(10.0)


def test_no_closing_narration_on_demand(tmp_path, tiny_model_dir):
    p = write_video(tmp_path / "clip.mp4", 20, fps=10)
    out = tmp_path / "o.jsonl"
    code = main(["run", "--no-console", "--model", str(tiny_model_dir), "--source", str(p), "--jsonl", str(out),
                 "--policy", "on_demand"])
    assert code == 0 and '"narration"' not in out.read_text()
