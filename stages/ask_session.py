"""Ask a finished file: answer a question from a saved session (`.fcs`), without the video.

Where the answer comes from, and the time span it draws on (said with every answer):

- a question that names no time ("How many shapes are there?") is answered from the saved KV
  cache, exactly as the live stream would have answered it at its end (same model, settings
  and sampler: greedy gives the same words); it draws on the cache window, the frames the
  cache still holds;
- a question that names a time or a chapter ("at 0:05", "in chapter 2", "in the first
  chapter", "between 1:00 and 2:00", "at the start") is about that span. The frames in the cache
  carry no time stamps the model could read, so the cache can only speak for its newest part:
  a span that reaches the end of the cache window (and starts inside it) is answered from the
  cache; any earlier span, in particular one before the cache window, is answered from the
  narration log of that span, in a text-only turn (`QUESTION_FROM_LOG_PROMPT`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from framecast.engine.prompts import QUESTION_FROM_LOG_PROMPT
from framecast.engine.session import TurnDone
from framecast.engine.text_turns import LogLine, TextTurns, clock, dedupe, narration_lines, thin
from framecast.errors import UserError
from framecast.events import Answer, Chapter
from framecast.stages.chapters import belongs, midpoint
from framecast.stages.session_file import Archive

#: a span whose end is within this of the end of the cache window counts as reaching it (s)
END_TOL_S = 1.0
#: a single time outside any chapter (chapters off) stands for this much media around it (s)
AROUND_S = 5.0
LOG_PROMPT_TOKENS = 1536

_ORDINALS = {"first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7,
             "eighth": 8, "ninth": 9, "tenth": 10}
_NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
            "nine": 9, "ten": 10}
_CHAPTER_N = re.compile(r"\bchapter\s+(\d+|" + "|".join(_NUMBERS) + r")\b", re.I)
_NTH_CHAPTER = re.compile(r"\b(" + "|".join(_ORDINALS) + r"|last|final)\s+(?:chapter|part|scene)\b", re.I)
_CLOCK = r"(\d{1,2}:\d{2}(?::\d{2})?(?:\.\d+)?)"
_SECONDS = r"(\d+(?:\.\d+)?)\s*(s|secs?|seconds?|m|mins?|minutes?)\b"
_TIME = re.compile(rf"{_CLOCK}|{_SECONDS}", re.I)
_START = re.compile(r"\b(at|in) the (start|beginning)\b|\bat first\b", re.I)
_END = re.compile(r"\b(at|in) the end\b|\bat last\b|\bright now\b", re.I)


@dataclass(frozen=True)
class TimeRef:
    """The media span (s) a question is about, and the chapter it names or falls in."""

    start: float
    end: float
    chapter: Chapter | None = None


def _seconds(m: re.Match) -> float:
    if m.group(1):  # m:ss or h:mm:ss
        parts = [float(p) for p in m.group(1).split(":")]
        return sum(p * 60 ** (len(parts) - 1 - i) for i, p in enumerate(parts))
    value, unit = float(m.group(2)), m.group(3).lower()
    return value * 60 if unit.startswith("m") else value


def _chapter_at(t: float, chapters: Sequence[Chapter]) -> Chapter | None:
    for k, c in enumerate(chapters):
        if belongs(t, c.pts_start, c.pts_end, first=k == 0, last=k == len(chapters) - 1):
            return c
    return None


def time_reference(question: str, chapters: Sequence[Chapter], media_end: float | None, *,
                   media_start: float = 0.0) -> TimeRef | None:
    """The span a question names, or None. Chapters by number or ordinal; times as m:ss, h:mm:ss,
    `N s`/`N seconds`/`N min` (the chapter around it, else `AROUND_S` either side); two times =
    a span; `at the start` / `at the end`. A chapter the session does not have, or a time outside
    `media_start`..`media_end` (s, `END_TOL_S` either side): UserError."""
    end = media_end if media_end is not None else (chapters[-1].pts_end if chapters else None)
    m = _CHAPTER_N.search(question) or _NTH_CHAPTER.search(question)
    if m:
        word = m.group(1).lower()
        n = len(chapters) if word in ("last", "final") else int(_NUMBERS.get(word, _ORDINALS.get(word, 0)) or word)
        if not 1 <= n <= len(chapters):
            raise UserError(f"question names chapter {n if n else word}, but this session has "
                            f"{len(chapters) or 'no'} chapter{'' if len(chapters) == 1 else 's'}")
        c = chapters[n - 1]
        return TimeRef(c.pts_start, c.pts_end, c)
    times = [_seconds(x) for x in _TIME.finditer(question)]
    if times and end is not None:
        a, b = sorted(times[:2]) if len(times) >= 2 else (times[0], times[0])
        if a > end + END_TOL_S or b < media_start - END_TOL_S:
            named = clock(a) if a == b else f"{clock(a)}-{clock(b)}"
            raise UserError(f"question names {named}, but this session covers {clock(media_start)}-{clock(end)}")
    if len(times) >= 2:
        a, b = sorted(times[:2])
        if end is not None:  # a span reaching past the session: what the session has of it
            a, b = max(a, media_start), min(b, max(end, media_start))
        return TimeRef(a, b, _chapter_at(a, chapters))
    if len(times) == 1:
        c = _chapter_at(times[0], chapters)
        t = times[0]
        return TimeRef(c.pts_start, c.pts_end, c) if c else TimeRef(max(0.0, t - AROUND_S), t + AROUND_S)
    if _START.search(question):
        c = chapters[0] if chapters else None
        return TimeRef(c.pts_start, c.pts_end, c) if c else TimeRef(0.0, 0.0)
    if _END.search(question) and end is not None:
        c = chapters[-1] if chapters else None
        return TimeRef(c.pts_start, c.pts_end, c) if c else TimeRef(end, end)
    return None


def plan(question: str, archive: Archive) -> tuple[str, float | None, float | None, Chapter | None]:
    """(basis, span start, span end, chapter): `cache` or `narration log`, and what it draws on."""
    m = archive.manifest
    w0, w1 = (m.get("cache_window") or [None, None])[:2]
    starts = [archive.chapters[0].pts_start] if archive.chapters else []
    starts += [n.pts_start if n.pts_start is not None else n.pts for n in archive.narrations[:1]]
    starts += [w0] if w0 is not None else []
    starts = [t for t in starts if t is not None]
    ref = time_reference(question, archive.chapters, m.get("media_end"), media_start=min(starts, default=0.0))
    if ref is None:
        return "cache", w0, w1, None
    newest = w0 is not None and w1 is not None and ref.start >= w0 - 1e-3 and ref.end >= w1 - END_TOL_S
    return ("cache" if newest else "narration log"), ref.start, ref.end, ref.chapter


def where(ans: Answer, archive: Archive, chapter: Chapter | None = None) -> str:
    """One line saying what the answer draws on, e.g.
    `-- from the narration log, 0:00-0:10 (chapter 1 "..."; before the cache window 0:12-0:30)`."""
    w0, w1 = (archive.manifest.get("cache_window") or [None, None])[:2]
    span = f"{clock(ans.pts_start)}-{clock(ans.pts_end)}"
    notes = []
    if chapter is not None:
        notes.append(f'chapter {chapter.index} "{chapter.text}"')
    if ans.basis == "narration log" and w0 is not None and ans.pts_start is not None and ans.pts_start < w0:
        notes.append(f"before the cache window {clock(w0)}-{clock(w1)}")
    what = "the KV cache" if ans.basis == "cache" else "the narration log"
    return f"-- from {what}, {span}" + (f" ({'; '.join(notes)})" if notes else "")


async def answer_from_log(question: str, start: float, end: float, archive: Archive, turns: TextTurns,
                          *, max_tokens: int) -> TurnDone | None:
    """A text-only turn from the narrations of [start, end]; None when nothing was narrated there."""
    chapters = archive.chapters
    first = not chapters or start <= chapters[0].pts_start
    last = not chapters or end >= chapters[-1].pts_end
    hi = end if end > start else start + 1e-3
    lines = dedupe([LogLine(n.pts_start if n.pts_start is not None else (n.pts or 0.0), n.text)
                    for n in archive.narrations if belongs(midpoint(n), start, hi, first=first, last=last)])
    if not lines:
        return None

    def prompt(pick) -> str:
        return QUESTION_FROM_LOG_PROMPT.format(start=clock(start), end=clock(end),
                                               narrations=narration_lines(pick), question=question)

    return await turns.run(prompt(thin(lines, lambda p: turns.count(prompt(p)) <= LOG_PROMPT_TOKENS)),
                           max_tokens=max_tokens)


async def ask_archive(question: str, archive: Archive, session: Any, turns: TextTurns, *, sampler: Any,
                      max_tokens: int) -> tuple[Answer, Chapter | None]:
    """Answer `question` from a loaded saved session (`session` holds its cache)."""
    basis, start, end, chapter = plan(question, archive)
    stream = archive.manifest.get("stream_id", "default")
    if basis == "narration log":
        done = await answer_from_log(question, start, end, archive, turns, max_tokens=max_tokens)
        if done is None:
            return Answer(text=f"Nothing was narrated between {clock(start)} and {clock(end)}.",
                          request_id="offline", question=question, stream_id=stream, pts=end,
                          pts_start=start, pts_end=end, basis=basis), chapter
        return Answer(text=done.text, request_id="offline", question=question, stream_id=stream, pts=end,
                      pts_start=start, pts_end=end, basis=basis, tokens=done.tokens,
                      tokens_per_s=done.tokens_per_s), chapter
    done = None
    async for ev in session.ask(question, max_tokens=max_tokens, sampler=sampler):
        if isinstance(ev, TurnDone):
            done = ev
    return Answer(text=done.text.strip(), request_id="offline", question=question, stream_id=stream, pts=end,
                  pts_start=start, pts_end=end, basis=basis, tokens=done.tokens,
                  tokens_per_s=done.tokens_per_s, cache_tokens=done.cache_tokens), chapter
