"""Summary: at the end of a recording, a few sentences about the whole video, from its chapters.

Hierarchical, from text the model wrote earlier (never from the frames, so it covers the whole
file however small the KV cache is): chapter titles were written from each chapter's
narrations (`framecast.stages.chapters`); the summary is then one text-only turn on
`SUMMARY_PROMPT` whose `{chapters}` lines carry each chapter's span, title and narrations. When
those lines do not fit `summary.prompt_tokens`, each chapter's narrations are thinned evenly
(repeats first); when even one narration per chapter is too much (a long video), consecutive
chapters are grouped, each group is summarised on the same prompt, and the summary is written
from the group summaries — as many levels as needed (`Summary.levels`).

Events in: `Narration`, `Chapter`, `Frame` (media span, speed), `Status` (duration).
Events out: one `Summary` at the end of the input (also after a signal: what was seen so far).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import AsyncIterator, Sequence

from framecast.config import SummaryConfig
from framecast.engine.prompts import SUMMARY_PROMPT
from framecast.engine.text_turns import ChapterLine, LogLine, TextTurns, chapter_lines, dedupe
from framecast.events import Chapter, Error, Event, Frame, Narration, Status, Summary
from framecast.stages.media_end import MediaEnd
from framecast.runtime import Stage
from framecast.stages.chapters import belongs, midpoint

GROUP_TITLE_CHARS = 80


@dataclass(frozen=True)
class Part:
    """A chapter (or, one level up, a group of chapters) with its narration lines."""

    start: float
    end: float
    title: str
    lines: tuple[str, ...]


def _evenly(lines: Sequence[str], k: int) -> list[str]:
    if k >= len(lines):
        return list(lines)
    if k <= 1:
        return [lines[0]] if lines else []
    return [lines[round(i * (len(lines) - 1) / (k - 1))] for i in range(k)]


def _prompt(parts: Sequence[Part], per_part: int) -> str:
    chapters = [ChapterLine(i + 1, p.start, p.end, p.title, " ".join(_evenly(p.lines, per_part)))
                for i, p in enumerate(parts)]
    return SUMMARY_PROMPT.format(chapters=chapter_lines(chapters))


def fit(parts: Sequence[Part], count, budget: int) -> str | None:
    """The summary prompt over `parts` with as many narrations per part as fit `budget` tokens
    (evenly thinned, first and last kept); None when one narration per part is already too many."""
    longest = max((len(p.lines) for p in parts), default=0)
    if count(_prompt(parts, longest)) <= budget:
        return _prompt(parts, longest)
    lo, hi, best = 1, longest - 1, None
    while lo <= hi:
        k = (lo + hi) // 2
        if count(_prompt(parts, k)) <= budget:
            best, lo = k, k + 1
        else:
            hi = k - 1
    return _prompt(parts, best) if best is not None else None


def group(parts: Sequence[Part], count, budget: int) -> list[list[Part]]:
    """Consecutive groups whose prompt fits; always fewer groups than parts (pairs at worst)."""
    groups: list[list[Part]] = [[]]
    for p in parts:
        if groups[-1] and fit([*groups[-1], p], count, budget) is None:
            groups.append([])
        groups[-1].append(p)
    if len(groups) >= len(parts):  # nothing fitted together: pair them up, thinned to the bone
        groups = [list(parts[i:i + 2]) for i in range(0, len(parts), 2)]
    return groups


async def summarize(parts: Sequence[Part], turns: TextTurns, *, max_tokens: int,
                    prompt_tokens: int) -> tuple[str, int]:
    """(summary text, levels). Level 1 = one turn over all chapters."""
    level = 1
    parts = list(parts)
    while True:
        prompt = fit(parts, turns.count, prompt_tokens)
        if prompt is not None or len(parts) == 1:
            if prompt is None:  # a single part whose one narration is too long: titles only
                prompt = _prompt([replace(parts[0], lines=())], 0)
            done = await turns.run(prompt, max_tokens=max_tokens)
            return done.text, level
        upper: list[Part] = []
        for g in group(parts, turns.count, prompt_tokens):
            sub = fit(g, turns.count, prompt_tokens) or _prompt([replace(p, lines=()) for p in g], 0)
            done = await turns.run(sub, max_tokens=max_tokens)
            title = ", ".join(dict.fromkeys(p.title for p in g if p.title))
            if len(title) > GROUP_TITLE_CHARS:
                title = title[:GROUP_TITLE_CHARS].rsplit(",", 1)[0]
            upper.append(Part(g[0].start, g[-1].end, title, (done.text,)))
        parts, level = upper, level + 1


def report(stage: Stage, text: str, *, fatal: bool) -> Error:
    """An error raised while the end of the input is being handled, as an event the CLI prints
    (one line) and, if fatal, a non-zero exit status."""
    err = Error(text=text, stage=stage.name, fatal=fatal, stream_id=getattr(stage, "stream_id", "default"))
    record = getattr(stage.handle, "report", None)
    if record is not None:
        record(err)
    return err


class SummaryStage(Stage):
    name = "summary"

    def __init__(self, cfg: SummaryConfig | None, turns: TextTurns, *, stream_id: str = "default"):
        super().__init__()
        self.cfg = cfg or SummaryConfig()
        self.turns = turns
        self.stream_id = stream_id
        self.log: list[tuple[float, LogLine]] = []  # (midpoint, line)
        self.chapters: list[Chapter] = []
        self._first: tuple[float, float] | None = None  # (pts, wall time) of the first frame
        self._end = MediaEnd()
        self.summary: Summary | None = None

    def resume_from(self, archive) -> None:
        """Continue a saved session: the summary covers its narrations and chapters too."""
        for n in archive.narrations:
            self._log(n)
        self.chapters = list(archive.chapters)

    def _log(self, n: Narration) -> None:
        start = n.pts_start if n.pts_start is not None else (n.pts or 0.0)
        self.log.append((midpoint(n), LogLine(start, n.text)))

    async def process(self, item: Event) -> AsyncIterator[Event]:
        if isinstance(item, Narration) and item.text.strip():
            self._log(item)
        elif isinstance(item, Chapter):
            self.chapters.append(item)
        elif isinstance(item, Frame) and item.pts is not None:
            if self._first is None:
                self._first = (item.pts, item.wall_time)
        if isinstance(item, (Frame, Status)):
            self._end.see(item)
        yield item

    def parts(self) -> list[Part]:
        """Chapters with their narrations (by midpoint); one part for the whole run without chapters."""
        spans = [(c.pts_start, c.pts_end, c.text) for c in self.chapters]
        if not spans and self.log:
            start = self._first[0] if self._first is not None else min(ln.pts for _, ln in self.log)
            spans = [(start, max(self.media_end(), start), "")]
        out = []
        for k, (start, end, title) in enumerate(spans):
            last = k == len(spans) - 1
            lines = [ln for m, ln in self.log if belongs(m, start, end, first=k == 0, last=last)]
            out.append(Part(start, end, title, tuple(ln.text.strip() for ln in dedupe(lines))))
        return out

    def media_end(self) -> float:
        end = self._end.end(getattr(self.handle, "stopped_by", "eos"))
        return end if end is not None else 0.0

    async def on_end(self) -> AsyncIterator[Event]:
        parts = self.parts()
        if not parts or not any(p.lines for p in parts):
            return  # nothing was narrated: no summary to write (never made up)
        try:
            text, levels = await summarize(parts, self.turns, max_tokens=self.cfg.max_tokens,
                                           prompt_tokens=self.cfg.prompt_tokens)
        except Exception as e:  # reported as one line; raising here would leave the end marker stuck
            yield report(self, f"summary failed: {type(e).__name__}: {e}", fatal=False)
            return
        realtime = None
        if self._first is not None:
            wall = time.time() - self._first[1]
            realtime = (self.media_end() - self._first[0]) / wall if wall > 0 else None
        self.summary = Summary(text=text, pts=parts[0].start, pts_start=parts[0].start, pts_end=parts[-1].end,
                               chapters=len(self.chapters), narrations=len(self.log), levels=levels,
                               realtime=realtime, stream_id=self.stream_id, seq=1)
        self.metrics.extra.update({"levels": levels, "text_turns": self.turns.turns})
        yield self.summary
