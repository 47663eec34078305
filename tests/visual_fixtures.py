"""Real displays and browsers for the visual-output tests: an Xvfb server, screenshots of it, and
headless Chromium driven through the DevTools protocol (a small client over one websocket).

Nothing is mocked: the preview window is a real Qt window on a real X server, the report is
loaded by a real browser. `setup_tests.sh` installs Xvfb, xdotool and Chromium (Debian); tests
skip, saying which binary is missing, only where one is not installed.
`FRAMECAST_SCREENSHOT_DIR=docs` makes the tests keep their screenshots there (README pictures).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (scripts/setup_tests.sh installs it)")
    return path


def keep_screenshot(png: Path, name: str) -> None:
    """Copy a screenshot to $FRAMECAST_SCREENSHOT_DIR (if set) for the README."""
    dest = os.environ.get("FRAMECAST_SCREENSHOT_DIR")
    if dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, Path(dest) / name)


# ---------------------------------------------------------------- X display


@contextlib.contextmanager
def xvfb(width: int = 1024, height: int = 768) -> Iterator[str]:
    """A private X server; yields its DISPLAY name (e.g. ':517'). The number is drawn at random
    well above the usual ones (another X server, or one of a parallel test run, may hold the low
    numbers); `-displayfd` tells when the server accepts connections, and one real client
    connection (a screen grab) proves it before the test starts. `-noreset`: an X server with no
    client left resets itself, and a client connecting meanwhile (the window, after the grab or
    framecast's display probe) is refused; a desktop always has clients, a bare Xvfb does not."""
    import random

    exe = need("Xvfb")
    for _ in range(20):
        number = random.randrange(100, 30000)
        if not Path(f"/tmp/.X{number}-lock").exists() and not Path(f"/tmp/.X11-unix/X{number}").exists():
            break
    r, w = os.pipe()
    proc = subprocess.Popen([exe, f":{number}", "-displayfd", str(w), "-screen", "0", f"{width}x{height}x24",
                             "-nolisten", "tcp", "-noreset"], pass_fds=(w,), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.close(w)
    try:
        with os.fdopen(r) as f:
            ready = f.readline().strip()
        if ready != str(number):
            pytest.fail(f"Xvfb did not start on :{number}")
        display = f":{number}"
        deadline = time.monotonic() + 10
        while True:
            try:
                grab(display)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield display
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def grab(display: str) -> np.ndarray:
    """The whole screen of `display` as RGB uint8 [H, W, 3] (Pillow's X11 grabber, XCB)."""
    from PIL import ImageGrab, features

    if not features.check("xcb"):
        pytest.skip("this Pillow has no XCB support (cannot grab an X screen)")
    return np.asarray(ImageGrab.grab(xdisplay=display).convert("RGB"))


def save_png(rgb: np.ndarray, path: Path) -> Path:
    from PIL import Image

    Image.fromarray(rgb).save(path, optimize=True)
    return path


# ---------------------------------------------------------------- Chromium (DevTools protocol)


class Chromium:
    """Headless Chromium with a DevTools websocket to its first page."""

    def __init__(self, profile: Path, *, width: int = 1200, height: int = 900):
        exe = next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)
        if exe is None:
            pytest.skip("chromium is not installed (scripts/setup_tests.sh installs it)")
        from websockets.sync.client import connect

        profile.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
             "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
             f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.proc.kill()
                pytest.fail("chromium did not open its DevTools port")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            pages = [t for t in json.load(resp) if t.get("type") == "page"]
        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=10))
        self._id = 0
        self.events: list[dict] = []
        # headless windows lose some height to invisible browser chrome: fix the page's viewport
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, timeout: float = 20, **params: Any) -> dict:
        self._id += 1
        my = self._id
        self.ws.send(json.dumps({"id": my, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == my:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def open(self, url: str, timeout: float = 20) -> None:
        self.call("Page.enable")
        self.events.clear()
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            self.events.append(msg)

    def eval(self, expression: str) -> Any:
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression[:60]}...: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value or time.monotonic() > deadline:
                return value
            time.sleep(0.05)

    def screenshot(self, path: Path) -> np.ndarray:
        import base64
        import io

        from PIL import Image

        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        path.write_bytes(data)
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stack.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------- a video with known pixels

GREY = 128
MARKER_RGB = (40, 180, 60)  # a green block at a fixed place: finds the frame in a screenshot
MARKER_BOX = (20, 90, 80, 150)  # x0, y0, x1, y1 on a 320x240 frame


def marked_frame(i: int, width: int = 320, height: int = 240) -> np.ndarray:
    """Mid-grey, the green marker block, and a red square that moves right (something to narrate)."""
    img = np.full((height, width, 3), GREY, np.uint8)
    x0, y0, x1, y1 = MARKER_BOX
    img[y0:y1, x0:x1] = MARKER_RGB
    x = 100 + (i * 3) % (width - 140)
    img[40:80, x:x + 40] = (220, 40, 40)
    return img


def write_marked_video(path: Path, n: int = 40, *, fps: int = 10, width: int = 320, height: int = 240) -> Path:
    import av

    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.codec_context.options = {"preset": "ultrafast", "tune": "zerolatency"}
        for i in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(marked_frame(i, width, height), format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path


def find_marker(rgb: np.ndarray, tol: int = 40) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, y0, x1, y1) of the marker colour in a screenshot, or None."""
    close = np.all(np.abs(rgb.astype(np.int16) - np.array(MARKER_RGB, np.int16)) < tol, axis=2)
    ys, xs = np.nonzero(close)
    if len(xs) < 100:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def caption_pixels(band: np.ndarray) -> tuple[int, float]:
    """(bright text pixels, fraction of darkened pixels) of a region that should hold a caption
    drawn over mid-grey: text is near white, the band under it darker than the grey."""
    bright = int(np.all(band > 200, axis=2).sum())
    dark = float(np.all(band < GREY - 40, axis=2).mean())
    return bright, dark
