"""The preview window itself: a child process that shows what `PreviewOutput` sends it.

Run as `python -m framecast.stages.outputs.preview_window TITLE`. A child process, because Qt
(OpenCV's window toolkit in the opencv-python wheel) draws only from a process's main thread,
which belongs to the asyncio loop in framecast, and because a toolkit that aborts (a display
that went away) must not take the run down with it.

Protocol, stdin (parent -> child): messages of a 4-byte big-endian header length, a JSON header
`{"w", "h", "hud", "narration", "narration_id", "partial", "answer", "answer_id"}` and, when
`w` > 0, `w*h*3` bytes of RGB pixels. EOF = close the window and exit. A reader thread keeps only
the newest message, so the window never falls behind. stdout (child -> parent), one word a line:
`ready` (window open), `quit` (q or Esc pressed), `closed` (the window was closed).
"""

from __future__ import annotations

import json
import struct
import sys
import threading
import time

import numpy as np

from framecast.stages.outputs.overlay import draw_band, draw_caption, font, font_px, wrap

#: the window redraws (and reads keys) this often at most (ms)
REFRESH_MS = 30
#: a narration stays fully visible this long, then fades out over FADE_S (s)
NARRATION_HOLD_S = 8.0
ANSWER_HOLD_S = 12.0
FADE_S = 2.0
#: frames narrower than this are scaled up so the text stays legible (pixels)
MIN_WIDTH = 640
#: how long the first window lives while Qt starts (see `main`) (ms)
STARTUP_MS = 300
QUIT_KEYS = {ord("q"), ord("Q"), 27}  # 27 = Esc

WHITE, CYAN, YELLOW, GREY = (255, 255, 255), (120, 230, 255), (255, 220, 90), (210, 210, 210)


def fade(age: float, hold: float) -> float:
    """1 while younger than `hold`, then down to 0 over `FADE_S` seconds."""
    return 1.0 if age <= hold else max(0.0, 1.0 - (age - hold) / FADE_S)


def compose(frame: np.ndarray, state: dict, *, narration_age: float, answer_age: float) -> np.ndarray:
    """The picture the window shows: frame (RGB [H, W, 3]) scaled to at least MIN_WIDTH, the
    heads-up line on top, the last answer under it, the narration as a subtitle at the bottom
    (fading), the partial text above it. Returns BGR for OpenCV."""
    import cv2

    h, w = frame.shape[:2]
    if w < MIN_WIDTH:
        scale = MIN_WIDTH / w
        frame = cv2.resize(frame, (MIN_WIDTH, max(1, round(h * scale))), interpolation=cv2.INTER_NEAREST)
    else:
        frame = frame.copy()
    h, w = frame.shape[:2]
    small, big = font_px(h, 0.028), font_px(h, 0.042)
    y = 0
    if state.get("hud"):
        hud = wrap(state["hud"], font(small), int(w * 0.96), max_lines=2)
        y = draw_band(frame, hud, bottom=False, size=small, colour=GREY)[1]
    if state.get("answer"):
        lines = wrap(state["answer"], font(small), int(w * 0.9), max_lines=3)
        draw_band(frame, lines, bottom=False, size=small, colour=YELLOW, offset=y,
                  alpha=fade(answer_age, ANSWER_HOLD_S))
    y0 = h  # top of the subtitle band: the partial text sits on it
    if state.get("narration"):
        top, bottom = draw_caption(frame, state["narration"], size=big,
                                   alpha=fade(narration_age, NARRATION_HOLD_S))
        if bottom:
            y0 = top
    if state.get("partial"):
        draw_caption(frame, state["partial"] + " \u2026", colour=CYAN, size=small, offset=h - y0, max_lines=2)
    return np.ascontiguousarray(frame[:, :, ::-1])


class _Reader(threading.Thread):
    """Reads stdin; keeps the newest state and the newest frame (older ones are dropped)."""

    def __init__(self, stream):
        super().__init__(daemon=True, name="preview-reader")
        self.stream, self.lock = stream, threading.Lock()
        self.state: dict | None = None
        self.frame: np.ndarray | None = None
        self.eof = False

    def _read(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.stream.read(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    def run(self) -> None:
        try:
            while True:
                (n,) = struct.unpack(">I", self._read(4))
                head = json.loads(self._read(n))
                frame = None
                if head.get("w"):
                    raw = self._read(head["w"] * head["h"] * 3)
                    frame = np.frombuffer(raw, np.uint8).reshape(head["h"], head["w"], 3)
                with self.lock:
                    self.state = head
                    if frame is not None:
                        self.frame = frame
        except (EOFError, ValueError, struct.error, OSError):
            pass
        self.eof = True

    def take(self) -> tuple[dict | None, np.ndarray | None]:
        with self.lock:
            state, frame, self.state, self.frame = self.state, self.frame, None, None
        return state, frame


def say(word: str) -> None:
    try:
        sys.stdout.write(word + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, OSError):
        pass


def main(argv: list[str]) -> int:
    import signal

    import cv2

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it closes our stdin
    title = argv[0] if argv else "framecast"
    flags = cv2.WINDOW_AUTOSIZE | cv2.WINDOW_GUI_NORMAL
    # Without a window manager (Xvfb, kiosks), Qt sometimes never paints the first window it
    # makes while it is still starting up: it stays black for good (about one try in three on
    # this 2-core VM with Qt alone; 0 in 40 with this throwaway window first).
    cv2.namedWindow(title, flags)
    cv2.imshow(title, np.zeros((MIN_WIDTH * 3 // 4, MIN_WIDTH, 3), np.uint8))
    cv2.waitKey(STARTUP_MS)
    cv2.destroyWindow(title)
    cv2.waitKey(50)
    cv2.namedWindow(title, flags)
    say("ready")
    reader = _Reader(sys.stdin.buffer)
    reader.start()
    state: dict = {}
    frame: np.ndarray | None = None
    narration_at = answer_at = time.monotonic()
    shown_once = seen_visible = False
    while not reader.eof:
        new_state, new_frame = reader.take()
        now = time.monotonic()
        if new_state is not None:
            if new_state.get("narration_id") != state.get("narration_id"):
                narration_at = now
            if new_state.get("answer_id") != state.get("answer_id"):
                answer_at = now
            state = new_state
        if new_frame is not None:
            frame = new_frame
        fading = any(0 < now - t - hold < FADE_S for t, hold in
                     ((narration_at, NARRATION_HOLD_S), (answer_at, ANSWER_HOLD_S)))
        if frame is not None and (new_state is not None or new_frame is not None or fading):
            cv2.imshow(title, compose(frame, state, narration_age=now - narration_at, answer_age=now - answer_at))
            shown_once = True
        key = cv2.waitKey(REFRESH_MS)
        if key != -1 and (key & 0xFF) in QUIT_KEYS:
            say("quit")
        if shown_once:
            # Closed by the user = it was visible and is not any more (a window that has not
            # been mapped yet, on a busy machine, is not visible either).
            visible = cv2.getWindowProperty(title, cv2.WND_PROP_VISIBLE) >= 1
            if visible:
                seen_visible = True
            elif seen_visible:
                say("closed")
                break
    cv2.destroyAllWindows()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
