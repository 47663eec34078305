"""A last stage for source tests: keeps every event it sees."""

from __future__ import annotations

from framecast.events import Event, Frame, Status
from framecast.runtime import Stage


class Collect(Stage):
    name = "collect"

    def __init__(self):
        super().__init__()
        self.seen: list[Event] = []

    async def process(self, item):
        self.seen.append(item)
        yield item

    def frames(self) -> list[Frame]:
        return [e for e in self.seen if isinstance(e, Frame)]

    def statuses(self) -> list[Status]:
        return [e for e in self.seen if isinstance(e, Status)]
