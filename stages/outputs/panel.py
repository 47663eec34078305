"""The terminal view on `rich` (stdout is a terminal): event lines scroll above a live panel.

The panel shows the newest narration, the partial text while it is generated, the last answer,
a progress bar with ETA for recorded input, and the heads-up line (stream state, fps, drops,
first-token ms, cache tokens). rich redraws it from its own refresh thread (no MLX there), at
`REFRESH_PER_S`; the stage only updates `StreamState` and prints lines.
"""

from __future__ import annotations

import sys
import time
from typing import IO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from framecast.stages.outputs.state import StreamState, clock

REFRESH_PER_S = 8
#: the partial line shows at most this many characters (the newest ones)
PARTIAL_CHARS = 400


def eta_seconds(state: StreamState) -> float | None:
    """Wall seconds left for a recorded run, from the speed so far (None when unknown)."""
    frac = state.fraction
    if not frac:
        return None
    elapsed = time.monotonic() - state.started
    return elapsed * (1 - frac) / frac


class RichView:
    """Lines above, a live panel below, on one rich `Console` writing to `out`."""

    def __init__(self, state: StreamState, out: IO[str], *, progress: bool, title: str = "framecast",
                 width: int | None = None):
        self.state, self.progress, self.title = state, progress, title
        self.console = Console(file=out, force_terminal=True, width=width, highlight=False, soft_wrap=False)
        # On the process's own stdout, other prints (the CLI's error lines) go above the panel.
        mine = out is sys.stdout
        self.live = Live(console=self.console, get_renderable=self.render, refresh_per_second=REFRESH_PER_S,
                         transient=False, redirect_stdout=mine, redirect_stderr=mine)
        self._started = False

    def start(self) -> None:
        if not self._started:
            self.live.start()
            self._started = True

    def line(self, text: str, *, style: str = "") -> None:
        """A line that scrolls above the panel (narrations, answers, status)."""
        self.console.print(Text(text, style=style))

    def refresh(self) -> None:
        if self._started:
            self.live.refresh()

    def stop(self) -> None:
        if self._started:
            self._started = False
            self.live.stop()  # leaves the last panel on screen

    # -- the panel

    def render(self) -> RenderableType:
        s = self.state
        rows: list[RenderableType] = []
        if s.narration is not None:
            t = Text(f"[{clock(s.narration.pts)}] ", style="dim")
            t.append(s.narration.text, style="bold")
            rows.append(t)
        else:
            rows.append(Text("waiting for the first narration...", style="dim"))
        if s.partial:
            tail = s.partial.strip()[-PARTIAL_CHARS:]
            rows.append(Text("... " + tail + " \u258c", style="italic cyan"))
        if s.answer is not None:
            a = s.answer
            qa = Text("Q: ", style="bold magenta")
            qa.append(a.question or "?")
            qa.append("  A: ", style="bold magenta")
            qa.append(f"error: {a.error}" if a.error else a.text, style="red" if a.error else "")
            rows.append(qa)
        if self.progress and s.fraction is not None:
            rows.append(self._progress_row())
        rows.append(Text(self._hud(), style="dim"))
        sub = s.state_text or None
        return Panel(Group(*rows), title=f"[b]{self.title}[/b]", title_align="left", subtitle=sub,
                     subtitle_align="right", border_style="blue")

    def _hud(self) -> str:
        n = self.state.narrations
        return f"{self.state.hud()} | {n} narration{'' if n == 1 else 's'}"

    def _progress_row(self) -> RenderableType:
        s = self.state
        frac = s.fraction or 0.0
        grid = Table.grid(padding=(0, 1), expand=True)
        grid.add_column(ratio=1)
        grid.add_column(no_wrap=True)
        grid.add_row(ProgressBar(total=1.0, completed=frac),
                     Text(f"{frac * 100:3.0f}% {clock(s.pts)}/{clock(s.duration)} ETA {clock(eta_seconds(s))} "
                          f"{s.speed:.1f}x"))
        return grid
