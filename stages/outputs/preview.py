"""Live preview (`--preview`): a window with the newest frame, the narration as a fading subtitle,
the partial text while it is generated, the last answer and a heads-up line.

The window lives in a child process (`preview_window`: Qt draws only from a main thread, and a
toolkit that aborts must not take the run with it). This stage never waits for it: `process`
only keeps a reference to the newest frame; a sender task writes one message at a time to the
child's stdin and, while the child is still reading the previous one, newer frames replace the
waiting one (newest frame wins, like a live edge). So a slow window drops frames, never the
pipeline. `q`/Esc in the window stops the run exactly like Ctrl-C (SIGINT to this process: a
clean drain the first time, cancellation the second). No display: one line on stderr, and the
run goes on without a window.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import sys
from typing import IO, AsyncIterator, Mapping

import numpy as np

from framecast.events import Answer, Event, Frame, Metrics, Narration, NarrationDelta, Status
from framecast.runtime import Stage
from framecast.stages.outputs.state import StreamState, clock

#: frames larger than this are scaled down before they are sent to the window (pixels)
MAX_WIDTH, MAX_HEIGHT = 1280, 720
#: at exit, the window process gets this long to close before it is killed (s)
CLOSE_TIMEOUT_S = 3.0
WINDOW_MODULE = "framecast.stages.outputs.preview_window"
#: toolkits that need no X server (Qt platform plugins)
_NO_X_PLATFORMS = ("offscreen", "minimal", "vnc", "eglfs", "linuxfb", "wayland", "cocoa", "windows")


def display_problem(env: Mapping[str, str] | None = None) -> str | None:
    """Why no window can open here (one phrase), or None. On X11 systems this connects to the
    display's socket: Qt aborts the whole process on a display it cannot reach."""
    env = os.environ if env is None else env
    if sys.platform in ("darwin", "win32") or env.get("QT_QPA_PLATFORM", "").startswith(_NO_X_PLATFORMS):
        return None
    name = env.get("DISPLAY", "")
    if not name:
        return "no display (DISPLAY is not set)"
    host, _, rest = name.rpartition(":")
    number = rest.split(".")[0]
    if not number.isdigit():
        return f"DISPLAY={name!r} is not an X display name"
    try:
        if host in ("", "unix"):
            path = f"/tmp/.X11-unix/X{number}"
            last: OSError | None = None
            for address in (path, "\0" + path):  # the file socket, then Linux's abstract one
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(1.0)
                    try:
                        s.connect(address)
                        return None
                    except OSError as e:
                        last = e
            raise last or OSError("no socket")
        with socket.create_connection((host, 6000 + int(number)), timeout=1.0):
            return None
    except OSError as e:
        return f"cannot reach the X display {name} ({e.strerror or e})"


class PreviewOutput(Stage):
    """The preview window stage; passes every event through unchanged."""

    name = "preview"

    def __init__(self, *, title: str = "framecast", err: IO[str] | None = None,
                 python: str | None = None, max_width: int = MAX_WIDTH, max_height: int = MAX_HEIGHT):
        super().__init__()
        self.title, self.err, self.python = title, err or sys.stderr, python or sys.executable
        self.max_width, self.max_height = max_width, max_height
        self.state = StreamState()
        self.sent = 0  # messages written to the window (frames and state updates)
        self.window_open = False
        self._proc: asyncio.subprocess.Process | None = None
        self._frame: np.ndarray | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._stderr_tail: list[str] = []
        self._stderr_done = asyncio.Event()
        self._gone = False
        self._closing = False

    def _say(self, text: str) -> None:
        print(f"framecast: preview: {text}", file=self.err, flush=True)

    async def start(self) -> None:
        why = display_problem()
        if why:
            self._say(f"{why}; going on without a window")
            self._gone = True
            return
        try:
            self._proc = await asyncio.create_subprocess_exec(
                self.python, "-m", WINDOW_MODULE, self.title, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except OSError as e:
            self._say(f"cannot start the window process ({e.strerror or e}); going on without a window")
            self._gone = True
            return
        self._tasks = [asyncio.create_task(self._send_loop(), name="preview-send"),
                       asyncio.create_task(self._read_words(), name="preview-words"),
                       asyncio.create_task(self._read_stderr(), name="preview-stderr")]

    # -- events

    async def process(self, item: Event) -> AsyncIterator[Event]:
        self.state.update(item)
        if not self._gone:
            if isinstance(item, Frame):
                self.state.count_drops(self.handle)
                self._frame = item.pixels  # a reference: frames are never changed in place
                self._wake.set()
            elif isinstance(item, (Narration, NarrationDelta, Answer, Status, Metrics)):
                self._wake.set()
        yield item

    def message(self, frame: np.ndarray | None) -> bytes:
        """One protocol message (see `preview_window`): header + RGB bytes of `frame` if given."""
        s = self.state
        head: dict = {"w": 0, "h": 0, "hud": s.hud(), "partial": s.partial}
        if s.narration is not None:
            head.update(narration=f"[{clock(s.narration.pts)}] {s.narration.text}",
                        narration_id=s.narration.narration_id)
        if s.answer is not None:
            a = s.answer
            head.update(answer=f"Q: {a.question}  A: {f'error: {a.error}' if a.error else a.text}",
                        answer_id=a.request_id)
        payload = b""
        if frame is not None:
            frame = self._fit(frame)
            head["h"], head["w"] = int(frame.shape[0]), int(frame.shape[1])
            payload = np.ascontiguousarray(frame, dtype=np.uint8).tobytes()
        raw = json.dumps(head).encode()
        return struct.pack(">I", len(raw)) + raw + payload

    def _fit(self, frame: np.ndarray) -> np.ndarray:
        h, w = frame.shape[:2]
        scale = min(self.max_width / w, self.max_height / h, 1.0)
        if frame.ndim != 3 or frame.shape[2] != 3:
            frame = np.repeat(frame.reshape(h, w, 1)[:, :, :1], 3, axis=2)
        if scale < 1.0:
            import cv2

            frame = cv2.resize(frame, (max(1, round(w * scale)), max(1, round(h * scale))),
                               interpolation=cv2.INTER_AREA)
        return frame

    # -- the window process

    async def _send_loop(self) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        stdin = self._proc.stdin
        try:
            while not self._gone:
                await self._wake.wait()
                self._wake.clear()
                frame, self._frame = self._frame, None
                stdin.write(self.message(frame))
                self.sent += 1
                await stdin.drain()  # the child is reading; newer frames replace `_frame` meanwhile
        except (BrokenPipeError, ConnectionResetError):
            self._gone = True

    async def _read_words(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        async for raw in proc.stdout:
            word = raw.decode(errors="replace").strip()
            if word == "ready":
                self.window_open = True
            elif word == "quit":  # exactly what Ctrl-C does (the runtime's signal handler)
                os.kill(os.getpid(), signal.SIGINT)
            elif word == "closed":  # the user closed the window: the run goes on without it
                self._gone = True
        code = await proc.wait()
        self._gone = True
        with contextlib.suppress(asyncio.TimeoutError):  # its last words say why
            await asyncio.wait_for(self._stderr_done.wait(), timeout=1.0)
        if code == 0 or (self.window_open and self._closing):
            return  # a normal end (or our own kill at exit)
        what = "closed" if self.window_open else "could not open"
        self._say(f"the window {what} ({self._reason(code)}); going on without a window")

    async def _read_stderr(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stderr is not None
        async for raw in proc.stderr:  # drained always: a full pipe would stall the child
            line = raw.decode(errors="replace").strip()
            if line:
                self._stderr_tail = (self._stderr_tail + [line])[-20:]
        self._stderr_done.set()

    def _reason(self, code: int | None) -> str:
        for line in self._stderr_tail:
            if "could not connect" in line or "cannot open display" in line.lower():
                return line
        tail = [ln for ln in self._stderr_tail if not ln.startswith(("Traceback", "File "))]
        return tail[-1] if tail else f"exit status {code}"

    async def close(self) -> None:
        self._gone = self._closing = True
        proc, self._proc = self._proc, None
        send = self._tasks[0] if self._tasks else None
        if send is not None:
            send.cancel()
            await asyncio.gather(send, return_exceptions=True)
        if proc is not None:
            if proc.stdin is not None:
                with contextlib.suppress(Exception):
                    proc.stdin.close()  # EOF: the window closes and the child exits
            try:
                await asyncio.wait_for(proc.wait(), timeout=CLOSE_TIMEOUT_S)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for t in self._tasks[1:]:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(t, return_exceptions=True), timeout=1.0)
            t.cancel()
