"""Decode: feed encoded frames into the stream's StreamingSession, narrate by policy, answer
questions from the cached context.

Policies (`narration.policy`):
  interval  — a narration every `interval_s` media seconds;
  change    — a narration on the first encoded frame after a scene change;
  on_demand — no narration; only questions.
A `Question` (control lane, overtakes queued frames) is answered between frames from what the
cache already holds: no frame is re-encoded. The `Answer` carries the question's `request_id`.

Events out: `NarrationDelta` (partial text, if `partials`), `Narration`, `Answer`, each with
timings — `first_token_ms` (frame arrival, or question arrival, to first token),
`tokens_per_s`, `cache_tokens`. Frames pass through (outputs may show them).
"""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any, AsyncIterator

from framecast.config import NarrationConfig
from framecast.errors import FatalError, UserError
from framecast.events import Answer, Event, Frame, Narration, NarrationDelta, Question, SceneChange
from framecast.runtime import Stage
from framecast.engine.session import StreamingSession, TextDelta, TurnDone, greedy


def make_turn_sampler(cfg: NarrationConfig):
    """Greedy at temperature 0, else the engine's seeded sampler with the configured filters."""
    if cfg.temperature == 0 and not cfg.repetition_penalty:
        return greedy
    from framecast.engine.sampling import make_sampler

    return make_sampler(cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty, seed=0)


class DecodeStage(Stage):
    name = "decode"

    def __init__(self, session: StreamingSession, cfg: NarrationConfig | None = None, *,
                 stream_id: str = "default", state_file: str | None = None, name: str | None = None):
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
        self.frames_added = 0
        self.narrations = 0
        self.answers = 0
        self.turn_log: collections.deque = collections.deque(maxlen=256)  # (pts, trigger, text)

    async def start(self) -> None:
        if self.state_file is not None and self.state_file.is_file():
            try:  # continue the conversation where the last run stopped
                await self.session.load(self.state_file)
            except UserError as e:
                raise FatalError(f"session.state_file: {e}") from None
        try:
            await self.session.start()
        except UserError as e:  # e.g. a budget too small for the system prompt: stop the run
            raise FatalError(str(e)) from None

    async def close(self) -> None:
        if self.state_file is not None:
            await self.session.save(self.state_file)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # -- data --------------------------------------------------------------------------------

    async def process(self, item: Event) -> AsyncIterator[Event]:
        if isinstance(item, SceneChange):
            self._scene_changed = True
            yield item
            return
        if not isinstance(item, Frame):
            yield item
            return
        yield item
        if item.features is None:  # an earlier frame of a 3D group, or encoding failed
            return
        pts = item.pts if item.pts is not None else time.monotonic()
        self._last_frame_pts = item.pts
        if self._span_start_pts is None:
            self._span_start_pts = pts
        if item.changed:
            self._scene_changed = True
        trigger = self._trigger(pts)
        self.frames_added += 1
        if trigger is None:
            await self.session.add_frame(item.features, item.pts)
        else:
            # A narration is due on this frame: one prefill for the frame and the prompt.
            async for event in self._narrate(item, pts, trigger, features=item.features):
                yield event
        self.metrics.extra.update({"frames_added": self.frames_added, "narrations": self.narrations,
                                   "answers": self.answers, "cache_tokens": self.session.cache_tokens})

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

    async def _narrate(self, frame: Frame, pts: float, trigger: str, *,
                       features: Any = None) -> AsyncIterator[Event]:
        self._scene_changed = False
        self._last_narration_pts = pts
        start = Narration(text="", stream_id=self.stream_id)  # only for its fresh narration_id
        nid = start.narration_id
        first_token_wall: float | None = None
        done: TurnDone | None = None
        extra = {} if features is None else {"frame": features, "pts": frame.pts}
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
        assert done is not None
        span_start, self._span_start_pts = self._span_start_pts, pts
        self.turn_log.append((pts, trigger, done.text))
        if not done.text.strip():
            return  # the model had nothing to say: no empty subtitles
        self.narrations += 1
        first_ms = (first_token_wall - frame.wall_time) * 1e3 if first_token_wall else None
        yield Narration(
            text=done.text.strip(), narration_id=nid, stream_id=self.stream_id, seq=self._next_seq(),
            pts=pts, pts_start=span_start, pts_end=pts, trigger=trigger, first_token_ms=first_ms,
            tokens_per_s=done.tokens_per_s, tokens=done.tokens, cache_tokens=done.cache_tokens)

    # -- control -----------------------------------------------------------------------------

    async def on_control(self, msg: Event) -> AsyncIterator[Event]:
        if not isinstance(msg, Question):
            yield msg
            return
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

