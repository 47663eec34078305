"""The `framecast` command line, run as a user runs it (a subprocess), plus quick in-process checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from framecast import __version__
from framecast.stages.cli import main
from video_fixtures import write_video

REPO = Path(__file__).resolve().parent.parent


def framecast(*args: str, cwd: Path, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "framecast", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


def envelopes(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    out = [json.loads(line) for line in lines]
    for d in out:
        assert {"v", "type", "stream_id", "seq", "ts", "pts"} <= d.keys() and "pixels" not in d
    return out


def test_run_demo_60_frames_to_jsonl(tmp_path):
    r = framecast("run", "--source", "demo", "--max-frames", "60", "--jsonl", "out.jsonl", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ev = envelopes(tmp_path / "out.jsonl")
    assert ev[0]["type"] == "status" and ev[0]["state"] == "running"
    eof = [e for e in ev if e["type"] == "status" and e["state"] == "eof"]
    assert eof and eof[0]["text"].endswith("after 60 frames")
    assert any(e["type"] == "change" for e in ev) and ev[-1]["type"] == "eos"
    assert "-- running: demo" in r.stdout  # the live terminal view


def test_run_real_mp4_with_subtitles_and_metrics(tmp_path):
    write_video(tmp_path / "clip.mp4", 30, fps=10, width=96, height=64)
    r = framecast("run", "--source", "clip.mp4", "--max-frames", "60", "--jsonl", "out.jsonl", "--srt", "o.srt",
                  "--vtt", "o.vtt", "--fps", "5", "--metrics", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ev = envelopes(tmp_path / "out.jsonl")
    running = ev[0]
    assert running["state"] == "running" and running["duration"] == pytest.approx(3.0)
    assert [e for e in ev if e.get("state") == "eof"][0]["text"].endswith("after 15 frames")
    assert (tmp_path / "o.vtt").read_text().startswith("WEBVTT")
    assert (tmp_path / "o.srt").exists()
    assert "stage" in r.stderr and "frames=15" in r.stderr  # the metrics table at exit


def test_metrics_printed_periodically(tmp_path):
    r = framecast("run", "--capture-only", "--source", "demo", "--max-frames", "16", "--fps", "20", "--realtime",
                  "--no-console",
                  "--metrics", "--metrics-interval", "0.2", "--set", "source.width=64", "--set", "source.height=64",
                  cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("p50 ms") >= 3  # at least two periodic tables, then the one at exit


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly_and_flushes_outputs(tmp_path, sig):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "o.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "framecast", "run", "--capture-only", "--source", "demo",
                             "--realtime", "--fps", "20", "--no-console", "--jsonl", str(out), "--vtt", str(tmp_path / "o.vtt"),
                             "--set", "source.width=64", "--set", "source.height=64"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (out.exists() and '"running"' in out.read_text()):
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err
    ev = envelopes(out)
    assert ev[-1] == {**ev[-1], "type": "eos", "text": "signal"}
    stopped = [e for e in ev if e["type"] == "status" and e["state"] == "stopped"]
    assert stopped and int(stopped[0]["text"].split("after ")[1].split()[0]) >= 3
    assert (tmp_path / "o.vtt").read_text().startswith("WEBVTT")
    assert "Traceback" not in err


def test_capture_only_builds_no_model_stages():
    from framecast.stages.app import build_graph
    from framecast.config import load_config

    source, stages = build_graph(load_config(None, {"runtime.capture_only": True, "outputs.console": False}))
    assert source.name == "demo" and [s.name for s in stages] == ["change"]


def test_version(tmp_path):
    r = framecast("--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"framecast {__version__}"


def test_config_check_ok_bad_value_unknown_key(tmp_path, capsys):
    good = tmp_path / "good.toml"
    good.write_text('[source]\nuri = "demo"\nfps = 2.0\n[change]\nthreshold = 0.1\n')
    assert main(["config", "check", str(good)]) == 0
    assert capsys.readouterr().out.strip() == f"{good}: ok"

    bad = tmp_path / "bad.toml"
    bad.write_text("[source]\nfps = -3\n")
    assert main(["config", "check", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == f"framecast: {bad}: source.fps = -3: Input should be greater than 0"

    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("outputs:\n  jsnol: out.jsonl\n")
    assert main(["config", "check", str(unknown)]) == 2
    assert capsys.readouterr().err.strip() == f"framecast: {unknown}: unknown key 'outputs.jsnol' = 'out.jsonl'"


def test_config_check_subprocess_exit_status_and_one_line(tmp_path):
    (tmp_path / "c.toml").write_text("[change]\nthreshold = 3\n")
    r = framecast("config", "check", "c.toml", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert r.stderr.strip() == "framecast: c.toml: change.threshold = 3: Input should be less than or equal to 1"


def test_presets_list_and_check(capsys):
    assert main(["config", "list"]) == 0
    names = capsys.readouterr().out.split()
    assert {"camera-narration", "recorded-analysis", "mqtt"} <= set(names)
    for name in names:
        assert main(["config", "check", name]) == 0, capsys.readouterr().err


def test_bad_flags_and_overrides_are_one_line_exit_2(capsys):
    assert main(["run", "--source", "demo", "--fps", "0"]) == 2
    assert capsys.readouterr().err.strip() == "framecast: command line: source.fps = 0.0: Input should be greater than 0"
    assert main(["run", "--set", "source.nope=1"]) == 2
    assert capsys.readouterr().err.strip() == "framecast: command line: unknown key 'source.nope' = 1"
    assert main(["run", "--set", "oops"]) == 2
    assert "--set 'oops'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["run", "--max-frames", "many"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
