"""The bus's bounded outbox: messages wait here until the broker has acknowledged them.

When it is full the lowest priority goes first: partial narrations (PARTIAL), then
superseded periodic messages (PERIODIC: metrics, status), then the oldest finals (FINAL:
narrations, answers, events). Every eviction is counted by kind in `drops`.

A message with a `key` (a retained state topic: the stream status) replaces the one with the
same key still waiting: a retained topic only ever needs its latest state, so a broker that
comes up late gets each state once and in order, never a replay of every state since start.
Replacements are counted in `superseded`, not as drops (nothing was lost).
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field

from framecast.stages.mqtt.client import BusMessage

# Outbox priorities: lower is dropped first when full.
PARTIAL, PERIODIC, FINAL = 0, 1, 2


@dataclass(eq=False)  # identity, not value: two equal messages are still two messages
class Outgoing:
    msg: BusMessage
    kind: str  # partial | metrics | status | narration | event | answer
    priority: int
    key: str | None = None  # same key: the newer message replaces the waiting one
    created: float = field(default_factory=time.monotonic)

    def remaining_expiry(self, now: float) -> int | None:
        if self.msg.expiry_s is None:
            return None
        return int(self.msg.expiry_s - (now - self.created))


class Outbox:
    """Bounded FIFO; when full, evicts the oldest item of the lowest priority present.

    The item being published (`head()` until `done()`) is never evicted: it may already be
    on the wire, and counting it as dropped would be a lie.
    """

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._items: collections.deque[Outgoing] = collections.deque()
        self._count = [0, 0, 0]  # items per priority
        self._nonempty = asyncio.Event()
        self.drops: collections.Counter[str] = collections.Counter()
        self.discarded: collections.Counter[tuple[str, str]] = collections.Counter()  # (reason, kind)
        self.max_depth = 0
        self.superseded = 0
        self._inflight: Outgoing | None = None

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Outgoing) -> None:
        if item.key is not None:
            for old in self._items:
                if old.key == item.key and old is not self._inflight and self._remove(old):
                    self.superseded += 1
                    break  # at most one waits per key
        if len(self._items) >= self.maxsize:
            victim = self._victim()
            if victim is None or item.priority < victim.priority:
                self.drops[item.kind] += 1
                return
            self._remove(victim)
            self.drops[victim.kind] += 1
        self._items.append(item)
        self._count[item.priority] += 1
        self.max_depth = max(self.max_depth, len(self._items))
        self._nonempty.set()

    def _victim(self) -> Outgoing | None:
        busy = self._inflight
        for p in range(3):
            if self._count[p] - (busy is not None and busy.priority == p) > 0:
                return next(x for x in self._items if x.priority == p and x is not busy)
        return None

    def _remove(self, item: Outgoing) -> bool:
        try:
            self._items.remove(item)  # the head in the common case: O(1)
        except ValueError:
            return False
        self._count[item.priority] -= 1
        if not self._items:
            self._nonempty.clear()
        return True

    async def head(self) -> Outgoing:
        """The oldest item, left in place until `done` (so a failed publish is retried)."""
        while not self._items:
            await self._nonempty.wait()
        self._inflight = self._items[0]
        return self._inflight

    def done(self, item: Outgoing) -> None:
        self._inflight = None
        self._remove(item)

    def discard_all(self, reason: str) -> int:
        """Drop everything still waiting (counted under `reason`); returns how many."""
        items = list(self._items)
        for item in items:
            self.discard(item, reason)
        return len(items)

    def kinds(self) -> collections.Counter[str]:
        """What is waiting, by kind."""
        return collections.Counter(x.kind for x in self._items)

    def discard(self, item: Outgoing, reason: str) -> None:
        if item is self._inflight:
            self._inflight = None
        if self._remove(item):
            self.drops[reason] += 1
            self.discarded[reason, item.kind] += 1
