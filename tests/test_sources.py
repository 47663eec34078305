"""Capture stages on real media: the demo scene, recorded files written with PyAV, cameras."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest

from framecast.config import SourceConfig
from framecast.events import Frame
from framecast.runtime import Runtime
from framecast.stages.sources import make_source
from framecast.stages.sources.scene import SceneGenerator

from collect import Collect


def run_source(cfg: SourceConfig, **kw):
    source, sink = make_source(cfg), Collect()
    res = asyncio.run(Runtime(source, [sink], **kw).run(handle_signals=False))
    return res, sink, source


def test_demo_source_matches_generator_and_is_deterministic():
    cfg = SourceConfig(uri="demo", max_frames=12, width=64, height=48, seed=3, fps=5)
    res, sink, src = run_source(cfg)
    frames = sink.frames()
    assert res.exit_code == 0 and len(frames) == 12 and not src.live
    assert [f.seq for f in frames] == list(range(12))
    assert [f.pts for f in frames] == pytest.approx([i / 5 for i in range(12)])
    gen = SceneGenerator(seed=3, width=64, height=48, fps=5)
    assert all(np.array_equal(f.pixels, gen.frame(i)[0]) for i, f in enumerate(frames))
    assert frames[0].pixels.shape == (48, 64, 3) and frames[0].width == 64
    states = [s.state for s in sink.statuses()]
    assert states[0] == "running" and states[-1] == "eof"


def test_demo_source_realtime_pacing_is_live():
    cfg = SourceConfig(uri="demo", max_frames=6, width=32, height=32, fps=50, realtime=True)
    src = make_source(cfg)
    assert src.live
    import time

    t0 = time.monotonic()
    res, sink, _ = run_source(cfg)
    assert len(sink.frames()) + res.metrics["collect"]["drops"] == 6
    assert time.monotonic() - t0 >= 5 / 50 * 0.9


# ---------------------------------------------------------------- recorded files

from video_fixtures import index_of, write_video  # noqa: E402


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("media") / "thirty.mp4", 30, fps=10)


def test_file_decodes_every_frame_in_order_with_pts(mp4):
    res, sink, src = run_source(SourceConfig(uri=str(mp4)))
    frames = sink.frames()
    assert res.exit_code == 0 and not src.live
    assert [index_of(f.pixels) for f in frames] == list(range(30))
    assert [f.pts for f in frames] == pytest.approx([i / 10 for i in range(30)])
    assert frames[0].pixels.dtype == np.uint8 and frames[0].pixels.shape == (48, 64, 3)
    running = sink.statuses()[0]
    assert running.state == "running" and running.duration == pytest.approx(3.0)
    assert sink.statuses()[-1].state == "eof" and src.metrics.extra["frames"] == 30


def test_file_sampled_at_target_fps_by_pts(mp4):
    _, sink, src = run_source(SourceConfig(uri=str(mp4), fps=2.5))
    assert [index_of(f.pixels) for f in sink.frames()] == [0, 4, 8, 12, 16, 20, 24, 28]
    assert src.metrics.extra["skipped_by_fps"] == 22


def test_file_start_end_and_max_frames(mp4):
    _, sink, _ = run_source(SourceConfig(uri=str(mp4), start=1.05, end=2.0))
    assert [index_of(f.pixels) for f in sink.frames()] == list(range(11, 20))
    _, sink, _ = run_source(SourceConfig(uri=str(mp4), start=2.0, max_frames=3))
    assert [f.pts for f in sink.frames()] == pytest.approx([2.0, 2.1, 2.2])


def test_file_variable_frame_rate(tmp_path):
    pts = [0.0, 0.05, 0.1, 0.5, 0.55, 1.5, 1.52, 1.54, 2.0, 2.9]
    p = write_video(tmp_path / "vfr.mp4", len(pts), pts_s=pts)
    _, sink, _ = run_source(SourceConfig(uri=str(p)))
    assert [f.pts for f in sink.frames()] == pytest.approx(pts)
    _, sink, _ = run_source(SourceConfig(uri=str(p), fps=2))  # one frame per 0.5 s slot
    assert [f.pts for f in sink.frames()] == pytest.approx([0.0, 0.5, 1.5, 2.0, 2.9])


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_file_rotation_metadata_is_applied(tmp_path, rotation):
    p = write_video(tmp_path / f"rot{rotation}.mp4", 3, rotation=rotation)
    _, sink, _ = run_source(SourceConfig(uri=str(p)))
    img = sink.frames()[0].pixels
    # the bright marker sits bottom-right when stored; the display matrix turns it counter-clockwise
    corner = {90: (0, -1), -90: (-1, 0), 180: (0, 0)}[rotation]
    assert img.shape == ((64, 48, 3) if rotation % 180 else (48, 64, 3))
    assert img[corner].min() > 200 and img[-1, -1].max() < 100


def test_file_realtime_replay_is_paced(mp4):
    import time

    t0 = time.monotonic()
    _, sink, src = run_source(SourceConfig(uri=str(mp4), realtime=True, max_frames=5))
    assert src.live and time.monotonic() - t0 >= 0.35 and len(sink.frames()) >= 1


# ---------------------------------------------------------------- live: network stream and camera


@pytest.fixture()
def http_server(tmp_path):
    """A real HTTP server on loopback serving MPEG-TS; `once=True` paths answer a single GET."""
    import http.server
    import threading

    served: dict[str, int] = {}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(tmp_path), **k)

        def do_GET(self):  # noqa: N802
            served[self.path] = served.get(self.path, 0) + 1
            if self.path.startswith("/once") and served[self.path] > 1:
                self.send_error(404)
                return
            super().do_GET()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    write_video(tmp_path / "live.ts", 30)
    (tmp_path / "once.ts").write_bytes((tmp_path / "live.ts").read_bytes())
    yield f"http://127.0.0.1:{srv.server_port}", served
    srv.shutdown()


def test_network_stream_delivers_frames_and_is_live(http_server):
    base, _ = http_server
    res, sink, src = run_source(SourceConfig(uri=f"{base}/live.ts", max_frames=8), edge_size=64)
    frames = sink.frames()
    assert src.live and res.exit_code == 0 and len(frames) == 8
    idx = [index_of(f.pixels) for f in frames]
    assert idx == sorted(set(idx)) and idx[0] == 0  # in order; a lagging loop may lose some (live)
    assert [s.state for s in sink.statuses()] == ["starting", "running", "eof"]


def test_network_stream_end_reconnects_with_backoff_then_gives_up(http_server):
    base, served = http_server
    cfg = SourceConfig(uri=f"{base}/once.ts", reconnect_max=2, backoff_initial_s=0.05, watchdog_s=1)
    res, sink, src = run_source(cfg, edge_size=64)
    # everything delivered before the stream ended is kept (live: what the loop missed is counted)
    assert len(sink.frames()) + src.metrics.extra.get("drops", 0) == 30
    states = [s.state for s in sink.statuses()]
    assert states.count("reconnecting") == 2 and src.metrics.extra["reconnects"] == 2
    assert served["/once.ts"] == 3 and res.exit_code == 1
    assert "gave up after 2 reconnect attempts" in res.errors[-1].text and "once.ts" in res.errors[-1].text


def test_recording_over_http_is_read_like_a_file(http_server, tmp_path):
    base, _ = http_server
    write_video(tmp_path / "clip.mp4", 20)
    res, sink, src = run_source(SourceConfig(uri=f"{base}/clip.mp4"))
    assert not src.live and res.exit_code == 0
    assert [index_of(f.pixels) for f in sink.frames()] == list(range(20))  # nothing dropped
    assert sink.statuses()[0].duration == pytest.approx(2.0)


def test_rtsp_over_tcp_delivers_frames():
    from rtsp_server import RtspServer

    srv = RtspServer(frames=60, fps=100)
    try:
        res, sink, src = run_source(SourceConfig(uri=srv.url, max_frames=12, open_timeout_s=5), edge_size=64)
    finally:
        srv.close()
    frames = sink.frames()
    assert src.live and res.exit_code == 0 and len(frames) == 12 and srv.sessions == 1
    idx = [index_of(f.pixels) for f in frames]
    assert idx == sorted(set(idx)) and idx[0] == 0
    pts = [f.pts for f in frames]
    assert pts == sorted(set(pts)) and pts[-1] - pts[1] == pytest.approx((idx[-1] - idx[1]) / 100, abs=0.01)


def test_rtsp_camera_that_hangs_mid_stream_is_reconnected_by_the_watchdog():
    from rtsp_server import RtspServer

    # 30 frames (enough for FFmpeg's stream probing), then silence on an open connection
    srv = RtspServer(frames=60, fps=100, stall_after=30)
    cfg = SourceConfig(uri=srv.url, max_frames=65, watchdog_s=0.4, open_timeout_s=5, backoff_initial_s=0.05)
    try:
        res, sink, src = run_source(cfg, edge_size=128)
    finally:
        srv.close()
    states = [s.state for s in sink.statuses()]
    assert res.exit_code == 0 and len(sink.frames()) == 65  # needs three connections
    assert states.count("reconnecting") == 2 and states.count("reconnected") == 2 and srv.sessions == 3
    assert src.metrics.extra["reconnects"] == 2
    recon = [s for s in sink.statuses() if s.state == "reconnecting"]
    assert "no frame for 0.4 s" in recon[0].text and [s.reconnects for s in recon] == [1, 2]
    pts = [f.pts for f in sink.frames()]
    assert pts == sorted(set(pts))  # media time keeps going across reconnects


def test_camera_through_opencv_with_a_path(mp4):
    res, sink, src = run_source(SourceConfig(uri=f"camera:{mp4}", max_frames=5))
    frames = sink.frames()
    assert src.live and res.exit_code == 0 and len(frames) == 5
    idx = [index_of(f.pixels) for f in frames]
    assert idx == sorted(set(idx)) and frames[0].pixels.shape == (48, 64, 3)
    assert frames[0].pixels[-1, -1].min() > 200  # RGB, upright


# ---------------------------------------------------------------- passwords in source URLs (QA 7)

@pytest.mark.parametrize("text,shown", [
    ("rtsp://user:secret@127.0.0.1:9/x", "rtsp://user:***@127.0.0.1:9/x"),
    ("http://u:p%40ss@host/v.mp4: cannot open", "http://u:***@host/v.mp4: cannot open"),
    ("mqtts://bob:s3cr@t@broker:8883", "mqtts://bob:***@broker:8883"),  # an unescaped @ in the password
    ("rtsp://user@host/x and rtsp://a:b@h/y", "rtsp://user@host/x and rtsp://a:***@h/y"),
    ("no url at all", "no url at all"), ("'rtmp://k:v@h/live'", "'rtmp://k:***@h/live'"),
])
def test_redact_hides_every_password(text, shown):
    from framecast.redact import redact_text

    assert redact_text(text) == shown


def test_status_and_error_texts_never_carry_a_password():
    from framecast.events import Error, Status

    assert "secret" not in Error(text="ffmpeg: rtsp://u:secret@h/x refused").text
    assert "secret" not in Status(state="starting", text="rtsp://u:secret@h/x: connecting").text
    from framecast.stages.mqtt.client import parse_mqtt_url
    from framecast.errors import UserError
    with pytest.raises(UserError) as e:
        parse_mqtt_url("ftp://u:secret@h")
    assert "secret" not in str(e.value) and "u:***@h" in str(e.value)


@pytest.mark.parametrize("uri", ["rtsp://user:secret@127.0.0.1:9/x", "http://user:secret@127.0.0.1:9/x.mp4",
                                 "rtmp://user:secret@127.0.0.1:9/live"])
def test_a_source_password_reaches_neither_stderr_nor_the_jsonl(tmp_path, uri):
    out = tmp_path / "pw.jsonl"
    p = subprocess.run([sys.executable, "-m", "framecast", "run", "--capture-only", "--no-console", "--source", uri,
                        "--jsonl", str(out)], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert "secret" not in p.stderr and "secret" not in p.stdout and "user:***@" in p.stderr
    text = out.read_text()
    assert "secret" not in text and "user:***@" in text


# ---------------------------------------------------------------- drops in the final status (README)

class _Slow(Collect):
    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay

    async def process(self, item):
        if isinstance(item, Frame) and self.delay:
            await asyncio.sleep(self.delay)
        async for ev in super().process(item):
            yield ev


@pytest.mark.parametrize("delay,some", [(0.0, False), (0.25, True)])
def test_final_status_of_a_live_source_counts_drops(delay, some):
    src = make_source(SourceConfig(uri="demo", realtime=True, fps=20.0, width=64, height=64))
    sink = _Slow(delay)
    rt = Runtime(src, [sink], edge_size=2)

    async def scenario():
        task = asyncio.create_task(rt.run(handle_signals=False))
        await asyncio.sleep(1.5)
        rt.request_stop("stop")
        return await task

    asyncio.run(scenario())
    final = sink.statuses()[-1]
    assert final.state == "stopped" and isinstance(final.drops, int)
    assert (final.drops > 0) is some


def test_final_status_of_a_file_leaves_drops_out(tmp_path):
    video = write_video(tmp_path / "v.mp4", n=5)
    sink = Collect()
    asyncio.run(Runtime(make_source(SourceConfig(uri=str(video))), [sink]).run(handle_signals=False))
    assert sink.statuses()[-1].state == "eof" and sink.statuses()[-1].drops is None
