"""JSONL: every event as one JSON line, flushed per event."""

from __future__ import annotations

from typing import IO, AsyncIterator

from framecast.events import (EndOfStream, Event, Frame, NarrationDelta, Question)
from framecast.runtime import Stage

from framecast.stages.outputs.files import open_for_writing


class JsonlOutput(Stage):
    """One event envelope per line (see README), flushed per line. Frames carry no pixels."""

    name = "jsonl"

    def __init__(self, path: str, *, frames: bool = False, partials: bool = False):
        super().__init__()
        self.path, self.frames, self.partials = path, frames, partials
        self._f: IO[str] | None = None

    async def start(self) -> None:
        self._f = open_for_writing(self.path, "JSONL", self.handle)

    def write(self, ev: Event) -> None:
        if self._f is None:
            return
        if isinstance(ev, Frame) and not self.frames:
            return
        if isinstance(ev, NarrationDelta) and not self.partials:
            return
        self._f.write(ev.to_json() + "\n")
        self._f.flush()
        self.metrics.extra["lines"] = self.metrics.extra.get("lines", 0) + 1

    async def process(self, item: Event) -> AsyncIterator[Event]:
        self.write(item)
        yield item

    async def on_control(self, msg: Event) -> AsyncIterator[Event]:
        if isinstance(msg, Question):  # the record shows what was asked, next to the answer
            self.write(msg)
        yield msg

    async def close(self) -> None:
        """The end marker, then close. Written here, not when the end of stream passes, so that it
        is there on every path (a fatal error at start, a cancelled drain) and says how the run
        really ended: `eos`, `signal` or `fatal`, matching the exit status (by now it is known)."""
        if self._f is not None:
            handle = self.handle
            self.write(EndOfStream(stream_id=handle.stream_id if handle else "default",
                                   text=handle.stopped_by if handle else "eos"))
            self._f.close()
            self._f = None


# ---------------------------------------------------------------- subtitles
