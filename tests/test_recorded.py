"""Recorded-video analysis (issue 16): chapters, the summary, saved sessions asked offline,
sessions tied to their video, the progress bar's speed.

The video is made here: three scenes of 10 s (a red circle, two blue squares, three yellow
triangles, drifting slowly) with hard cuts, h264. The pipeline runs once in-process with the
embedded demo model (module fixture); tests read what it produced.

Structure is checked with whatever weights are shipped. Content (does the title / summary /
answer name the right colour, shape and count?) depends on the demo model having been trained
on the chapter-title and summary turns: those tests are `xfail(strict=False)` until it is.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from framecast.config import ChaptersConfig, load_config
from framecast.engine.session import TurnDone
from framecast.engine.text_turns import LogLine, chapter_lines, clock, dedupe, narration_lines, thin
from framecast.events import Chapter, Frame, Narration, Status, Summary, event_from_dict
from framecast.model.load import DEMO_MODEL_DIR
from framecast.runtime import Runtime
from framecast.stages.app import build_graph
from framecast.stages.ask_session import plan, time_reference, where
from framecast.stages.chapters import ChapterStage, clean_title
from framecast.stages.cli import main
from framecast.stages.decode import DecodeStage, make_turn_sampler
from framecast.stages.outputs.console import ConsoleOutput
from framecast.stages.session_file import Archive, check_source, read_archive
from framecast.stages.sources.fingerprint import fingerprint, mismatch
from framecast.stages.summary import Part, summarize
from framecast.errors import UserError
from video_fixtures import THREE_SCENES, write_scene_video

REPO = Path(__file__).resolve().parent.parent
CUTS = (10.0, 20.0)
needs_demo = pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").is_file(), reason="no embedded demo model")
CONTENT = pytest.mark.xfail(strict=False, reason="content needs a demo model that names colours, shapes and motions reliably "
                                                 "(issue 11); structure is tested above")
NUMBER_WORDS = {1: ("one", "1", "a single"), 2: ("two", "2"), 3: ("three", "3")}


def framecast(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "framecast", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def ask_here(capsys, *args: str) -> tuple[int, str, str]:
    """`framecast ask ...` in this process (no interpreter start-up): (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = main(["ask", *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    other = (("star", "green", 2), ("circle", "white", 1), ("cross", "orange", 2))
    return write_scene_video(d / "three.mp4"), write_scene_video(d / "other.mp4", scenes=other)


def _run(cfg):
    source, stages = build_graph(cfg)
    result = asyncio.run(Runtime(source, stages, stream_id=cfg.source.stream_id).run(handle_signals=False))
    return result, stages


@pytest.fixture(scope="module")
def analysed(videos, tmp_path_factory):
    """One run of the whole main job on the three-scene video, all analysis outputs on."""
    if not (DEMO_MODEL_DIR / "config.json").is_file():
        pytest.skip("no embedded demo model")
    out = tmp_path_factory.mktemp("run")
    cfg = load_config("recorded-analysis", {
        "source.uri": str(videos[0]), "source.fps": 1.0, "outputs.jsonl": str(out / "out.jsonl"),
        "outputs.srt": None, "outputs.vtt": None, "outputs.progress": False,
        "outputs.chapters": str(out / "chapters.vtt"), "outputs.summary": str(out / "summary.md"),
        "outputs.session": str(out / "run.fcs")})
    result, stages = _run(cfg)
    assert result.exit_code == 0, result.errors
    events = [json.loads(line) for line in (out / "out.jsonl").read_text().splitlines()]
    decode = next(st for st in stages if isinstance(st, DecodeStage))

    async def first_answer():  # asked of the live cache as the run left it, before anything else
        turn = [ev async for ev in decode.session.ask(GENERAL[0], max_tokens=cfg.narration.max_tokens,
                                                      sampler=make_turn_sampler(cfg.narration))]
        return turn[-1].text.strip()

    live = asyncio.run(first_answer())
    return {"dir": out, "events": events, "decode": decode, "cfg": cfg, "live": live}


def of_type(events, kind):
    return [e for e in events if e["type"] == kind]


# ---------------------------------------------------------------- chapters


@needs_demo
def test_three_chapters_within_one_second_of_the_cuts(analysed):
    chapters = of_type(analysed["events"], "chapter")
    assert [c["index"] for c in chapters] == [1, 2, 3]
    assert chapters[0]["pts_start"] == pytest.approx(0.0, abs=1.0)
    for prev, nxt, cut in zip(chapters, chapters[1:], CUTS):
        assert prev["pts_end"] == nxt["pts_start"]  # contiguous
        assert abs(nxt["pts_start"] - cut) <= 1.0
    assert chapters[-1]["pts_end"] == pytest.approx(30.0, abs=1.0)
    assert all(c["text"].strip() and c["narrations"] >= 1 for c in chapters)


@needs_demo
def test_chapters_vtt_file_matches_the_events(analysed):
    text = (analysed["dir"] / "chapters.vtt").read_text()
    assert text.startswith("WEBVTT\n\n")
    cues = re.findall(r"(\d+)\n(\d\d:\d\d:\d\d\.\d{3}) --> (\d\d:\d\d:\d\d\.\d{3})\n(.+)\n", text)
    chapters = of_type(analysed["events"], "chapter")
    assert len(cues) == len(chapters) == 3

    def secs(t: str) -> float:
        h, m, s = t.split(":")
        return int(h) * 3600 + int(m) * 60 + float(s)

    for (n, a, b, title), ch in zip(cues, chapters):
        assert int(n) == ch["index"] and secs(a) == pytest.approx(ch["pts_start"], abs=1e-3)
        assert secs(b) == pytest.approx(ch["pts_end"], abs=1e-3)
        assert title.strip()


@needs_demo
def test_every_line_parses_and_summary_comes_last(analysed):
    events = analysed["events"]
    for d in events:
        if d["type"] != "eos":
            event_from_dict(d)  # chapter and summary are part of the schema
    types = [e["type"] for e in events]
    assert types[-1] == "eos" and types[-2] == "summary" and types.count("summary") == 1
    assert max(i for i, t in enumerate(types) if t == "chapter") < types.index("summary")


# ---------------------------------------------------------------- summary


@needs_demo
def test_summary_event_and_markdown_file(analysed):
    (s,) = of_type(analysed["events"], "summary")
    assert s["text"].strip() and s["chapters"] == 3 and s["levels"] == 1
    assert s["pts_start"] == 0.0 and s["pts_end"] == pytest.approx(30.0)
    assert s["realtime"] > 0 and s["narrations"] == len(of_type(analysed["events"], "narration"))
    md = (analysed["dir"] / "summary.md").read_text()
    assert md.startswith("# Summary") and s["text"].strip() in md
    assert len(re.findall(r"^### \d\. \[\d:\d\d-\d:\d\d\] ", md, re.M)) == 3


class FakeTurns:
    """Counts words as tokens and answers with a fixed text; records every prompt."""

    def __init__(self):
        self.prompts: list[str] = []
        self.turns = 0

    def count(self, text: str) -> int:
        return len(text.split())

    async def run(self, prompt: str, *, max_tokens: int) -> TurnDone:
        self.prompts.append(prompt)
        self.turns += 1
        return TurnDone(text=f"summary {self.turns}", tokens=2, prompt_tokens=0, stopped="eos", prefill_s=0,
                        first_token_s=0, tokens_per_s=0, cache_tokens=0, cache_bytes=0)


def _parts(n: int, lines: int = 20) -> list[Part]:
    return [Part(10.0 * k, 10.0 * (k + 1), f"title {k}",
                 tuple(f"chapter {k} narration {i} with a few more words" for i in range(lines))) for k in range(n)]


@pytest.mark.parametrize("n,budget,levels", [(3, 10_000, 1), (3, 120, 1), (40, 200, 2), (200, 120, 3)])
def test_summary_is_hierarchical_and_every_prompt_fits(n, budget, levels):
    turns = FakeTurns()
    text, got = asyncio.run(summarize(_parts(n), turns, max_tokens=32, prompt_tokens=budget))
    assert got >= levels and text.startswith("summary")
    assert all(turns.count(p) <= budget for p in turns.prompts)
    first_level = "\n".join(turns.prompts[:-1] if got > 1 else turns.prompts)
    for k in range(n):  # every chapter reached a prompt of the first level (nothing dropped)
        assert f"title {k}:" in first_level


def test_summary_thins_narrations_evenly_keeping_first_and_last():
    turns = FakeTurns()
    asyncio.run(summarize(_parts(2, lines=50), turns, max_tokens=32, prompt_tokens=200))
    (prompt,) = turns.prompts
    assert "chapter 0 narration 0 " in prompt and "chapter 0 narration 49 " in prompt
    assert "chapter 1 narration 49 " in prompt and prompt.count("narration") < 100


def test_prompt_formats_follow_the_prompts_module():
    lines = [LogLine(5.0, "a red circle appears."), LogLine(5.0, "a red circle appears."), LogLine(65.0, "it moves.")]
    assert narration_lines(dedupe(lines)) == "[0:05] a red circle appears.\n[1:05] it moves."
    from framecast.engine.text_turns import ChapterLine
    assert chapter_lines([ChapterLine(1, 0, 10, "A red circle", "a red circle appears. it moves.")]) == \
        "1. [0:00-0:10] A red circle: a red circle appears. it moves."
    assert clock(3725) == "1:02:05"
    picked = thin([LogLine(i, f"n{i}") for i in range(100)], lambda p: len(p) <= 7)
    assert len(picked) == 7 and picked[0].text == "n0" and picked[-1].text == "n99"
    assert clean_title('"A red circle."\nmore') == "A red circle"


# ---------------------------------------------------------------- chapter segmentation (no model)


def _frames(changes: dict[float, bool], n: int, dt: float = 1.0):
    import numpy as np

    px = np.zeros((8, 8, 3), np.uint8)
    return [Frame(pixels=px, pts=i * dt, changed=changes.get(i * dt, i == 0)) for i in range(n)]


async def _feed(stage, items):
    out = []
    for it in items:
        out += [e async for e in stage.process(it)]
    out += [e async for e in stage.on_end()]
    return [e for e in out if isinstance(e, Chapter)]


@pytest.mark.parametrize("changes,n,cfg,spans", [
    ({4.0: True, 10.0: True, 13.0: True, 20.0: True}, 30, {}, [(0, 10), (10, 20), (20, 30)]),  # motion merged
    ({10.0: True, 26.0: True}, 30, {}, [(0, 10), (10, 30)]),  # 4-s tail joins the chapter before it
    ({}, 25, {"max_s": 10.0}, [(0, 10), (10, 20), (20, 25)]),  # no change at all: max_s splits
    ({3.0: True, 5.0: True}, 8, {"min_s": 2.0}, [(0, 3), (3, 5), (5, 8)]),
    ({}, 1, {}, [(0, 0)]),  # one frame, no duration known: nothing to measure
])
def test_scene_segments_merge_into_chapters(changes, n, cfg, spans):
    frames = _frames(changes, n)
    stage = ChapterStage(ChaptersConfig(cut_threshold=0, **cfg))  # every marked change may be a cut
    got = asyncio.run(_feed(stage, [Status(state="running"), *frames]))
    assert [(c.pts_start, c.pts_end) for c in got] == [tuple(map(float, s)) for s in spans]
    assert [c.text for c in got] == [f"Chapter {k + 1}" for k in range(len(spans))]  # no model: no made-up title


def test_motion_is_not_a_cut_but_new_colours_are():
    """The cut gate: a shape that moves keeps the colour histogram (no chapter), a new scene
    replaces it (a chapter), whatever the change detector marked."""
    from framecast.stages.sources.clips import scene_frame

    frames = []
    for t in range(30):  # 0-19 s: one red circle moving (changes marked every 3 s); 20-29 s: blue squares
        px = scene_frame(float(t) * 3, "circle", "red", 1) if t < 20 else scene_frame(float(t), "square", "blue", 2)
        frames.append(Frame(pixels=px, pts=float(t), changed=t == 0 or t % 3 == 0 or t == 20))
    got = asyncio.run(_feed(ChapterStage(ChaptersConfig()), frames))
    assert [(c.pts_start, c.pts_end) for c in got] == [(0.0, 20.0), (20.0, 30.0)]
    got = asyncio.run(_feed(ChapterStage(ChaptersConfig(cut_threshold=0)), frames))  # gate off: motion cuts
    assert [(c.pts_start, c.pts_end) for c in got][0] == (0.0, 12.0)


def test_chapters_end_at_the_file_duration():
    frames = _frames({10.0: True}, 20)
    got = asyncio.run(_feed(ChapterStage(ChaptersConfig(cut_threshold=0)), [Status(state="running", duration=20.5), *frames]))
    assert got[-1].pts_end == 20.5


def test_narrations_go_to_the_chapter_of_their_midpoint():
    frames = _frames({10.0: True}, 20)
    stage = ChapterStage(ChaptersConfig(cut_threshold=0))
    items = []
    for f in frames:
        items.append(f)
        if f.pts and f.pts % 2 == 0:
            items.append(Narration(text=f"n{f.pts:g}", pts=f.pts, pts_start=f.pts - 2, pts_end=f.pts))
    got = asyncio.run(_feed(stage, items))
    assert [c.narrations for c in got] == [5, 4]  # the one at 10 s covers 8-10 s: chapter 1


@pytest.mark.parametrize("fps,lengths", [(1, (10, 10, 10)), (5, (10, 10, 10)), (2, (12, 15, 11)), (3, (25, 11, 14))])
def test_capture_only_run_makes_untitled_chapters_at_the_cuts(tmp_path, fps, lengths):
    video = write_scene_video(tmp_path / "v.mp4", scene_s=lengths, fps=10 if fps == 5 else 6, size=96)
    assert main(["run", "--capture-only", "--source", str(video), "--fps", str(fps), "--no-console",
                 "--jsonl", str(tmp_path / "o.jsonl"), "--chapters", str(tmp_path / "c.vtt")]) == 0
    ch = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines() if '"chapter"' in x]
    cuts = [sum(lengths[:k]) for k in range(len(lengths) + 1)]
    assert len(ch) == 3 and [c["text"] for c in ch] == ["Chapter 1", "Chapter 2", "Chapter 3"]
    for c, start, end in zip(ch, cuts, cuts[1:]):
        assert abs(c["pts_start"] - start) <= 1.0 and abs(c["pts_end"] - end) <= 1.0
    assert (tmp_path / "c.vtt").read_text().count(" --> ") == 3


def test_chapters_reach_the_mqtt_event_topic(videos, tmp_path):
    from broker import Broker, Recorder

    broker = Broker(tmp_path / "broker").start()
    try:
        rec = Recorder(broker.port, ["fc/rec/event"])
        r = framecast("run", "--capture-only", "--source", str(videos[0]), "--fps", "1", "--no-console",
                      "--stream-id", "rec", "--mqtt", broker.url, "--mqtt-prefix", "fc",
                      "--set", "chapters.enabled=true", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert rec.wait_for(lambda ms: sum('"chapter"' in m.payload.decode() for m in ms) >= 3, 10)
        chapters = [m.json() for m in rec.on("fc/rec/event") if m.json()["type"] == "chapter"]
        assert [(c["index"], c["pts_start"], c["pts_end"]) for c in chapters] == \
            [(1, 0.0, 10.0), (2, 10.0, 20.0), (3, 20.0, 30.0)]
        rec.close()
    finally:
        broker.stop()


@pytest.mark.parametrize("args,why", [
    (["--set", "chapters.max_s=5"], "chapters.max_s = 5: must be at least chapters.min_s (10)"),
    (["--set", "chapters.min_s=0"], "chapters.min_s = 0: Input should be greater than 0"),
    (["--chapters", "c.vtt", "--set", "chapters.enabled=false"], "outputs.chapters = 'c.vtt': chapters.enabled is false"),
    (["--set", "summary.prompt_tokens=10"], "summary.prompt_tokens = 10: Input should be greater than or equal to 64"),
])
def test_bad_analysis_settings_give_one_line(videos, tmp_path, capsys, monkeypatch, args, why):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--capture-only", "--source", str(videos[0]), "--no-console", *args]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert why in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--summary", "--save-session"])
def test_summary_and_saved_session_need_a_model(videos, tmp_path, capsys, flag):
    assert main(["run", "--capture-only", "--source", str(videos[0]), "--no-console", flag, "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a model" in err[0]
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- saved sessions


@needs_demo
def test_saved_session_archive_holds_cache_log_chapters(analysed):
    path = analysed["dir"] / "run.fcs"
    with zipfile.ZipFile(path) as z:
        assert {"manifest.json", "session.safetensors", "narrations.jsonl", "transcript.jsonl",
                "chapters.jsonl", "summary.json"} <= set(z.namelist())
    a = read_archive(path)
    assert len(a.chapters) == 3 and a.summary is not None
    assert len(a.narrations) == len(of_type(analysed["events"], "narration"))
    fp = a.manifest["source"]
    assert fp["kind"] == "file" and fp["size"] > 0 and fp["duration"] == pytest.approx(30.0)
    assert len(fp["first_frames_sha256"]) == 64 and a.manifest["cache_window"][1] == pytest.approx(30.0)


GENERAL = ("how many shapes do you see?", "what do you see?", "what colour is the triangle?",
           "what do you see in chapter 3?")


def _extract(fcs: Path, tmp: Path) -> Path:
    return read_archive(fcs).extract_session(tmp)


@needs_demo
def test_offline_answer_equals_the_live_answer_before_saving(analysed, tmp_path):
    """Greedy: the live session as the run left it and a new process that loads the saved
    session answer with the same words, and say which span they draw on."""
    r = framecast("ask", "--session", str(analysed["dir"] / "run.fcs"), GENERAL[0], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    answer, span = r.stdout.strip().splitlines()
    assert answer == analysed["live"] and span == "-- from the KV cache, 0:00-0:30"


@needs_demo
def test_offline_answers_equal_in_process_answers(analysed, tmp_path, capsys):
    """More questions the cache answers (no time, or the newest chapter): each asked in this
    process of the restored state, and by `framecast ask` (its own model and session)."""
    decode, cfg = analysed["decode"], analysed["cfg"]

    async def in_process():
        out = []
        for q in GENERAL:
            await decode.session.load(_extract(analysed["dir"] / "run.fcs", tmp_path))
            done = [ev async for ev in decode.session.ask(q, max_tokens=cfg.narration.max_tokens,
                                                          sampler=make_turn_sampler(cfg.narration))][-1]
            out.append(done.text.strip())
        return out

    expected = asyncio.run(in_process())
    assert expected[0] == analysed["live"]
    for q, want in zip(GENERAL, expected):
        rc, out, err = ask_here(capsys, "--session", str(analysed["dir"] / "run.fcs"), q, "--json")
        assert rc == 0, err
        ans = json.loads(out)
        assert ans["basis"] == "cache" and ans["text"] == want, q


@needs_demo
def test_question_about_an_earlier_chapter_is_answered_from_the_log(analysed, capsys):
    rc, out, err = ask_here(capsys, "--session", str(analysed["dir"] / "run.fcs"), "what do you see in chapter 1?",
                            "--json")
    assert rc == 0, err
    ans = json.loads(out)
    assert ans["basis"] == "narration log" and (ans["pts_start"], ans["pts_end"]) == (0.0, 10.0)
    assert ans["text"].strip()


@needs_demo
def test_another_video_is_refused_unless_forced(analysed, videos, tmp_path, capsys):
    fcs = str(analysed["dir"] / "run.fcs")
    r = framecast("ask", "--session", fcs, "--source", str(videos[1]), "what do you see?", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    (line,) = r.stderr.strip().splitlines()
    assert "first frames differ" in line and "--force" in line and "other.mp4" in line
    rc, out, err = ask_here(capsys, "--session", fcs, "--source", str(videos[1]), "--force", "what do you see?")
    assert rc == 0 and "warning" in err and out.strip()
    capsys.readouterr()
    assert main(["run", "--source", str(videos[1]), "--resume", fcs, "--no-console"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "first frames differ" in line
    copy = tmp_path / "moved.mp4"  # the same video elsewhere is the same video
    shutil.copy(videos[0], copy)
    rc, out, err = ask_here(capsys, "--session", fcs, "--source", str(copy), "what do you see?")
    assert rc == 0, err


def test_fingerprint_kinds(videos, tmp_path):
    a, b = fingerprint(str(videos[0])), fingerprint(str(videos[1]))
    assert mismatch(a, a) is None and "first frames differ" in mismatch(a, b)
    tampered = tmp_path / "t.mp4"
    data = bytearray(videos[0].read_bytes())
    i = data.find(b"mdat") + 200  # inside the first frame's packet
    data[i] ^= 0xFF
    tampered.write_bytes(bytes(data))
    assert mismatch(a, fingerprint(str(tampered))) == "first frames differ"
    assert mismatch(fingerprint("demo"), fingerprint("demo")) is None
    from framecast.config import SourceConfig
    assert "seed differs" in mismatch(fingerprint("demo"), fingerprint("demo", SourceConfig(seed=3)))
    assert mismatch(fingerprint("rtsp://cam/a"), fingerprint("rtsp://cam/b")) == "another URI"


def test_a_replaced_file_at_the_saved_path_is_refused(videos, tmp_path):
    path = tmp_path / "v.mp4"
    shutil.copy(videos[0], path)
    archive = Archive(tmp_path / "s.fcs", {"source": fingerprint(str(path))})
    assert check_source(archive, None) is None
    shutil.copy(videos[1], path)  # same name, other content
    with pytest.raises(UserError, match="saved from .*v.mp4.*first frames differ"):
        check_source(archive, None)
    assert "first frames differ" in check_source(archive, None, force=True)


class FailingSession:
    core = None

    async def save(self, path):
        raise OSError(28, "No space left on device")


class DummySession:
    core = None

    async def save(self, path):
        Path(path).write_bytes(b"cache")
        return Path(path)


def test_transcript_keeps_questions_and_answers_in_order(tmp_path):
    from framecast.events import Answer, QuestionRecord
    from framecast.stages.session_file import SessionArchiveStage

    stage = SessionArchiveStage(str(tmp_path / "s.fcs"), DummySession(), manifest={}, fingerprint={"kind": "demo"})
    items = [Narration(text="a red circle.", pts=2.0, pts_start=0.0, pts_end=2.0),
             QuestionRecord(text="how many?", request_id="q1", pts=3.0),
             Answer(text="one.", request_id="q1", question="how many?", pts=3.0),
             Chapter(text="A red circle", index=1, pts_start=0.0, pts_end=4.0)]

    async def feed():
        for it in items:
            async for _ in stage.process(it):
                pass
        async for _ in stage.on_end():
            pass

    asyncio.run(feed())
    a = read_archive(tmp_path / "s.fcs")
    assert [e.type for e in a.transcript] == ["narration", "question", "answer"]
    assert [n.text for n in a.narrations] == ["a red circle."] and [c.text for c in a.chapters] == ["A red circle"]
    assert a.manifest["source"] == {"kind": "demo"} and a.summary is None


def test_a_failed_save_is_one_line_and_exit_1_without_a_hang(tmp_path):
    from framecast.config import SourceConfig
    from framecast.stages.session_file import SessionArchiveStage
    from framecast.stages.sources import make_source

    source = make_source(SourceConfig(uri="demo", max_frames=3, width=64, height=64, realtime=False))
    stage = SessionArchiveStage(str(tmp_path / "s.fcs"), FailingSession(), manifest={}, fingerprint={})
    result = asyncio.run(asyncio.wait_for(Runtime(source, [stage]).run(handle_signals=False), 30))
    assert result.exit_code == 1
    (err,) = [e for e in result.errors if e.stage == "save_session"]
    assert "s.fcs: cannot save the session: OSError" in err.text and err.fatal
    assert list(tmp_path.iterdir()) == []  # no half-written archive


@needs_demo
def test_save_session_into_a_missing_folder_fails_before_work(tmp_path, capsys):
    target = tmp_path / "nope" / "s.fcs"
    assert main(["run", "--source", "demo", "--max-frames", "2", "--no-console", "--save-session", str(target)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "s.fcs: cannot write saved session output: no such directory" in line
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("path,why", [("missing.fcs", "not found"), ("bad.fcs", "not a framecast saved session"),
                                      ("empty", "is a directory, not a saved session (an .fcs file)"),
                                      ("runs", "is a directory, not a saved session (an .fcs file); it holds a.fcs and others")])
def test_bad_session_files_give_one_line(tmp_path, capsys, path, why):
    (tmp_path / "bad.fcs").write_bytes(b"not a zip")
    (tmp_path / "empty").mkdir()
    (tmp_path / "runs").mkdir()
    for name in ("b.fcs", "a.fcs"):
        (tmp_path / "runs" / name).write_bytes(b"")
    assert main(["ask", "--session", str(tmp_path / path), "what?"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and why in err[0]


# ---------------------------------------------------------------- which span an answer draws on


def _chapters():
    return [Chapter(text=f"t{k + 1}", index=k + 1, pts_start=10.0 * k, pts_end=10.0 * (k + 1)) for k in range(3)]


@pytest.mark.parametrize("q,span", [
    ("what do you see in chapter 2?", (10, 20)), ("what happens in the first chapter?", (0, 10)),
    ("how many shapes in chapter three?", (20, 30)), ("what was in the last chapter?", (20, 30)),
    ("what was there at 0:05?", (0, 10)), ("what did you see at 12 s?", (10, 20)),
    ("what happened between 0:05 and 0:15?", (5, 15)), ("what was there at the start?", (0, 10)),
    ("what is there at the end?", (20, 30)), ("what did you see at 0.25 min?", (10, 20)),
    ("how many shapes do you see?", None), ("what colour is the circle?", None),
])
def test_time_references(q, span):
    ref = time_reference(q, _chapters(), 30.0)
    assert (None if ref is None else (ref.start, ref.end)) == (None if span is None else tuple(map(float, span)))


def test_time_references_without_chapters_and_missing_chapters():
    ref = time_reference("what was there at 0:12?", [], 30.0)
    assert (ref.start, ref.end, ref.chapter) == (7.0, 17.0, None)
    with pytest.raises(UserError, match="question names chapter 4, but this session has 3 chapters"):
        time_reference("what is in chapter 4?", _chapters(), 30.0)
    with pytest.raises(UserError, match="has no chapters"):
        time_reference("what is in the first chapter?", [], 30.0)


@pytest.mark.parametrize("window,q,basis", [
    ([0.0, 30.0], "how many shapes?", "cache"), ([0.0, 30.0], "what is in chapter 3?", "cache"),
    ([0.0, 30.0], "what is in chapter 1?", "narration log"), ([14.0, 30.0], "what is in chapter 1?", "narration log"),
    ([14.0, 30.0], "what was there at 0:12?", "narration log"), ([14.0, 30.0], "what is in chapter 3?", "cache"),
])
def test_before_the_cache_window_means_the_narration_log(window, q, basis):
    archive = Archive(Path("x.fcs"), {"cache_window": window, "media_end": 30.0}, chapters=_chapters())
    got, start, end, chapter = plan(q, archive)
    assert got == basis
    from framecast.events import Answer
    line = where(Answer(text="", request_id="r", pts_start=start, pts_end=end, basis=got), archive, chapter)
    assert ("before the cache window" in line) == (basis == "narration log" and start < window[0])


@needs_demo
def test_small_cache_summary_and_log_cover_what_was_evicted(videos, tmp_path, capsys):
    """A cache too small for the whole file: early frames are evicted, yet the summary covers all
    three chapters and a question about chapter 1 is answered from the narration log."""
    cfg = load_config(None, {"source.uri": str(videos[0]), "source.fps": 1.0, "session.max_cache_tokens": 300,
                             "outputs.console": False, "outputs.session": str(tmp_path / "s.fcs")})
    result, stages = _run(cfg)
    assert result.exit_code == 0, result.errors
    a = read_archive(tmp_path / "s.fcs")
    assert a.manifest["cache_window"][0] > 10.0  # chapter 1 is gone from the cache
    assert a.summary is not None and a.summary.chapters == 3
    assert len(a.narrations) >= 12  # the log kept them all
    rc, out, err = ask_here(capsys, "--session", str(tmp_path / "s.fcs"), "what do you see in chapter 1?")
    assert rc == 0, err
    assert out.strip().splitlines()[-1].startswith("-- from the narration log, 0:00-0:10 (chapter 1 ")
    assert "before the cache window" in out


@needs_demo
def test_resume_continues_where_the_saved_run_ended(videos, tmp_path, capsys):
    a_fcs, b_fcs = str(tmp_path / "a.fcs"), str(tmp_path / "b.fcs")
    assert main(["run", "--source", str(videos[0]), "--fps", "1", "--end", "15", "--no-console",
                 "--save-session", a_fcs]) == 0
    assert main(["run", "--source", str(videos[0]), "--fps", "1", "--no-console", "--resume", a_fcs,
                 "--save-session", b_fcs, "--jsonl", str(tmp_path / "b.jsonl")]) == 0
    ev = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    narr = [e for e in ev if e["type"] == "narration"]
    assert narr and min(e["pts"] for e in narr) > 15.0  # continued, not started over
    b, a = read_archive(tmp_path / "b.fcs"), read_archive(tmp_path / "a.fcs")
    assert b.narrations[:len(a.narrations)] == a.narrations and len(b.narrations) > len(a.narrations)
    assert [c.index for c in b.chapters] == list(range(1, len(b.chapters) + 1))
    assert b.summary.pts_start == 0.0 and b.summary.pts_end == pytest.approx(30.0)
    capsys.readouterr()  # b.fcs reaches the end of the file: nothing left to continue
    assert main(["run", "--source", str(videos[0]), "--fps", "1", "--no-console", "--resume", b_fcs]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "b.fcs: the saved session already reaches the end of" in line and "nothing to continue" in line
    # going on from before where a.fcs ended would narrate 0:05-0:15 twice: refused in one line
    assert main(["run", "--source", str(videos[0]), "--fps", "1", "--start", "5", "--no-console",
                 "--resume", a_fcs]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("framecast: source.start = 5: the saved session") and "already reaches 15 s" in line


# ---------------------------------------------------------------- progress


def test_progress_bar_shows_speed_and_narrations():
    import io

    import numpy as np

    bar = ConsoleOutput(lines=False, progress=True, err=io.StringIO(), out=io.StringIO())

    async def feed():
        async for _ in bar.process(Status(state="running", duration=30.0)):
            pass
        for i in range(11):
            async for _ in bar.process(Frame(pixels=np.zeros((4, 4, 3), np.uint8), pts=float(i))):
                pass
        async for _ in bar.process(Narration(text="a red circle.", pts=10.0)):
            pass

    asyncio.run(feed())
    text = bar.bar_text()
    assert re.search(r" \d+(\.\d)?x 1 narration$", text) and "ETA" in text and "fps" in text


def test_console_lines_for_chapters_and_the_summary():
    import io

    out = io.StringIO()
    console = ConsoleOutput(lines=True, progress=False, out=out, err=io.StringIO())

    async def feed():
        for ev in (Chapter(text="A red circle", index=1, pts_start=0.0, pts_end=10.0),
                   Summary(text="The video shows a red circle.", pts_start=0.0, pts_end=10.0, chapters=1)):
            async for _ in console.process(ev):
                pass

    asyncio.run(feed())
    assert out.getvalue().splitlines() == ["== chapter 1 [0:00-0:10] A red circle",
                                           "== summary: The video shows a red circle."]


# ---------------------------------------------------------------- content (needs the trained demo model)


def _says(text: str, *words: str) -> bool:
    t = text.lower()
    return all(re.search(rf"\b{re.escape(w)}s?\b", t) for w in words)


@needs_demo
@CONTENT
def test_content_chapter_titles_name_each_scene(analysed):
    chapters = of_type(analysed["events"], "chapter")
    for ch, (shape, colour, _n) in zip(chapters, THREE_SCENES):
        assert _says(ch["text"], colour, shape), ch["text"]


@needs_demo
@CONTENT
def test_content_summary_names_what_each_scene_showed(analysed):
    (s,) = of_type(analysed["events"], "summary")
    for shape, colour, _n in THREE_SCENES:
        assert _says(s["text"], colour, shape), s["text"]


@needs_demo
@CONTENT
@pytest.mark.parametrize("k", [1, 2, 3])
def test_content_offline_answers_per_chapter(analysed, capsys, k):
    shape, colour, count = THREE_SCENES[k - 1]
    fcs = str(analysed["dir"] / "run.fcs")

    def ask(q: str) -> str:
        rc, out, err = ask_here(capsys, "--session", fcs, q, "--json")
        assert rc == 0, err
        return json.loads(out)["text"]

    assert _says(ask(f"what colour is the {shape} in chapter {k}?"), colour)
    assert _says(ask(f"what shape is the {colour} object in chapter {k}?"), shape)
    assert any(_says(ask(f"how many shapes do you see in chapter {k}?"), w) for w in NUMBER_WORDS[count])


# ---------------------------------------------------------------- the end is where reading stopped (QA 5)

@pytest.mark.parametrize("events,stopped_by,end", [
    ([Status(state="running", duration=10.0), 0, 1, 2, 3, Status(state="eof", pts=4.0)], "eos", 4.0),  # max_frames
    ([Status(state="running", duration=10.0), 0, 1, 2, 3, Status(state="eof", pts=9.98)], "eos", 10.0),  # read to end
    ([Status(state="running", duration=10.0), 0, 1, 2, 3], "eos", 10.0),  # no eof pts: the file's length
    ([Status(state="running", duration=10.0), 0, 1, 2, 3, Status(state="stopped")], "signal", 4.0),  # Ctrl-C
    ([Status(state="running", duration=10.0), 0, 1, 2], "fatal", 3.0),
    ([Status(state="running")], "eos", None),  # no frame: no end
])
def test_media_end_is_where_reading_stopped(events, stopped_by, end):
    from framecast.stages.media_end import MediaEnd

    m = MediaEnd()
    for ev in events:
        m.see(_frames({}, ev + 1)[-1] if isinstance(ev, int) else ev)
    assert m.end(stopped_by) == end


def test_chapters_and_summary_end_at_the_eof_pts_not_the_duration():
    from framecast.stages.summary import SummaryStage

    frames = _frames({2.0: True}, 4)
    items = [Status(state="running", duration=20.0), *frames, Status(state="eof", pts=4.0)]
    got = asyncio.run(_feed(ChapterStage(ChaptersConfig(cut_threshold=0, min_s=1.0)), items))
    assert got[-1].pts_end == 4.0
    stage = SummaryStage(None, None)  # no turns needed to follow the media span

    async def feed():
        for it in items:
            [e async for e in stage.process(it)]
    asyncio.run(feed())
    assert stage.media_end() == 4.0


@pytest.mark.parametrize("args,end", [(["--max-frames", "4"], 4.0), (["--max-frames", "7"], 7.0),
                                      (["--end", "5"], 5.0)])
def test_capture_only_chapters_end_where_reading_stopped(videos, tmp_path, args, end):
    assert main(["run", "--capture-only", "--source", str(videos[0]), "--fps", "1", "--no-console", *args,
                 "--jsonl", str(tmp_path / "o.jsonl"), "--chapters", str(tmp_path / "c.vtt")]) == 0
    ev = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    (ch,) = [e for e in ev if e["type"] == "chapter"]
    assert ch["pts_end"] == pytest.approx(end)
    (eof,) = [e for e in ev if e["type"] == "status" and e["state"] == "eof"]
    assert eof["pts"] == pytest.approx(end)


def test_demo_source_max_frames_ends_after_the_last_frame(tmp_path):
    assert main(["run", "--capture-only", "--source", "demo", "--max-frames", "3", "--fps", "2", "--no-console",
                 "--jsonl", str(tmp_path / "o.jsonl")]) == 0
    ev = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    (eof,) = [e for e in ev if e["type"] == "status" and e["state"] == "eof"]
    assert eof["pts"] == pytest.approx(1.5)


@needs_demo
def test_max_frames_session_ends_where_reading_stopped_and_resumes(videos, tmp_path, capsys):
    a_fcs = str(tmp_path / "a.fcs")
    assert main(["run", "--source", str(videos[0]), "--fps", "1", "--max-frames", "4", "--no-console",
                 "--save-session", a_fcs, "--chapters", str(tmp_path / "c.vtt")]) == 0
    a = read_archive(tmp_path / "a.fcs")
    assert a.manifest["media_end"] == pytest.approx(4.0) and a.manifest["cache_window"][1] == pytest.approx(4.0)
    assert a.chapters[-1].pts_end == pytest.approx(4.0)
    if a.summary is not None:
        assert a.summary.pts_end == pytest.approx(4.0)
    capsys.readouterr()
    assert main(["run", "--source", str(videos[0]), "--fps", "1", "--max-frames", "2", "--no-console",
                 "--resume", a_fcs, "--jsonl", str(tmp_path / "b.jsonl")]) == 0, capsys.readouterr().err
    ev = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    (eof,) = [e for e in ev if e["type"] == "status" and e["state"] == "eof"]
    assert eof["pts"] == pytest.approx(6.0)  # continued from 4 s, two more frames


# ---------------------------------------------------------------- times outside the session (QA 14)

@pytest.mark.parametrize("q,named", [
    ("what happened between 5:00 and 6:00?", "5:00-6:00"), ("what was there at 99 s?", "1:39"),
    ("what did you see at 0:45?", "0:45"), ("what was there at 2 min?", "2:00"),
])
def test_a_time_outside_the_session_is_refused(q, named):
    with pytest.raises(UserError, match=f"question names {named}, but this session covers 0:00-0:30"):
        time_reference(q, _chapters(), 30.0)
    with pytest.raises(UserError, match=f"question names {named}, but this session covers 0:00-0:30"):
        time_reference(q, [], 30.0)


def test_a_time_before_the_session_start_is_refused_and_spans_are_cut_to_the_session():
    with pytest.raises(UserError, match="question names 0:02, but this session covers 0:10-0:30"):
        time_reference("what was there at 0:02?", [], 30.0, media_start=10.0)
    ref = time_reference("what happened between 0:25 and 0:50?", [], 30.0)
    assert (ref.start, ref.end) == (25.0, 30.0)
    ref = time_reference("what was there at 0:30?", _chapters(), 30.0)  # the very end still counts
    assert ref.chapter.index == 3


@needs_demo
@pytest.mark.parametrize("q", ["what happened between 5:00 and 6:00?", "what was there at 99 s?"])
def test_ask_session_refuses_a_time_outside_it_with_one_line(tmp_path, capsys, q):
    fcs = tmp_path / "d.fcs"
    assert main(["run", "--source", "demo", "--max-frames", "3", "--fps", "1", "--no-console",
                 "--save-session", str(fcs)]) == 0
    rc, out, err = ask_here(capsys, "--session", str(fcs), q)
    assert rc == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert "question names" in line and "but this session covers 0:00-0:03" in line


# ---------------------------------------------------------------- summary.md without chapters (README)

def _narrs(n: int) -> list[Narration]:
    return [Narration(text=f"line {k}", pts=2.0 * k + 2, pts_start=2.0 * k, pts_end=2.0 * k + 2) for k in range(n)]


@pytest.mark.parametrize("n", [1, 3, 8])
def test_summary_file_without_chapters_lists_the_narrations(n):
    from framecast.stages.outputs.chapters import summary_markdown

    s = Summary(text="what happened", pts_start=0.0, pts_end=2.0 * n, chapters=0, narrations=n)
    md = summary_markdown(s, [], _narrs(n))
    assert "0 chapters" not in md and "chapters" not in md.split("\n## ")[0].splitlines()[-1]
    assert f"{n} narration{'' if n == 1 else 's'}" in md and "## Narrations" in md
    assert [ln for ln in md.splitlines() if ln.startswith("- [")] == [f"- [{clock(2.0 * k)}] line {k}"
                                                                        for k in range(n)]


def test_summary_file_with_chapters_keeps_its_figures_and_sections():
    from framecast.stages.outputs.chapters import summary_markdown

    chs = [Chapter(text="one", index=1, pts_start=0.0, pts_end=4.0)]
    s = Summary(text="x", pts_start=0.0, pts_end=4.0, chapters=1, narrations=2)
    md = summary_markdown(s, chs, _narrs(2))
    assert "*0:00-0:04, 1 chapter, 2 narrations*" in md and "## Chapters" in md and "## Narrations" not in md
    assert md.count("- [") == 2


def test_resume_checks_the_demo_source_with_its_own_seed():
    """A session saved from `--source demo --seed 3` resumes with --seed 3, is refused with
    --seed 5 or the default seed, and `ask --source demo` (no seed to give) takes the saved one."""
    from types import SimpleNamespace

    from framecast.config import SourceConfig
    from framecast.stages.session_file import check_source

    archive = SimpleNamespace(path="s.fcs", manifest={"source": fingerprint("demo", SourceConfig(seed=3))})
    assert check_source(archive, "demo", source_cfg=SourceConfig(seed=3)) is None
    for other in (SourceConfig(seed=5), SourceConfig()):
        with pytest.raises(UserError, match="seed differs"):
            check_source(archive, "demo", source_cfg=other)
    assert check_source(archive, "demo") is None
