"""Annotated video: H.264 that PyAV decodes, caption pixels in the frames at the cue times (and
only there), a WebVTT beside it that says the same, frames waiting for their caption bounded."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from framecast.events import Event, Frame, Narration, Status
from framecast.runtime import Runtime
from framecast.stages.outputs import AnnotateOutput
from framecast.testing import ListSource
from visual_fixtures import GREY, caption_pixels, marked_frame, write_marked_video

REPO = Path(__file__).resolve().parent.parent


def decode(path: Path) -> list[tuple[float, np.ndarray]]:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264"
        return [(float(f.time), f.to_ndarray(format="rgb24")) for f in c.decode(s)]


def has_caption(img: np.ndarray) -> bool:
    h = img.shape[0]
    bright, dark = caption_pixels(img[int(h * 0.8):])
    return bright > 20 and dark > 0.4


def plain_bottom(img: np.ndarray) -> bool:
    h = img.shape[0]
    return float(np.abs(img[int(h * 0.8):].astype(int) - GREY).mean()) < 6


def grey_frames(n: int, fps: float = 10.0) -> list[Frame]:
    return [Frame(pixels=np.full((240, 320, 3), GREY, np.uint8), pts=i / fps) for i in range(n)]


def test_captions_burned_in_at_their_cue_times_and_vtt_beside(tmp_path):
    frames = grey_frames(40)  # 0.0 .. 3.9 s
    # Narrations arrive after the frames they describe, as the decode stage sends them.
    events: list[Event] = [Status(state="running", fps=10.0), *frames[:15],
                           Narration(text="A first caption.", pts=1.5, pts_start=1.0, pts_end=1.5), *frames[15:25],
                           Narration(text="A second --> caption <b>.", pts=2.5, pts_start=1.5, pts_end=2.5),
                           *frames[25:]]
    (tmp_path / "sub").mkdir()
    out = tmp_path / "sub" / "ann.mp4"
    stage = AnnotateOutput(str(out))
    res = asyncio.run(Runtime(ListSource(events), [stage]).run(handle_signals=False))
    assert res.exit_code == 0 and not res.errors
    decoded = decode(out)
    assert len(decoded) == 40 and decoded[0][1].shape == (240, 320, 3)
    for t, img in decoded:
        if 1.0 <= t < 2.5 - 1e-6:
            assert has_caption(img), t
        else:  # before the first cue, after the last one ends (its pts_end)
            assert plain_bottom(img), t
    # the two captions differ, so the text pixels differ between the cues
    a, b = dict(decoded)[1.2], dict(decoded)[2.0]
    assert np.abs(a[200:].astype(int) - b[200:].astype(int)).mean() > 1
    assert (tmp_path / "sub" / "ann.vtt").read_text() == (
        "WEBVTT\n\n"
        "00:00:01.000 --> 00:00:01.500\nA first caption.\n\n"
        "00:00:01.500 --> 00:00:02.500\nA second -&gt; caption &lt;b&gt;.\n\n")


def vtt_cues(path: Path) -> list[tuple[float, float, str]]:
    cues = []
    for block in path.read_text().split("\n\n")[1:]:
        if block.strip():
            times, text = block.split("\n", 1)
            start, end = (sum(float(x) * m for x, m in zip(t.split(":"), (3600, 60, 1))) for t in times.split(" --> "))
            cues.append((start, end, text))
    return cues


def test_frames_waiting_for_a_caption_are_bounded_and_the_vtt_says_what_was_burned(tmp_path):
    """With room for about two waiting frames, every frame is still written: frames that could
    not wait get the newest caption that has started (or none), so captions run late instead of
    memory growing; the WebVTT beside says exactly what was burned in."""
    frames = grey_frames(30)
    events: list[Event] = [*frames[:10], Narration(text="Early.", pts=1.0, pts_start=0.0, pts_end=1.0),
                           *frames[10:], Narration(text="Late.", pts=2.0, pts_start=1.0, pts_end=2.0)]
    out = tmp_path / "ann.mkv"
    stage = AnnotateOutput(str(out), max_pending_mb=0.5)  # two 320x240 frames
    asyncio.run(Runtime(ListSource(events), [stage]).run(handle_signals=False))
    decoded = decode(out)
    assert len(decoded) == 30 and stage.frames_written == 30
    assert not has_caption(decoded[0][1])  # written before any narration was known
    assert has_caption(dict(decoded)[1.5])  # late: "Early." still, rather than nothing
    cues = vtt_cues(tmp_path / "ann.vtt")
    assert cues and {c[2] for c in cues} <= {"Early.", "Late."}
    for t, img in decoded:
        assert has_caption(img) == any(s <= t < e for s, e, _ in cues), t


def test_frames_without_any_narration_and_odd_sizes(tmp_path):
    frames = [Frame(pixels=np.full((121, 163, 3), GREY, np.uint8), pts=i / 5) for i in range(6)]
    bigger = np.zeros((242, 326, 3), np.uint8)  # a camera that comes back at another size
    bigger[:, 163:] = 250
    frames.append(Frame(pixels=bigger, pts=1.2))
    out = tmp_path / "odd.mp4"
    runtime = Runtime(ListSource([*frames, Status(state="eof")]), [AnnotateOutput(str(out))])
    asyncio.run(runtime.run(handle_signals=False))
    decoded = decode(out)
    assert len(decoded) == 7 and decoded[0][1].shape == (120, 162, 3)  # H.264 4:2:0 wants even sides
    last = decoded[-1][1].astype(int)  # scaled to the first size, not cropped
    assert last[:, :70].mean() < 20 and last[:, 92:].mean() > 230
    assert (tmp_path / "odd.vtt").read_text() == "WEBVTT\n\n"


@pytest.mark.parametrize("name", ["out.gif", "out"])
def test_unsupported_container_is_one_line(tmp_path, name):
    res = asyncio.run(Runtime(ListSource([]), [AnnotateOutput(str(tmp_path / name))]).run(handle_signals=False))
    assert res.exit_code == 2 and "must be one of .mp4" in res.errors[0].text


def test_cli_annotate_and_report_with_the_demo_model(tmp_path):
    """End to end: real narrations of the embedded model on a real file; the report plays the
    annotated video (captions burned in, so its track starts off)."""
    write_marked_video(tmp_path / "clip.mp4", 40)
    (tmp_path / "site").mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "framecast", "run", "--source", "clip.mp4", "--interval", "1",
                        "--annotate", "ann.mp4", "--jsonl", "out.jsonl", "--report", "site/report.html"],
                       cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    narrations = [e for e in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())
                  if e["type"] == "narration"]
    assert narrations
    cues = vtt_cues(tmp_path / "ann.vtt")
    # one cue per change of caption, same words: the VTT says what was burned, and a narration
    # that repeats the one before it (a scene that stays the same) changes nothing on screen
    texts = [n["text"] for n in narrations]
    assert [c[2] for c in cues] == [t for i, t in enumerate(texts) if i == 0 or t != texts[i - 1]]
    decoded = decode(tmp_path / "ann.mp4")
    assert len(decoded) == 40
    for t, img in decoded:
        inside = any(s <= t < e for s, e, _ in cues)
        expected = marked_frame(round(t * 10))
        assert np.abs(img[:150].astype(int) - expected[:150]).mean() < 4  # the picture itself, above the caption
        assert has_caption(img) if inside else plain_bottom(img), t
    page = (tmp_path / "site" / "report.html").read_text()
    assert 'src="../ann.mp4"' in page and "<track" in page and " default " not in page
    assert page.count('<li class="narration"') == len(narrations)
