"""Bad input: each case gives ONE line naming the input, the right exit status, and keeps
every output written so far. Media are real files written with PyAV; servers are real sockets."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import tracemalloc

import pytest

from framecast.stages.cli import main
from framecast.config import SourceConfig
from framecast.events import Frame
from framecast.runtime import Runtime, Stage
from framecast.stages.sources import make_source
from video_fixtures import flip_bytes, write_audio_only, write_video


def cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["run", "--no-console", "--capture-only", *args])
    err = capsys.readouterr().err
    return code, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("framecast: ")
    return lines[0]


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_missing_file(capsys, tmp_path):
    code, err = cli(capsys, "--source", str(tmp_path / "nope.mp4"))
    assert code == 2 and one_line(err) == f"framecast: {tmp_path / 'nope.mp4'}: no such file"


def test_zero_byte_file(capsys, tmp_path):
    p = tmp_path / "empty.mp4"
    p.write_bytes(b"")
    code, err = cli(capsys, "--source", str(p))
    assert code == 2 and one_line(err) == f"framecast: {p}: empty file (0 bytes)"


def test_truncated_mp4_without_index(capsys, tmp_path):
    full = write_video(tmp_path / "full.mp4", 20)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    code, err = cli(capsys, "--source", str(cut), "--jsonl", str(tmp_path / "o.jsonl"))
    line = one_line(err)
    assert code == 2 and str(cut) in line and "truncated" in line
    assert (tmp_path / "o.jsonl").exists()


def test_truncated_faststart_mp4_keeps_what_was_decoded(capsys, tmp_path):
    full = write_video(tmp_path / "fs.mp4", 30, faststart=True)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 3])
    out = tmp_path / "o.jsonl"
    code, err = cli(capsys, "--source", str(cut), "--jsonl", str(out), "--change-threshold", "0")
    line = one_line(err)
    assert code == 1 and f"{cut}: truncated: video ends at" in line
    events = jsonl(out)
    assert sum(e["type"] == "change" for e in events) >= 3  # frames before the cut were processed
    assert events[-1]["type"] == "eos" and any(e["type"] == "error" and "truncated" in e["text"] for e in events)


def test_byte_flipped_stream_skips_bad_frames_and_continues(capsys, tmp_path):
    good = write_video(tmp_path / "good.mp4", 40, width=128, height=96)
    bad = flip_bytes(good, tmp_path / "flipped.mp4")
    out = tmp_path / "o.jsonl"
    code, err = cli(capsys, "--source", str(bad), "--jsonl", str(out))
    assert code == 0
    line = one_line(err)
    assert str(bad) in line and "skipped" in line
    eof = [e for e in jsonl(out) if e["type"] == "status" and e["state"] == "eof"][0]
    assert eof["bad_frames"] >= 1 and "after" in eof["text"]
    n_frames = int(eof["text"].split("after ")[1].split()[0])
    assert 20 <= n_frames < 40  # the run went on past the damage


def test_audio_only_file(capsys, tmp_path):
    p = write_audio_only(tmp_path / "voice.m4a")
    code, err = cli(capsys, "--source", str(p))
    assert code == 2 and one_line(err) == f"framecast: {p}: no video stream (audio only)"


@pytest.mark.parametrize("uri", ["ftp://example.com/a.mp4", "gopher://x"])
def test_unsupported_url_scheme(capsys, uri):
    code, err = cli(capsys, "--source", uri)
    assert code == 2 and one_line(err).startswith(f"framecast: {uri}: unsupported source scheme")


def test_camera_that_does_not_exist(capsys, tmp_path):
    out = tmp_path / "o.jsonl"
    code, err = cli(capsys, "--source", "camera:97", "--jsonl", str(out))
    assert code == 2 and one_line(err) == "framecast: camera:97: cannot open camera device 97 (no such device, or busy)"
    assert jsonl(out)[-1]["type"] == "eos"


def test_unwritable_output(capsys, tmp_path):
    (tmp_path / "f").write_text("a file, not a directory")
    code, err = cli(capsys, "--source", "demo", "--max-frames", "2", "--jsonl", str(tmp_path / "f" / "o.jsonl"))
    assert code == 2 and str(tmp_path / "f" / "o.jsonl") in one_line(err)


@pytest.fixture()
def silent_server():
    """A TCP server on loopback that accepts connections and never sends a byte."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve():
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                accepted.append(conn)
            except OSError:
                continue

    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()[1], accepted
    stop.set()
    for c in accepted:
        c.close()
    srv.close()


def test_rtsp_server_that_never_sends_trips_the_watchdog(capsys, tmp_path, silent_server):
    port, accepted = silent_server
    uri = f"rtsp://127.0.0.1:{port}/live"
    out = tmp_path / "o.jsonl"
    t0 = time.monotonic()
    code = main(["run", "--no-console", "--capture-only", "--source", uri, "--jsonl", str(out), "--watchdog", "0.3",
                 "--open-timeout", "0.3", "--backoff", "0.05", "--reconnect-max", "2"])
    elapsed = time.monotonic() - t0
    line = one_line(capsys.readouterr().err)
    assert code == 1 and line.startswith(f"framecast: {uri}: ") and "gave up after 2 reconnect attempts" in line
    assert elapsed < 6  # bounded: (open timeout + backoff) per attempt, no hang
    assert len(accepted) == 3  # first connection + 2 reconnects
    events = jsonl(out)
    recon = [e for e in events if e["type"] == "status" and e["state"] == "reconnecting"]
    assert [e["reconnects"] for e in recon] == [1, 2]
    assert events[-2]["type"] == "error" and events[-1]["type"] == "eos"


def test_slow_consumer_on_a_live_source_drops_frames_with_flat_memory():
    class Slow(Stage):
        name = "slow"

        def __init__(self):
            super().__init__()
            self.frames = 0

        async def process(self, item):
            if isinstance(item, Frame):
                self.frames += 1
                await asyncio.sleep(0.03)
            yield item

    # 320x240 RGB = 230 kB a frame at 200 fps: an unbounded queue would grow ~45 MB/s.
    cfg = SourceConfig(uri="demo", realtime=True, fps=200, width=320, height=240, duration=1.5)
    src, slow = make_source(cfg), Slow()
    samples: list[int] = []

    async def main_():
        rt = Runtime(src, [slow], edge_size=4)

        async def sample():
            while True:
                await asyncio.sleep(0.25)
                samples.append(tracemalloc.get_traced_memory()[0])

        sampler = asyncio.create_task(sample())
        res = await rt.run(handle_signals=False)
        sampler.cancel()
        return res

    tracemalloc.start()
    try:
        res = asyncio.run(main_())
    finally:
        tracemalloc.stop()
    drops = res.metrics["slow"]["drops"]
    assert src.live and drops > 50 and slow.frames + drops == src.metrics.extra["frames"]
    assert res.metrics["slow"]["queue_max_depth"] <= 4
    assert max(samples[1:]) - samples[1] < 8_000_000, samples  # flat, not growing with drops


def test_stop_while_a_live_source_hangs_is_prompt_and_ends_with_a_status(silent_server):
    from framecast.events import Status

    port, _ = silent_server
    cfg = SourceConfig(uri=f"rtsp://127.0.0.1:{port}/live", watchdog_s=30, open_timeout_s=30)
    seen: list = []

    class Keep(Stage):
        name = "keep"

        async def process(self, item):
            seen.append(item)
            yield item

    async def main_():
        rt = Runtime(make_source(cfg), [Keep()])
        task = asyncio.create_task(rt.run(handle_signals=False))
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        rt.request_stop("signal")
        res = await asyncio.wait_for(task, 10)
        return res, time.monotonic() - t0

    res, took = asyncio.run(main_())
    assert took < 1.0 and res.stopped_by == "signal"
    assert [s.state for s in seen if isinstance(s, Status)] == ["starting", "stopped"]


@pytest.mark.parametrize("flag,what,name", [
    ("--jsonl", "JSONL", "x.jsonl"), ("--srt", "SRT", "x.srt"), ("--vtt", "VTT", "x.vtt"),
    ("session.state_file", "session state", "state.safetensors"),
])
def test_output_in_a_missing_directory_is_refused_and_nothing_is_created(capsys, tmp_path, flag, what, name):
    bad = tmp_path / "no" / "such" / name
    good = tmp_path / "good.jsonl" if flag != "--jsonl" else tmp_path / "good.srt"
    other = "--srt" if flag == "--jsonl" else "--jsonl"
    arg = ["--set", f"{flag}={bad}"] if "." in flag else [flag, str(bad)]
    code, err = cli(capsys, "--source", "demo", "--max-frames", "2", other, str(good), *arg)
    assert code == 2
    assert one_line(err) == f"framecast: {bad}: cannot write {what} output: no such directory '{bad.parent}'"
    assert not (tmp_path / "no").exists() and not good.exists()  # no directory made, no other output begun


def test_output_paths_literal_nonexistent_and_a_directory(capsys, tmp_path):
    code, err = cli(capsys, "--source", "demo", "--max-frames", "2", "--jsonl", "/nonexistent/dir/x.jsonl")
    assert code == 2 and one_line(err) == ("framecast: /nonexistent/dir/x.jsonl: cannot write JSONL output: "
                                           "no such directory '/nonexistent/dir'")
    assert not __import__("os").path.exists("/nonexistent")
    code, err = cli(capsys, "--source", "demo", "--max-frames", "2", "--srt", str(tmp_path))
    assert code == 2 and one_line(err) == f"framecast: {tmp_path}: cannot write SRT output: is a directory"


@pytest.mark.parametrize("setting, says", [
    ("session.max_cache_mb=0.001", "session.max_cache_mb = 0.001 holds 0 tokens of this model's cache, not even the "
                                   "system prompt"),
    ("session.max_cache_mb=0.2", "session.max_cache_mb = 0.2: a budget of 34 tokens cannot hold the sinks"),
    ("narration.policy=change", None),  # with max_cache_mb=0.2: the first frame's narration is refused
])
def test_a_cache_budget_too_small_for_a_frame_is_one_line_and_exit_2(capsys, tmp_path, setting, says):
    """A budget that cannot hold the prompt, or the prompt and one frame, is a setting: the run
    stops at once with one line naming the key that binds (not 20 errors and exit 0), and the
    JSONL written so far ends with its end marker."""
    out = tmp_path / "x.jsonl"
    extra = ["--set", "session.max_cache_mb=0.2"] if says is None else []
    says = says or "plus 68 new tokens"  # the frame, the prompt and the turn's max_tokens
    code = main(["run", "--source", "demo", "--max-frames", "20", "--set", setting, *extra, "--jsonl", str(out),
                 "--no-console"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and says in err[0], err
    if out.exists():
        assert json.loads(out.read_text().splitlines()[-1])["text"] == "fatal"


def test_a_stream_fragment_with_stream_id_says_why_the_file_is_missing(capsys, tmp_path):
    """`clip.mp4#x --stream-id y`: the URI is taken whole (documented), so the one line says the
    file without the fragment exists and why it was not used."""
    clip = write_video(tmp_path / "clip.mp4", n=3)
    code = main(["run", "--source", f"{clip}#x", "--stream-id", "y", "--capture-only", "--no-console"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no such file" in err[0] and "names a stream only when no --stream-id" in err[0]


@pytest.mark.parametrize("args, says", [
    (["--set", "session.max_cache_mb=inf"], "session.max_cache_mb = 'inf': Input should be a finite number"),
    (["--set", "session.max_cache_tokens=99999999999999999999999"], "session.max_cache_tokens = "),
    (["--start", "1e300"], "source.start = 1e+300: Input should be less than or equal to 10000000"),
    (["--set", "source.duration=inf"], "source.duration = 'inf': Input should be a finite number"),
    (["--set", "narration.interval_s=inf"], "narration.interval_s = 'inf': Input should be a finite number"),
    (["--set", "narration.temperature=1e308"], "narration.temperature = '1e308': Input should be less than or equal to 10"),
    (["--set", "narration.prompt="], "narration.prompt = '': String should have at least 1 character"),
    (["--max-cache-tokens", "256", "--set", "session.sink_tokens=1000"],
     "session.sink_tokens = 1000 leaves nothing of session.max_cache_tokens = 256 for frames"),
    (["--max-cache-tokens", "256", "--set", "narration.max_tokens=300"],
     "narration.max_tokens = 300 does not fit in session.max_cache_tokens = 256"),
])
def test_settings_that_could_only_overflow_later_are_refused_up_front(capsys, args, says):
    """Infinite, absurdly large and self-defeating settings: one line naming the key, exit 2,
    before anything runs (they used to end in an OverflowError traceback or a mid-run error)."""
    code = main(["run", "--source", "demo", "--max-frames", "3", "--no-console", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and says in err[0], err


def test_a_closing_narration_the_budget_refuses_stops_with_exit_2(capsys, tmp_path):
    """The end-of-file narration (frame path and interval narrations never ran) refused by the
    budget: one line, exit 2, the JSONL ends `fatal` (it used to be an error event and exit 0)."""
    clip = write_video(tmp_path / "clip.mp4", n=30)
    out = tmp_path / "v.jsonl"
    code = main(["run", "--source", str(clip), "--fps", "2", "--max-cache-tokens", "256", "--set",
                 "narration.max_tokens=240", "--set", "narration.interval_s=100", "--jsonl", str(out), "--no-console"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot hold the sinks" in err[0] and "UserError" not in err[0], err
    assert json.loads(out.read_text().splitlines()[-1])["text"] == "fatal"
