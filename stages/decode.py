"""Decode: feed encoded frames into the stream's StreamingSession, narrate by policy, answer
questions from the cached context.

Policies (`narration.policy`):
  interval  — a narration every `interval_s` media seconds;
  change    — a narration on the first encoded frame after a scene change;
  on_demand — no narration; only questions.
A `Question` (control lane, overtakes queued frames) is answered between frames from what the
cache already holds: no frame is re-encoded. The `Answer` carries the question's `request_id`.

End of input (`narrate_at_end`, recorded input): when the input ends by itself (an `eof`
status), the span after the last narration gets a closing narration (`trigger="end"`) from
its start to the end of the input (the eof status's pts), so subtitles cover every second of
a file, a clip shorter than `interval_s` included. Not after a stop (signal, fatal error).

Events out: `NarrationDelta` (partial text, if `partials`), `Narration`, `Answer`, each with
timings — `first_token_ms` (frame arrival, or question arrival, to first token),
`tokens_per_s`, `cache_tokens`. Frames pass through (outputs may show them).
"""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import AsyncIterator

from framecast.config import NarrationConfig
from framecast.errors import FatalError, UserError
from framecast.events import (Answer, Event, Frame, Narration, NarrationDelta, Question, QuestionRecord, SceneChange,
                              Status)
from framecast.runtime import Stage
from framecast.engine.sampling import Sampler, make_sampler
from framecast.engine.session import StreamingSession, TextDelta, TurnDone


def make_turn_sampler(cfg: NarrationConfig) -> Sampler:
    """Greedy at temperature 0, else seeded, with the configured filters (`engine.sampling`)."""
    if cfg.temperature == 0 and not cfg.repetition_penalty:
        return make_sampler(0.0)
    return make_sampler(cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty, seed=0)


class DecodeStage(Stage):
    name = "decode"
    answers_questions = True  # the bus rejects questions at once on a stream without one

    def __init__(self, session: StreamingSession, cfg: NarrationConfig | None = None, *,
                 stream_id: str = "default", state_file: str | None = None, narrate_at_end: bool = True,
                 name: str | None = None):
        super().__init__(name=name)
        self.session = session
        self.state_file = Path(state_file) if state_file else None
        self.cfg = cfg or NarrationConfig()
        self.stream_id = stream_id
        self.sampler = make_turn_sampler(self.cfg)
        self._seq = 0
        self._last_narration_pts: float | None = None
        self._span_start_pts: float | None = None
        self._scene_changed = False
        self._last_frame_pts: float | None = None  # what an answer refers to
        self.narrate_at_end = narrate_at_end
        self._last_frame_wall: float | None = None
        self._frames_since_narration = 0
        self._input_end: float | None = None  # set by an eof status: the input ended by itself
        self.frames_added = 0
        self.narrations = 0
        self.answers = 0
        self.turn_log: collections.deque = collections.deque(maxlen=256)  # (pts, trigger, text)
        self._state_unreadable = False
        self._refused = False  # the session refused a frame (a setting): later frames are not tried

    async def start(self) -> None:
        if self.state_file is not None and self.state_file.is_file():
            try:  # continue the conversation where the last run stopped
                await self.session.load(self.state_file)
            except Exception as e:  # not a saved cache (or another model's): bad input, and kept as it is
                self._state_unreadable = True
                text = str(e).splitlines()[0] if str(e) else type(e).__name__
                if not isinstance(e, UserError):
                    text = f"{self.state_file}: not a saved session cache ({text})"
                raise FatalError(f"session.state_file: {text}", exit_code=2) from None
        try:
            await self.session.start()
        except UserError as e:  # e.g. a budget too small for the system prompt: a setting, exit 2
            raise FatalError(str(e), exit_code=2) from None

    async def close(self) -> None:
        from framecast.stages.outputs.files import keep_existing

        if self.state_file is None or self._state_unreadable or keep_existing(self.state_file, self.handle):
            return  # a file it could not read, or a run that read no frame, leaves the file as it was
        await self.session.save(self.state_file)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # -- data --------------------------------------------------------------------------------

    async def process(self, item: Event) -> AsyncIterator[Event]:
        if isinstance(item, SceneChange):
            # The detector marks the frame too (`changed`), and its event follows the frame:
            # only a change ahead of the frames seen (a frame held in a 3D group) is news here.
            if self._last_frame_pts is None or (item.pts is not None and item.pts > self._last_frame_pts):
                self._scene_changed = True
            yield item
            return
        if isinstance(item, Status) and item.state == "eof":
            self._input_end = item.pts if item.pts is not None else self._last_frame_pts
        if not isinstance(item, Frame):
            yield item
            return
        yield item
        if item.changed:
            self._scene_changed = True
        if item.features is None or self._refused:  # an earlier frame of a 3D group, encoding failed,
            return  # or the session refused frames (the run is stopping with that one error)
        pts = item.pts if item.pts is not None else time.monotonic()
        trigger = self._trigger(pts)
        if trigger is None:
            try:
                await self.session.add_frame(item.features, item.pts)
            except UserError as e:
                self._refuse(e)
        self.frames_added += 1
        self._frames_since_narration += 1
        self._last_frame_pts = item.pts
        self._last_frame_wall = item.wall_time
        if self._span_start_pts is None:
            self._span_start_pts = pts
        if trigger is not None:
            # A narration is due on this frame: one prefill for the frame and the prompt.
            async for event in self._narrate(item.wall_time, pts, trigger,
                                             frame=(item.features, item.pts)):
                yield event
        self.metrics.extra.update({"frames_added": self.frames_added, "narrations": self.narrations,
                                   "answers": self.answers, "cache_tokens": self.session.cache_tokens})

    def _refuse(self, e: UserError) -> None:
        """The session refused a frame (a budget that cannot hold it and the turn): a setting, so
        every later frame would be refused alike. Stop the stream with that one line, exit 2."""
        if isinstance(e, FatalError):
            raise e
        self._refused = True
        raise FatalError(str(e), exit_code=2) from None

    def _trigger(self, pts: float) -> str | None:
        policy = self.cfg.policy
        if policy == "interval":
            if self._last_narration_pts is None:
                self._last_narration_pts = pts  # the first narration comes one interval in
                return None
            return "interval" if pts - self._last_narration_pts >= self.cfg.interval_s - 1e-9 else None
        if policy == "change" and self._scene_changed:
            return "change"
        return None

    async def on_end(self) -> AsyncIterator[Event]:
        # A closing narration for the last span, when the input ended by itself (eof status;
        # not after a signal or a fatal error) and frames came after the last narration. Here
        # rather than at the eof status: a 3D-group encoder flushes its last frames at the end.
        if (not self.narrate_at_end or self._input_end is None or self.cfg.policy == "on_demand"
                or not self._frames_since_narration or self._last_frame_pts is None):
            return
        if getattr(self.handle, "stopped_by", "eos") in ("signal", "stop"):  # a stop after the eof status
            return
        end = max(self._input_end, self._last_frame_pts)
        async for event in self._narrate(self._last_frame_wall, self._last_frame_pts, "end", pts_end=end):
            yield event
        self.metrics.extra.update({"narrations": self.narrations, "cache_tokens": self.session.cache_tokens})

    async def _narrate(self, arrived: float | None, pts: float, trigger: str, *,
                       pts_end: float | None = None, frame: tuple | None = None) -> AsyncIterator[Event]:
        """One narration turn about the span since the last one, up to `pts` (the frame that
        triggered it); `pts_end` (default `pts`) is where the span it describes ends.
        `arrived`: wall time the triggering frame arrived (first_token_ms counts from it).
        `frame`: (features, pts) of a frame not yet in the cache, prefilled with the prompt."""
        self._scene_changed = False
        self._frames_since_narration = 0
        self._last_narration_pts = pts
        start = Narration(text="", stream_id=self.stream_id)  # only for its fresh narration_id
        nid = start.narration_id
        first_token_wall: float | None = None
        done: TurnDone | None = None
        extra = {} if frame is None else {"frame": frame[0], "pts": frame[1]}
        try:
            async for ev in self.session.narrate(self.cfg.prompt, max_tokens=self.cfg.max_tokens,
                                                 sampler=self.sampler, **extra):
                if isinstance(ev, TextDelta):
                    if first_token_wall is None:
                        first_token_wall = time.time()
                    if self.cfg.partials:
                        yield NarrationDelta(text=ev.text, narration_id=nid, stream_id=self.stream_id,
                                             seq=self._next_seq(), pts=pts)
                else:
                    done = ev
        except UserError as e:  # the budget refused the turn: every later one would be refused too
            self._refuse(e)
        assert done is not None
        self.turn_log.append((pts, trigger, done.text))
        if not done.text.strip():
            # The model had nothing to say: no empty subtitle, and the span stays open, so the
            # next narration covers it (no second of the input goes without a cue).
            return
        span_start, self._span_start_pts = self._span_start_pts, pts
        self.narrations += 1
        first_ms = (first_token_wall - arrived) * 1e3 if first_token_wall and arrived else None
        yield Narration(
            text=done.text.strip(), narration_id=nid, stream_id=self.stream_id, seq=self._next_seq(),
            pts=pts, pts_start=span_start, pts_end=pts if pts_end is None else pts_end, trigger=trigger,
            first_token_ms=first_ms,
            tokens_per_s=done.tokens_per_s, tokens=done.tokens, cache_tokens=done.cache_tokens)

    # -- control -----------------------------------------------------------------------------

    async def on_control(self, msg: Event) -> AsyncIterator[Event]:
        if not isinstance(msg, Question):
            yield msg
            return
        # consumed here; outputs (JSONL, the bus) get a record of it, just before its answer
        yield QuestionRecord(text=msg.text, request_id=msg.request_id, stream_id=self.stream_id, seq=msg.seq, ts=msg.ts,
                             pts=msg.pts)
        arrived = msg.ts.timestamp()
        pts = msg.pts if msg.pts is not None else self._last_frame_pts
        text, first_ms, done = "", None, None
        try:
            async for ev in self.session.ask(msg.text, max_tokens=self.cfg.max_tokens, sampler=self.sampler):
                if isinstance(ev, TextDelta):
                    if first_ms is None:
                        first_ms = (time.time() - arrived) * 1e3
                    text += ev.text
                else:
                    done = ev
        except Exception as e:  # the asker always gets an answer, even a failed one
            yield Answer(text="", request_id=msg.request_id, question=msg.text, error=f"{type(e).__name__}: {e}",
                         stream_id=self.stream_id, seq=self._next_seq(), pts=pts)
            return
        self.answers += 1
        yield Answer(text=(done.text if done else text).strip(), request_id=msg.request_id, question=msg.text,
                     stream_id=self.stream_id, seq=self._next_seq(), pts=pts, first_token_ms=first_ms,
                     tokens_per_s=done.tokens_per_s if done else None, tokens=done.tokens if done else None,
                     cache_tokens=done.cache_tokens if done else None)

