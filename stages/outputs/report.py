"""HTML report (`--report out.html`): one self-contained file to look at a run afterwards.

A video element with the narrations as a captions `<track>`, a timeline of chapters and
narrations with thumbnails (click one to jump there), the summary, the answers to questions
asked during the run, and a search box that filters the timeline. No network: CSS and JS are
inline, thumbnails and captions are data URIs, the video is referenced by a path relative to
the report (the annotated video when there is one, else the source file; live sources have
none). Chapters and the summary are shown when the run produces them (`chapter`, `summary`
events); events of other types are passed on untouched.

The file is rewritten atomically (a temporary file, then a rename) at most every
`write_interval_s` while the run goes on, and once more at the end, so an interrupted run still
leaves a complete report of what was produced.
"""

from __future__ import annotations

import base64
import collections
import html
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import AsyncIterator
from urllib.parse import quote

import numpy as np

from framecast.errors import FatalError
from framecast.events import Answer, Event, Frame, Narration, Status, plural
from framecast.runtime import Stage
from framecast.stages.outputs.files import keep_existing, open_for_writing
from framecast.stages.outputs.report_page import PAGE_SCRIPT, PAGE_STYLE
from framecast.stages.outputs.state import clock
from framecast.stages.outputs.subtitles import DEFAULT_LAST_CUE_S, cue_text, subtitle_time

THUMB_WIDTH = 160
THUMB_QUALITY = 70  # JPEG
#: recent frames kept (references, no copies) to pick a narration's thumbnail from: a narration
#: arrives right after the frame it was made at, so a few are enough
THUMB_RING = 4
DEFAULT_WRITE_INTERVAL_S = 10.0


def finite(t: object) -> float | None:
    """A media time the page can use: a finite number, else None (unknown)."""
    return float(t) if isinstance(t, (int, float)) and math.isfinite(t) else None


def thumbnail(pixels: np.ndarray, width: int = THUMB_WIDTH) -> np.ndarray:
    """RGB [H, W, 3] -> RGB [h, width, 3], aspect kept (never upscaled)."""
    import cv2

    h, w = pixels.shape[:2]
    if w <= width:
        return pixels.copy()
    return cv2.resize(pixels, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)


def jpeg_data_uri(rgb: np.ndarray, quality: int = THUMB_QUALITY) -> str:
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii") if ok else ""


def relative_url(target: str, report: str) -> str:
    """`target` as a URL relative to the folder of `report` (both file paths)."""
    rel = os.path.relpath(Path(target).resolve(), Path(report).resolve().parent)
    return quote(Path(rel).as_posix())


class ReportOutput(Stage):
    """Collects narrations, answers, chapters and the summary; writes the report."""

    name = "report"

    def __init__(self, path: str, *, video: str | None = None, video_has_captions: bool = False,
                 title: str = "framecast report", write_interval_s: float = DEFAULT_WRITE_INTERVAL_S):
        super().__init__()
        self.path, self.video, self.title = path, video, title
        self.video_has_captions = video_has_captions  # burned in: the track starts switched off
        self.write_interval_s = write_interval_s
        self.narrations: list[dict] = []
        self.answers: list[dict] = []
        self.chapters: list[dict] = []
        self.summary: str | None = None
        self.source_text = ""
        self.duration: float | None = None
        self.media_end: float | None = None  # where the input ended (the last cue lasts until then)
        self._ring: collections.deque[tuple[float | None, np.ndarray]] = collections.deque(maxlen=THUMB_RING)
        self._last_write = 0.0
        self._dirty = self._failed = False
        self.writes = 0

    async def start(self) -> None:
        open_for_writing(self.path, "HTML report", self.handle).close()  # a bad path fails now, with one line
        self.write()

    # -- events

    async def process(self, item: Event) -> AsyncIterator[Event]:
        kind = getattr(item, "type", "")
        if isinstance(item, Frame):
            self._ring.append((item.pts, item.pixels))  # frames are never changed in place
        elif isinstance(item, Narration) and item.text.strip():
            self.narrations.append({"pts": finite(item.pts), "start": finite(item.pts_start),
                                    "end": finite(item.pts_end), "text": item.text.strip(), "trigger": item.trigger,
                                    "thumb": self._thumb_at(item.pts)})
            self._dirty = True
        elif isinstance(item, Answer):
            self.answers.append({"pts": finite(item.pts), "question": item.question, "text": item.text,
                                 "error": item.error})
            self._dirty = True
        elif isinstance(item, Status):
            if item.state == "running" and item.text:
                self.source_text = item.text
            if item.state == "eof" and item.pts is not None and math.isfinite(item.pts):
                self.media_end = item.pts
            if item.duration is not None:
                self.duration = item.duration
        elif kind == "chapter":  # duck-typed: the chapter/summary stages may be absent
            self.chapters.append({"start": finite(getattr(item, "pts_start", None)),
                                  "end": finite(getattr(item, "pts_end", None)),
                                  "title": str(getattr(item, "text", "") or getattr(item, "title", ""))})
            self._dirty = True
        elif kind == "summary":
            self.summary = str(getattr(item, "text", ""))
            self._dirty = True
        if self._dirty and time.monotonic() - self._last_write >= self.write_interval_s:
            self.write()
        yield item

    def _thumb_at(self, pts: float | None) -> str:
        if not self._ring:
            return ""
        if pts is None:
            return jpeg_data_uri(thumbnail(self._ring[-1][1]))
        best = min(self._ring, key=lambda r: abs((r[0] if r[0] is not None else pts) - pts))
        return jpeg_data_uri(thumbnail(best[1]))

    async def on_end(self) -> AsyncIterator[Event]:
        self.write()
        return
        yield  # pragma: no cover

    async def close(self) -> None:
        if self._dirty:
            self.write()

    # -- the page

    def write(self) -> None:
        """Write the page atomically. Raises FatalError (one line) when it cannot be written
        (a full disk): an output that can no longer write ends the run. Before the first frame an
        earlier report stays as it was."""
        if self._failed or keep_existing(self.path, self.handle):
            return
        tmp = Path(f"{self.path}.tmp")
        try:
            tmp.write_text(self.render(), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as e:
            self._failed = True
            tmp.unlink(missing_ok=True)
            raise FatalError(f"{self.path}: cannot write HTML report output: {e.strerror or e}") from None
        self._last_write, self._dirty = time.monotonic(), False
        self.writes += 1

    def captions_vtt(self) -> str:
        """The narrations as WebVTT, cue rules as the subtitle outputs."""
        out = ["WEBVTT", ""]
        last = 0.0
        starts = []
        for n in self.narrations:  # finite and in order, as WebVTT requires
            last = max(last, next((t for t in (n["start"], n["pts"]) if t is not None and math.isfinite(t)), last))
            starts.append(last)
        for i, n in enumerate(self.narrations):
            start = starts[i]
            nxt_start = starts[i + 1] if i + 1 < len(starts) else None
            if nxt_start is not None and nxt_start > start:
                end = nxt_start
            else:
                ends = [t for t in (n["end"], self.media_end) if t is not None and math.isfinite(t) and t > start]
                end = max(ends) if ends else start + DEFAULT_LAST_CUE_S
            out += [f"{subtitle_time(start, decimal='.')} --> {subtitle_time(end, decimal='.')}",
                    cue_text(n["text"], vtt=True), ""]
        return "\n".join(out) + "\n"

    def render(self) -> str:
        e = html.escape
        made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        meta = [e(self.source_text) if self.source_text else "",
                plural(len(self.narrations), "narration"),
                plural(len(self.chapters), "chapter") if self.chapters else "",
                f"length {clock(self.duration)}" if self.duration else "", f"made {made}"]
        parts = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
                 f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
                 f"<title>{e(self.title)}</title><style>{PAGE_STYLE}</style></head><body>",
                 f"<header><h1>{e(self.title)}</h1>"
                 f"<p class=\"meta\">{' &middot; '.join(m for m in meta if m)}</p></header>",
                 "<main>", self._player()]
        if self.summary:
            parts.append(f"<section id=\"summary\"><h2>Summary</h2><p>{e(self.summary)}</p></section>")
        if self.answers:
            parts.append(self._answers())
        parts.append(self._timeline())
        parts.append(f"</main><script>{PAGE_SCRIPT}</script></body></html>\n")
        return "\n".join(parts)

    def _player(self) -> str:
        if not self.video:
            return "<section id=\"player\"><p class=\"novideo\">No video file for this source (live input): " \
                   "add <code>--annotate out.mp4</code> to keep one.</p></section>"
        track = base64.b64encode(self.captions_vtt().encode()).decode("ascii")
        default = "" if self.video_has_captions else " default"
        return (f"<section id=\"player\"><video id=\"video\" controls preload=\"metadata\" "
                f"src=\"{html.escape(relative_url(self.video, self.path))}\">"
                f"<track kind=\"captions\" label=\"Narration\" srclang=\"en\"{default} "
                f"src=\"data:text/vtt;base64,{track}\"></video></section>")

    def _answers(self) -> str:
        e = html.escape
        rows = []
        for a in self.answers:
            ans = f"<span class=\"error\">error: {e(a['error'])}</span>" if a["error"] else e(a["text"])
            rows.append(f"<div class=\"qa\" data-t=\"{a['pts'] if a['pts'] is not None else ''}\">"
                        f"<time>{clock(a['pts'])}</time><p class=\"q\">{e(a['question'] or '?')}</p>"
                        f"<p class=\"a\">{ans}</p></div>")
        return f"<section id=\"answers\"><h2>Questions asked</h2>{''.join(rows)}</section>"

    def _timeline(self) -> str:
        e = html.escape
        items: list[tuple[float, int, str]] = []  # (time, order: chapters before narrations, html)
        for i, c in enumerate(self.chapters, 1):
            start = c["start"] if c["start"] is not None else 0.0
            span = f"{clock(c['start'])}&ndash;{clock(c['end'])}"
            items.append((start, 0, f"<li class=\"chapter\" data-t=\"{start}\">"
                                    f"<h3><span class=\"n\">Chapter {i}</span> "
                                    f"<time>{span}</time> {e(c['title'])}</h3></li>"))
        for n in self.narrations:
            t = n["start"] if n["start"] is not None else (n["pts"] or 0.0)
            img = (f"<img alt=\"frame at {clock(n['pts'])}\" src=\"{n['thumb']}\">" if n["thumb"]
                   else "<div class=\"noimg\"></div>")
            span = f"{clock(t)}&ndash;{clock(n['pts'])}" if n["pts"] is not None and n["pts"] > t else clock(t)
            items.append((t, 1, f"<li class=\"narration\" data-t=\"{t}\">{img}<div><time>{span}</time>"
                                f"<p class=\"text\">{e(n['text'])}</p></div></li>"))
        items.sort(key=lambda x: (x[0], x[1]))
        body = "".join(h for _, _, h in items) or "<li class=\"empty\">Nothing was narrated.</li>"
        return ("<section id=\"timeline-section\"><h2>Timeline</h2>"
                "<div class=\"search\"><input id=\"search\" type=\"search\" placeholder=\"Search the narration\" "
                "autocomplete=\"off\"><span id=\"count\"></span></div>"
                f"<ol id=\"timeline\">{body}</ol></section>")
