"""Outputs: JSONL (flushed per line, no pixels), SRT/WebVTT (Whisper conventions), the terminal view."""

from __future__ import annotations

import asyncio
import io
import json
import re
from typing import Literal

import numpy as np
import pytest

from framecast.config import OutputsConfig
from framecast.events import Answer, Event, Frame, Narration, NarrationDelta, SceneChange, Status
from framecast.runtime import Runtime, Stage
from framecast.stages.outputs import (AnnotateOutput, ConsoleOutput, JsonlOutput, PreviewOutput, ReportOutput,
                                      SubtitleOutput, cue_text, make_outputs, subtitle_time)
from framecast.stages.outputs.panel import RichView
from framecast.stages.outputs.state import StreamState
from framecast.testing import ListSource


def run(events, stages):
    return asyncio.run(Runtime(ListSource(events), stages).run(handle_signals=False))


def narr(text, start, end=None):
    return Narration(text=text, pts=start, pts_start=start, pts_end=end)


def test_subtitle_times():
    assert subtitle_time(0, decimal=",") == "00:00:00,000"
    assert subtitle_time(3725.5004, decimal=",") == "01:02:05,500"
    assert subtitle_time(59.9996, decimal=".") == "00:01:00.000"


def test_cue_text_escapes_arrow_blank_lines_and_vtt_markup():
    assert cue_text("a --> b", vtt=False) == "a -> b"
    assert cue_text(" x\n\n\ny ", vtt=False) == "x\ny"
    assert cue_text("<b> & -->", vtt=True) == "&lt;b&gt; &amp; -&gt;"


def test_srt_and_vtt_from_narrations(tmp_path):
    events = [Status(state="running"), narr("A red circle appears.", 0.0, 0.5), Frame(pixels=np.zeros((2, 2, 3), np.uint8)),
              narr("It moves --> left.", 2.5, 2.6), NarrationDelta(text="ignored"), narr("Gone.", 3661.25, 3663.0)]
    srt, vtt = tmp_path / "o.srt", tmp_path / "sub" / "o.vtt"
    vtt.parent.mkdir()  # outputs never create directories (issue 12)
    run(events, [SubtitleOutput(str(srt), fmt="srt"), SubtitleOutput(str(vtt), fmt="vtt")])
    assert srt.read_text() == (
        "1\n00:00:00,000 --> 00:00:02,500\nA red circle appears.\n\n"
        "2\n00:00:02,500 --> 01:01:01,250\nIt moves -> left.\n\n"
        "3\n01:01:01,250 --> 01:01:03,000\nGone.\n\n")
    assert vtt.read_text() == (
        "WEBVTT\n\n"
        "00:00:00.000 --> 00:00:02.500\nA red circle appears.\n\n"
        "00:00:02.500 --> 01:01:01.250\nIt moves -&gt; left.\n\n"
        "01:01:01.250 --> 01:01:03.000\nGone.\n\n")


def test_last_cue_without_end_gets_default_length_and_empty_run_is_valid(tmp_path):
    p = tmp_path / "a.srt"
    run([Narration(text="Only one.", pts=4.0)], [SubtitleOutput(str(p), fmt="srt")])
    assert p.read_text() == "1\n00:00:04,000 --> 00:00:06,000\nOnly one.\n\n"
    v = tmp_path / "e.vtt"
    run([], [SubtitleOutput(str(v), fmt="vtt")])
    assert v.read_text() == "WEBVTT\n\n"


def test_jsonl_one_envelope_per_line_flushed_as_it_goes(tmp_path):
    p = tmp_path / "out.jsonl"
    seen_on_disk: list[int] = []

    class Probe(ListSource):
        async def frames(self):
            for e in self.events:
                yield e
                await asyncio.sleep(0.01)
                seen_on_disk.append(len(p.read_text().splitlines()) if p.exists() else 0)

    events = [Status(state="running"), Frame(pixels=np.zeros((4, 4, 3), np.uint8), pts=0.0),
              SceneChange(score=0.5, pts=0.1), narr("Hi.", 0.2)]
    asyncio.run(Runtime(Probe(events), [JsonlOutput(str(p))]).run(handle_signals=False))
    assert seen_on_disk == [1, 1, 2, 3]  # written before the run ended; the frame is not written
    lines = [json.loads(line) for line in p.read_text().splitlines()]
    assert [d["type"] for d in lines] == ["status", "change", "narration", "eos"]
    for d in lines:
        assert {"v", "type", "stream_id", "seq", "ts", "pts"} <= d.keys() and "pixels" not in d
    assert lines[2]["text"] == "Hi." and lines[1]["text"].startswith("scene change")


def test_jsonl_frames_option_writes_frames_without_pixels(tmp_path):
    p = tmp_path / "f.jsonl"
    run([Frame(pixels=np.ones((4, 6, 3), np.uint8), pts=0.5, changed=True)], [JsonlOutput(str(p), frames=True)])
    d = json.loads(p.read_text().splitlines()[0])
    assert d["type"] == "frame" and d["width"] == 6 and "pixels" not in d and "features" not in d


def test_console_lines_and_forced_progress_bar_with_eta():
    out, err = io.StringIO(), io.StringIO()
    con = ConsoleOutput(lines=True, progress=True, out=out, err=err)
    events = [Status(state="running", text="x.mp4", duration=10.0)]
    events += [Frame(pixels=np.zeros((2, 2, 3), np.uint8), pts=i * 1.0) for i in range(6)]
    events += [narr("A blue star.", 5.0), Answer(text="yes", request_id="r", question="is it blue?")]
    run(events, [con])
    lines = out.getvalue().splitlines()
    assert lines == ["-- running: x.mp4", "[0:05] A blue star.", "Q: is it blue?", "A: yes"]
    bar = err.getvalue()
    assert "50%" in bar and "0:05/0:10" in bar and "ETA" in bar and bar.endswith("\n")


def test_make_outputs_honours_config(tmp_path):
    cfg = OutputsConfig(console=False, jsonl=str(tmp_path / "a.jsonl"), srt=str(tmp_path / "a.srt"), progress=False)
    names = [s.name for s in make_outputs(cfg, live=False)]
    assert names == ["jsonl", "srt"]
    names = [s.name for s in make_outputs(OutputsConfig(progress=None), live=True, err=io.StringIO())]
    assert names == ["console"]


def test_console_survives_a_closed_pipe():
    class Gone(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

    con = ConsoleOutput(lines=True, out=Gone(), err=io.StringIO())
    res = run([Status(state="running"), narr("x", 0.0), narr("y", 1.0)], [con])
    assert res.exit_code == 0 and not res.errors and not con.lines


# ---------------------------------------------------------------- issue 12: text and times that break subtitles

BREAKERS = [
    "arrow --> inside", "long arrow ---> inside", "longer ----> and --->> too", "-->",
    "a\n00:00:01,000 --> 00:00:02,000\nb",
    "blank\n\nline", "blank\n \t \nline with spaces", "\n\nleading and trailing blank lines\n\n",
    "cr\ronly", "crlf\r\nline", "unicode\u2028line\u2029paragraph", "vt\x0bff\x0cnel\x85fs\x1cgs\x1drs\x1e",
    "   leading and trailing whitespace   ", "\tindented\n  second  ", "nul\x00and\x07bell\x1b[31mescape",
    "1\n2", "", "   ", "\n\n\n", "<b>markup</b> & entities &amp;", "WEBVTT\nNOTE not a note",
]
LINE_BREAKS = set("\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
SRT_TIME = r"\d{2,}:\d{2}:\d{2},\d{3}"
VTT_TIME = r"\d{2,}:\d{2}:\d{2}\.\d{3}"


def parse_cues(text: str, fmt: str) -> list[tuple[float, float, list[str]]]:
    """A strict reader: blocks separated by one blank line; SRT `index`, `timing`, text lines;
    WebVTT a `WEBVTT` header, then `timing`, text lines. Fails on anything else."""
    import re

    assert not (set(text) & LINE_BREAKS) and text.endswith("\n\n")
    if fmt == "vtt":
        assert text.startswith("WEBVTT\n\n")
        text = text[len("WEBVTT\n\n"):]
    timing = re.compile(rf"^({SRT_TIME if fmt == 'srt' else VTT_TIME}) --> ({SRT_TIME if fmt == 'srt' else VTT_TIME})$")

    def sec(t: str) -> float:
        h, m, s = t.replace(",", ".").split(":")
        return int(h) * 3600 + int(m) * 60 + float(s)

    cues = []
    for k, block in enumerate(text[:-2].split("\n\n") if text else [], start=1):
        lines = block.split("\n")
        if fmt == "srt":
            assert lines.pop(0) == str(k), block
        m = timing.match(lines.pop(0))
        assert m, block
        assert lines and all(line and line == line.strip() and "-->" not in line for line in lines), block
        if fmt == "vtt":
            assert all("<" not in line and re.sub(r"&(amp|lt|gt);", "", line).count("&") == 0 for line in lines)
        cues.append((sec(m.group(1)), sec(m.group(2)), lines))
    return cues


def test_no_text_can_break_either_subtitle_format(tmp_path):
    events = [narr(text, float(i), float(i) + 0.5) for i, text in enumerate(BREAKERS)]
    srt, vtt = tmp_path / "x.srt", tmp_path / "x.vtt"
    run(events, [SubtitleOutput(str(srt), fmt="srt"), SubtitleOutput(str(vtt), fmt="vtt")])
    for path, fmt in ((srt, "srt"), (vtt, "vtt")):
        cues = parse_cues(path.read_text(encoding="utf-8"), fmt)
        # empty texts are skipped (no narration), everything else is one cue each
        kept = [t for t in BREAKERS if t.strip()]
        assert len(cues) == len(kept)
        assert [c[0] for c in cues] == [float(BREAKERS.index(t)) for t in kept]
    assert cue_text("long arrow ---> inside", vtt=False) == "long arrow -> inside"
    assert cue_text("a\r\nb\rc\u2028d\x85e", vtt=False) == "a\nb\nc\nd\ne"
    assert cue_text("  x  \n\n  y  ", vtt=False) == "x\ny"
    assert cue_text("\x00\x07", vtt=False) == "..."


def test_non_finite_and_negative_times_still_make_valid_ordered_cues(tmp_path):
    nan, inf = float("nan"), float("inf")
    events = [Narration(text="nan start", pts=nan, pts_start=nan, pts_end=nan),
              narr("negative", -5.0, -4.0), narr("fine", 2.0, 3.0),
              Narration(text="inf end", pts=4.0, pts_start=4.0, pts_end=inf),
              Narration(text="inf start", pts=inf, pts_start=-inf, pts_end=nan),
              Narration(text="nothing known", pts=None)]
    srt, vtt, jl = tmp_path / "t.srt", tmp_path / "t.vtt", tmp_path / "t.jsonl"
    run(events, [SubtitleOutput(str(srt), fmt="srt"), SubtitleOutput(str(vtt), fmt="vtt"), JsonlOutput(str(jl))])
    for path, fmt in ((srt, "srt"), (vtt, "vtt")):
        cues = parse_cues(path.read_text(), fmt)
        assert len(cues) == 6
        starts = [c[0] for c in cues]
        assert starts == sorted(starts) and all(0 <= s < e for s, e, _ in cues), cues
    for line in jl.read_text().splitlines():  # strict JSON: NaN/Infinity are not JSON, null is
        d = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
        assert d["type"] in ("narration", "eos")


def test_last_cue_lasts_until_the_end_of_input():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "e.srt"
        run([narr("Start.", 0.0, 2.0), Status(state="eof", pts=3.5)], [SubtitleOutput(str(p), fmt="srt")])
        assert p.read_text() == "1\n00:00:00,000 --> 00:00:03,500\nStart.\n\n"


def test_console_scene_changes_only_when_verbose():
    events = [Status(state="running"), SceneChange(score=0.5, pts=0.1, text="scene change (score 0.500)"),
              narr("A red circle.", 2.0)]
    quiet, loud = io.StringIO(), io.StringIO()
    run(events, [ConsoleOutput(out=quiet, err=io.StringIO())])
    run(events, [ConsoleOutput(verbose=True, out=loud, err=io.StringIO())])
    assert quiet.getvalue().splitlines() == ["-- running", "[0:02] A red circle."]
    assert loud.getvalue().splitlines() == ["-- running", "[0:00] scene change (score 0.500)", "[0:02] A red circle."]
    cfg = OutputsConfig(verbose=True, progress=False)
    assert [s.verbose for s in make_outputs(cfg, live=True) if s.name == "console"] == [True]


def test_verbose_flag_sets_the_config_key():
    from framecast.config import load_config
    from framecast.stages.cli import _run_overrides, build_parser

    for argv, want in ((["run", "--verbose"], True), (["run", "-v"], True), (["run"], False)):
        assert load_config(None, _run_overrides(build_parser().parse_args(argv))).outputs.verbose is want


# ---------------------------------------------------------------- issue 17: the rich terminal view, unknown events

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_console_on_a_terminal_is_a_rich_panel_with_progress_and_lines():
    out, err = Terminal(), io.StringIO()
    con = ConsoleOutput(lines=True, progress=True, out=out, err=err, width=100)
    assert con.view is not None  # a terminal: the rich view
    events = [Status(state="running", text="x.mp4", duration=10.0)]
    events += [Frame(pixels=np.zeros((2, 2, 3), np.uint8), pts=i * 1.0) for i in range(6)]
    events += [SceneChange(score=0.5, pts=5.0), NarrationDelta(text="A blue", narration_id="n1", pts=5.0),
               narr("A blue star.", 5.0), Answer(text="yes", request_id="r", question="is it blue?", pts=5.0,
                                                 cache_tokens=321)]
    run(events, [con])
    text = ANSI.sub("", out.getvalue())
    assert "-- running: x.mp4" in text and "[0:05] A blue star." in text
    assert "Q: is it blue?" in text and "A: yes" in text
    assert "scene change" not in text  # only with --verbose
    assert "\u256d\u2500 framecast" in text  # the panel's frame and title
    assert "100% 0:10/0:10 ETA" in text and "cache 321 tok" in text and "1 narration" in text
    assert err.getvalue() == ""  # no second progress bar on stderr


def test_rich_panel_shows_partial_text_answer_and_hud():
    from rich.console import Console

    state = StreamState()
    for ev in [Status(state="running", text="cam", duration=None), Frame(pixels=np.zeros((2, 2, 3), np.uint8), pts=3.0),
               narr("A red circle.", 2.0), NarrationDelta(text="Now a gre", narration_id="n2"),
               Answer(text="", error="busy", request_id="r", question="what?")]:
        state.update(ev)
    rec = Console(record=True, width=90, file=io.StringIO())
    rec.print(RichView(state, io.StringIO(), progress=True).render())
    text = rec.export_text()
    assert "[0:02] A red circle." in text and "Now a gre" in text and "error: busy" in text
    assert "running | 0:03" in text and "drops 0" in text
    assert "ETA" not in text  # a live source: no length, no progress bar

    class Handle:  # the stage's handle: frames dropped on the edges so far (no --metrics needed)
        def frames_dropped(self):
            return 7

    state.count_drops(Handle())
    state.count_drops(None)  # outside a run
    assert "drops 7" in state.hud()


class MysteryEvent(Event):
    type: Literal["mystery"] = "mystery"
    text: str = "from a stage added later"


class Sink(Stage):
    name = "sink"

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    async def process(self, item):
        self.seen.append(item.type)
        yield item


def test_every_output_passes_an_unknown_event_type_through(tmp_path, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("QT_QPA_PLATFORM", raising=False)
    err = io.StringIO()
    # (the annotated video is b.mp4: its WebVTT beside it must not be a.vtt, another output)
    stages = [JsonlOutput(str(tmp_path / "a.jsonl")), SubtitleOutput(str(tmp_path / "a.srt"), fmt="srt"),
              SubtitleOutput(str(tmp_path / "a.vtt"), fmt="vtt"), AnnotateOutput(str(tmp_path / "b.mp4")),
              ReportOutput(str(tmp_path / "a.html")), PreviewOutput(err=err),
              ConsoleOutput(out=io.StringIO(), err=io.StringIO()), ConsoleOutput(out=Terminal(), err=io.StringIO()),
              Sink()]
    frame = Frame(pixels=np.full((48, 64, 3), 90, np.uint8), pts=0.0)
    nan = float("nan")
    res = run([frame, MysteryEvent(pts=0.5), narr("Still fine.", 0.5, 1.0),
               Narration(text="No time known.", pts=nan, pts_start=nan, pts_end=float("inf")),
               Narration(text="Time beyond the end.", pts=float("inf"))], stages)
    assert res.exit_code == 0 and not res.errors
    assert stages[-1].seen == ["frame", "mystery", "narration", "narration", "narration"]
    assert '"type":"mystery"' in (tmp_path / "a.jsonl").read_text()
    assert "Still fine." in (tmp_path / "a.html").read_text() and "Still fine." in (tmp_path / "a.vtt").read_text()
    assert err.getvalue().startswith("framecast: preview: no display")


def test_several_streams_on_one_terminal_get_labelled_plain_lines():
    from framecast.stages.multi import LabelledWriter

    term = Terminal()
    con = ConsoleOutput(out=LabelledWriter(term, "door"), err=io.StringIO())
    assert con.view is None  # two live panels on one terminal would overwrite each other
    run([narr("A cat.", 1.0)], [con])
    assert term.getvalue() == "[door] [0:01] A cat.\n"
