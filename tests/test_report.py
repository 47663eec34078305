"""HTML report: one self-contained file (no network), opened in headless Chromium: the
screenshot is not blank and shows the timeline, the search box filters it (checked through the
DevTools protocol), the video plays from its relative path with the captions track loaded."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Literal

import numpy as np
import pytest

from framecast.events import Answer, Event, Frame, Narration, Status
from framecast.runtime import Runtime
from framecast.stages.outputs import ReportOutput
from framecast.testing import ListSource
from visual_fixtures import Chromium, keep_screenshot, marked_frame, write_marked_video

NARRATIONS = ["A red square enters from the left.", "The red square moves right across the grey floor.",
              "A green block stays still on the left.", "The red square leaves; only the green block is left."]


class ChapterEvent(Event):  # the shape of the chapter stage's events (duck-typed by the report)
    type: Literal["chapter"] = "chapter"
    text: str
    index: int = 1
    pts_start: float = 0.0
    pts_end: float = 0.0


class SummaryEvent(Event):
    type: Literal["summary"] = "summary"
    text: str


class MysteryEvent(Event):  # a type no output knows
    type: Literal["mystery"] = "mystery"
    text: str = "?"


def report_events() -> list[Event]:
    ev: list[Event] = [Status(state="running", text="clip.mp4: h264 320x240, 4.00 s", duration=4.0, fps=10.0)]
    for i in range(40):
        ev.append(Frame(pixels=marked_frame(i), pts=i / 10))
        if i % 10 == 9:
            k = i // 10
            ev.append(Narration(text=NARRATIONS[k], pts=(i + 1) / 10, pts_start=k * 1.0, pts_end=(i + 1) / 10))
        if i == 19:
            ev += [ChapterEvent(text="The square arrives", index=1, pts_start=0.0, pts_end=2.0),
                   Answer(text="red", request_id="r1", question="What colour is the square?", pts=2.0),
                   MysteryEvent()]
    ev += [ChapterEvent(text="The square goes", index=2, pts_start=2.0, pts_end=4.0),
           SummaryEvent(text="A red square crosses a grey floor past a green block."), Status(state="eof")]
    return ev


def test_report_is_one_self_contained_file(tmp_path):
    write_marked_video(tmp_path / "clip.mp4", 40)
    (tmp_path / "site").mkdir()
    out = tmp_path / "site" / "report.html"
    stage = ReportOutput(str(out), video=str(tmp_path / "clip.mp4"))
    res = asyncio.run(Runtime(ListSource(report_events()), [stage]).run(handle_signals=False))
    assert res.exit_code == 0 and not res.errors
    page = out.read_text()
    assert 'src="../clip.mp4"' in page  # relative to the report
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing from the network
    assert page.count('src="data:image/jpeg;base64,') == len(NARRATIONS)
    assert 'src="data:text/vtt;base64,' in page and "<script>" in page and "<style>" in page
    assert "Chapter 2" in page and "A red square crosses" in page and "What colour is the square?" in page
    assert not (tmp_path / "site" / "report.html.tmp").exists()


def test_report_in_headless_chromium_timeline_search_video_and_captions(tmp_path):
    write_marked_video(tmp_path / "clip.mp4", 40)
    out = tmp_path / "report.html"
    asyncio.run(Runtime(ListSource(report_events()), [ReportOutput(str(out), video=str(tmp_path / "clip.mp4"))])
                .run(handle_signals=False))
    browser = Chromium(tmp_path / "profile", width=1200, height=900)
    try:
        browser.open(out.as_uri())
        # the video plays from its relative path (its first picture is up before the screenshot)
        assert browser.wait_for("document.getElementById('video').readyState >= 2") is True
        assert abs(browser.eval("document.getElementById('video').duration") - 4.0) < 0.2
        png = tmp_path / "report.png"
        shot = browser.screenshot(png)
        # not blank: many colours, and the timeline drawn with its thumbnails and text
        assert shot.shape[0] > 500 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 200
        box = browser.eval("(() => { const r = document.getElementById('timeline').getBoundingClientRect();"
                           " return [r.left, r.top, r.width, r.height]; })()")
        assert box[2] > 200 and box[3] > 200 and box[1] < shot.shape[0]
        x, y, w, h = (int(v) for v in box)
        region = shot[y:min(y + h, shot.shape[0]), x:x + w]
        assert region.std() > 20  # thumbnails and text, not an empty box
        assert browser.eval("document.querySelectorAll('#timeline li.narration img').length") == 4
        assert browser.eval("document.querySelectorAll('#timeline li.chapter').length") == 2

        def search(q: str) -> tuple[int, str, int]:
            browser.eval(f"(() => {{ const s = document.getElementById('search'); s.value = {json.dumps(q)};"
                         " s.dispatchEvent(new Event('input')); })()")
            return (browser.eval("document.querySelectorAll('#timeline li.narration:not(.hidden)').length"),
                    browser.eval("document.getElementById('count').textContent"),
                    browser.eval("document.querySelectorAll('#timeline li.chapter:not(.hidden)').length"))

        assert search("green") == (2, "2 of 4", 1)  # both in chapter 2: chapter 1 hides
        assert search("ENTERS") == (1, "1 of 4", 1)  # case-insensitive
        assert search("purple") == (0, "0 of 4", 0)
        assert search("") == (4, "4 narrations", 2)
        # the narrations are a captions track that loads (a data: URI inside the file)
        assert browser.wait_for("(() => { const t = document.getElementById('video').textTracks[0];"
                                " return t.cues && t.cues.length; })()") == 4
        keep_screenshot(png, "report.png")
    finally:
        browser.close()


@pytest.mark.parametrize("flag, path, why", [
    ("--report", "nodir/report.html", "no such directory"),
    ("--annotate", "nodir/ann.mp4", "no such directory"),
    ("--annotate", "ann.gif", "must be one of .mp4"),
    ("--report", ".", "is a directory"),
])
def test_bad_visual_output_paths_are_one_line_and_create_nothing(tmp_path, monkeypatch, capsys, flag, path, why):
    from framecast.stages.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["run", "--source", "demo", "--max-frames", "2", "--capture-only", "--no-console", flag, path])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"framecast: {path}: ") and why in err
    assert list(tmp_path.iterdir()) == []


def test_report_on_disk_while_the_run_goes_on(tmp_path):
    """Rewritten atomically as narrations come (here at every one): a run killed midway still
    leaves a complete page with everything narrated so far."""
    out = tmp_path / "live.html"
    seen: list[int] = []

    class Probe(ListSource):
        async def frames(self):
            for e in self.events:
                yield e
                await asyncio.sleep(0.01)
                seen.append(out.read_text().count('<li class="narration"') if out.exists() else -1)

    events = [Frame(pixels=marked_frame(0), pts=0.0), Narration(text="One.", pts=0.0), Narration(text="Two.", pts=1.0)]
    asyncio.run(Runtime(Probe(events), [ReportOutput(str(out), write_interval_s=0)]).run(handle_signals=False))
    assert seen == [0, 1, 2]
    assert out.read_text().rstrip().endswith("</html>") and not list(tmp_path.glob("*.tmp"))
