"""Text-only turns in a fresh context: chapter titles, summaries, answers from the narration log.

Recorded-video analysis asks the *same* model that narrated a stream to write from text it
produced earlier (the narration log), not from the frames: that works past the cache window,
because the log keeps every narration while the KV cache keeps only the last few minutes. Each
turn is a fresh conversation laid out exactly as the streaming session lays out its prefix,
without any image:

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n

The prompts are the fixed instructions of `framecast.engine.prompts` filled with the formats
below (the demo model is trained on exactly these). A second `StreamingSession` on the same
model and worker holds only the system prefix; `keep_generated=False` trims every turn away, so
each turn starts from the same fresh prefix and the stream's own cache is never touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from framecast.engine.session import StreamingSession, TurnDone


def clock(seconds: float | None) -> str:
    """Media time as the prompts write it: `m:ss`, or `h:mm:ss` from one hour on."""
    if seconds is None or not math.isfinite(seconds):
        return "-:--"
    s = max(0, int(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


@dataclass(frozen=True)
class LogLine:
    """One narration of the log: its media start (s) and text."""

    pts: float
    text: str


@dataclass(frozen=True)
class ChapterLine:
    """One chapter as the summary prompt sees it: index (from 1), span (s), title, narrations."""

    index: int
    start: float
    end: float
    title: str
    narrations: str


def narration_lines(lines: Iterable[LogLine]) -> str:
    """`[m:ss] text` per narration, one a line (the `{narrations}` placeholder)."""
    return "\n".join(f"[{clock(n.pts)}] {n.text.strip()}" for n in lines)


def chapter_lines(chapters: Iterable[ChapterLine]) -> str:
    """`N. [m:ss-m:ss] title: narrations joined by spaces`, one a line (the `{chapters}` placeholder)."""
    return "\n".join(f"{c.index}. [{clock(c.start)}-{clock(c.end)}] {c.title.strip()}: {c.narrations.strip()}"
                     for c in chapters)


def dedupe(lines: Sequence[LogLine]) -> list[LogLine]:
    """Drop a narration that repeats the one before it word for word (a still scene is narrated
    the same way many times; once is enough for a title or a summary)."""
    out: list[LogLine] = []
    for n in lines:
        if n.text.strip() and (not out or out[-1].text.strip() != n.text.strip()):
            out.append(n)
    return out


def thin(lines: Sequence[LogLine], fits: Callable[[Sequence[LogLine]], bool]) -> list[LogLine]:
    """The longest evenly spaced selection of `lines` (first and last always kept) that `fits`."""
    lines = list(lines)
    if fits(lines) or len(lines) <= 2:
        return lines
    lo, hi = 2, len(lines) - 1  # binary search on how many lines to keep
    best = [lines[0], lines[-1]]
    while lo <= hi:
        k = (lo + hi) // 2
        pick = [lines[round(i * (len(lines) - 1) / (k - 1))] for i in range(k)]
        if fits(pick):
            best, lo = pick, k + 1
        else:
            hi = k - 1
    return best


class TextTurns:
    """Fresh-context text-only turns on `model`, run on its worker (never in parallel with the
    stream's own frames and turns). `count(text)` gives the token length of a prompt. `sampler`:
    the engine's (None = greedy, the default: a title or a summary should not vary run to run)."""

    def __init__(self, model: Any, *, worker: Any = None, system_prompt: str | None = None,
                 sampler: Callable | None = None):
        self.model = model
        self.sampler = sampler
        self.session = StreamingSession(model, system_prompt=system_prompt, keep_generated=False,
                                        worker=worker)
        self.turns = 0

    def count(self, text: str) -> int:
        return len(self.model.tokenizer.encode(text))

    async def run(self, prompt: str, *, max_tokens: int) -> TurnDone:
        """One turn from the fresh prefix: `prompt` in, the model's reply (stripped) out."""
        done: TurnDone | None = None
        async for ev in self.session.narrate(prompt, max_tokens=max_tokens, sampler=self.sampler):
            if isinstance(ev, TurnDone):
                done = ev
        assert done is not None
        self.turns += 1
        done.text = done.text.strip()
        return done
