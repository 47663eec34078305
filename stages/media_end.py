"""Where a run's media ends: the one rule the chapters, summary and saved-session stages share.

The end of a run is where reading stopped, not the length of the file: a run cut short by
`max_frames`, `source.end`, a signal or a fatal error ends one frame interval after its last
frame (or at the pts the source's `eof` status names). Only a file read to its very end
ends at its `duration`.
"""

from __future__ import annotations

from framecast.events import Event, Frame, Status


#: an eof this close to the file's duration (s) is the end of the file (container rounding)
END_SLACK_S = 0.05


class MediaEnd:
    """Follows Frame/Status events of one stream; `end(stopped_by)` gives the media end (s)."""

    def __init__(self) -> None:
        self.last_pts: float | None = None
        self.frame_dt: float | None = None  # media time between sampled frames (last seen)
        self.duration: float | None = None  # the file's length, from a status
        self.eof_pts: float | None = None  # where the source says the input ended
        self.limited = False  # the source stopped early (max_frames / source.end)

    def see(self, item: Event) -> None:
        if isinstance(item, Frame) and item.pts is not None:
            if self.last_pts is not None and item.pts > self.last_pts:
                self.frame_dt = item.pts - self.last_pts
            self.last_pts = item.pts
        elif isinstance(item, Status):
            if item.duration is not None:
                self.duration = item.duration
            if item.state == "eof" and item.pts is not None:
                self.eof_pts = item.pts

    def end(self, stopped_by: str = "eos") -> float | None:
        """Media seconds where the run ended, or None before the first frame."""
        if self.last_pts is None:
            return None
        if stopped_by == "eos" and self.eof_pts is not None and self.eof_pts >= self.last_pts:
            if self.duration is not None and self.eof_pts >= self.duration - END_SLACK_S:
                return self.duration  # read to the end: the file's own length
            return self.eof_pts
        after_last = self.last_pts + (self.frame_dt or 0.0)
        if (stopped_by == "eos" and self.eof_pts is None and self.duration is not None
                and self.duration >= self.last_pts):
            return self.duration
        return after_last
