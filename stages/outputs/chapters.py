"""Recorded-analysis files: a WebVTT chapters file (`--chapters`) and a Markdown summary (`--summary`).

The chapters file is what HTML5 players read as `<track kind="chapters">`: a `WEBVTT` header, then
one cue per chapter (a number, `HH:MM:SS.mmm --> HH:MM:SS.mmm`, the title), written and flushed
as each chapter is final. The summary file is written once the `Summary` event arrives (the end
of the input); a run stopped before that still gets its chapters and narrations in it at close.
"""

from __future__ import annotations

from typing import IO, AsyncIterator

from framecast.engine.text_turns import clock
from framecast.events import Chapter, Event, Narration, Summary, plural
from framecast.runtime import Stage
from framecast.stages.chapters import belongs, midpoint
from framecast.stages.outputs.files import open_for_writing
from framecast.stages.outputs.subtitles import cue_text, subtitle_time


class ChaptersVttOutput(Stage):
    """One WebVTT cue per `Chapter` event, flushed per cue."""

    name = "chapters_vtt"

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self._f: IO[str] | None = None
        self.cues = 0
        self._earlier: list[Chapter] = []

    def resume_from(self, archive) -> None:
        """Continue a saved session: its chapters are written first."""
        self._earlier = list(archive.chapters)

    async def start(self) -> None:
        self._f = open_for_writing(self.path, "chapters", self.handle)
        self._f.write("WEBVTT\n\n")
        self._f.flush()
        for ch in self._earlier:
            self._write(ch)

    async def process(self, item: Event) -> AsyncIterator[Event]:
        if isinstance(item, Chapter):
            self._write(item)
        yield item

    def _write(self, item: Chapter) -> None:
        if self._f is not None:
            self.cues += 1
            start, end = item.pts_start, max(item.pts_end, item.pts_start + 0.001)
            self._f.write(f"{item.index}\n{subtitle_time(start, decimal='.')} --> "
                          f"{subtitle_time(end, decimal='.')}\n{cue_text(item.text, vtt=True)}\n\n")
            self._f.flush()
            self.metrics.extra["cues"] = self.cues

    async def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def summary_markdown(summary: Summary | None, chapters: list[Chapter], narrations: list[Narration],
                     *, source: str = "", why_none: str = "nothing was narrated") -> str:
    """The summary file: the summary, a line of figures, then each chapter with its narrations
    (without chapters: the narrations in order)."""
    out = [f"# Summary{': ' + source if source else ''}", ""]
    if summary is not None:
        out += [summary.text.strip() or "(empty)", ""]
        facts = [f"{clock(summary.pts_start)}-{clock(summary.pts_end)}"]
        if summary.chapters:  # a run without chapters (live, chapters off) does not say "0 chapters"
            facts.append(plural(summary.chapters, "chapter"))
        facts.append(plural(summary.narrations, "narration"))
        if summary.levels > 1:
            facts.append(f"summarised in {summary.levels} levels")
        if summary.realtime:
            facts.append(f"processed at {summary.realtime:.1f}x real time")
        out += ["*" + ", ".join(facts) + "*", ""]
    else:
        out += [f"(no summary: {why_none})", ""]
    if chapters:
        out += ["## Chapters", ""]
    elif narrations:  # no chapters: the narrations themselves, in order
        out += ["## Narrations", ""]
        out += [f"- [{clock(n.pts_start if n.pts_start is not None else n.pts)}] {n.text.strip()}"
                for n in narrations]
        out.append("")
    for k, ch in enumerate(chapters):
        out += [f"### {ch.index}. [{clock(ch.pts_start)}-{clock(ch.pts_end)}] {ch.text}", ""]
        last = k == len(chapters) - 1
        for n in narrations:
            if belongs(midpoint(n), ch.pts_start, ch.pts_end, first=k == 0, last=last):
                out.append(f"- [{clock(n.pts_start if n.pts_start is not None else n.pts)}] {n.text.strip()}")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


class SummaryMarkdownOutput(Stage):
    """The Markdown summary file, written when the `Summary` arrives (or at close without one)."""

    name = "summary_md"

    def __init__(self, path: str, *, source: str = ""):
        super().__init__()
        self.path, self.source = path, source
        self._f: IO[str] | None = None
        self.chapters: list[Chapter] = []
        self.narrations: list[Narration] = []
        self.written = False

    def resume_from(self, archive) -> None:
        """Continue a saved session: its chapters and narrations are listed first."""
        self.chapters = list(archive.chapters)
        self.narrations = list(archive.narrations)

    async def start(self) -> None:
        self._f = open_for_writing(self.path, "summary", self.handle)  # a bad path fails before any work

    def _write(self, summary: Summary | None) -> None:
        if self._f is None or self.written:
            return
        ended = getattr(self.handle, "stopped_by", "eos")
        why = "nothing was narrated" if ended == "eos" else f"the run ended early ({ended})"
        self._f.write(summary_markdown(summary, self.chapters, self.narrations, source=self.source, why_none=why))
        self._f.flush()
        self.written = True

    async def process(self, item: Event) -> AsyncIterator[Event]:
        if isinstance(item, Chapter):
            self.chapters.append(item)
        elif isinstance(item, Narration) and item.text.strip():
            self.narrations.append(item)
        elif isinstance(item, Summary):
            self._write(item)
        yield item

    async def close(self) -> None:
        self._write(None)
        if self._f is not None:
            self._f.close()
            self._f = None
