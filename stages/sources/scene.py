"""A seeded synthetic scene generator: coloured shapes moving on a plain or textured background.

It is the `demo` source's picture maker and the ground truth for the demo model: every frame
comes with the list of objects it shows (shape, colour, size, position, motion) and the
appear/disappear events that happened on that frame, so a training script and accuracy tests
can compare what a model says with what is really there.

Determinism: a scene is a pure function of its parameters (seed, resolution, fps, ...). The
timeline (which object lives when, where it starts, how it moves) is planned lazily with one
seeded RNG, frame by frame; rendering is then a pure function of the timeline, so `frame(i)`
gives the same pixels whether frames are asked for in order or at random.

Objects never leave the frame while alive and their swept paths do not overlap those of the
objects alive at the same time, so the ground truth is always fully visible (no occlusion).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterator, Literal

import cv2
import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {  # RGB
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "gray": (120, 120, 120),
    "white": (235, 235, 235),
    "navy": (20, 30, 70),
}
SIZES: dict[str, float] = {"small": 0.12, "medium": 0.2, "large": 0.3}  # diameter / min(W, H)
MOTIONS = ("left", "right", "up", "down", "still")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}  # unit (dx, dy), y down

DEFAULT_SPEED = 0.12  # frame widths (or heights) per second
DEFAULT_LIFETIME_S = (2.0, 6.0)
DEFAULT_APPEAR_RATE = 0.4  # expected new objects per second while below max_objects
MIN_COLOUR_DISTANCE = 140.0  # RGB distance between an object's colour and the background
TEXTURE_AMPLITUDE = 14.0  # +- grey levels of the "lightly textured" background


@dataclass(frozen=True)
class SceneObject:
    """One object as seen on one frame. `x`, `y` = centre in [0, 1] of width/height."""

    id: int
    shape: str
    colour: str
    size: str
    motion: str
    x: float
    y: float
    bbox: tuple[int, int, int, int]  # pixels: x0, y0, x1, y1 (exclusive)

    def describe(self) -> str:
        """E.g. 'a small red circle moving left' / 'a large blue star standing still'."""
        how = "standing still" if self.motion == "still" else f"moving {self.motion}"
        return f"a {self.size} {self.colour} {self.shape} {how}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SceneEvent:
    """An object appeared or disappeared on frame `frame`."""

    kind: Literal["appear", "disappear"]
    frame: int
    object: SceneObject

    def describe(self) -> str:
        verb = "appears" if self.kind == "appear" else "disappears"
        o = self.object
        return f"a {o.size} {o.colour} {o.shape} {verb}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "frame": self.frame, "object": self.object.to_dict()}


@dataclass(frozen=True)
class FrameTruth:
    """Ground truth of frame `index`: what is visible and what changed on this frame."""

    index: int
    pts: float
    background: str
    textured: bool
    objects: tuple[SceneObject, ...]
    events: tuple[SceneEvent, ...]

    def caption(self) -> str:
        """One plain English sentence listing the visible objects (left to right)."""
        objs = sorted(self.objects, key=lambda o: (o.x, o.y))
        if not objs:
            return f"An empty {self.background} background."
        parts = [o.describe() for o in objs]
        text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return text[0].upper() + text[1:] + "."

    def to_dict(self) -> dict:
        return {"index": self.index, "pts": self.pts, "background": self.background,
                "textured": self.textured, "objects": [o.to_dict() for o in self.objects],
                "events": [e.to_dict() for e in self.events]}


@dataclass
class _Plan:
    """An object's whole life: where it starts and how it moves (normalised units per frame)."""

    id: int
    shape: str
    colour: str
    size: str
    motion: str
    first: int  # first frame it is visible
    last: int  # last frame it is visible (inclusive)
    x0: float
    y0: float
    dx: float
    dy: float
    swept: tuple[float, float, float, float] = field(default=(0, 0, 0, 0))  # normalised box of its path

    def position(self, i: int) -> tuple[float, float]:
        t = i - self.first
        return self.x0 + self.dx * t, self.y0 + self.dy * t


class SceneGenerator:
    """Seeded scene: `frame(i) -> (rgb uint8 [H, W, 3], FrameTruth)`; iterate with `frames(n)`."""

    def __init__(
        self,
        *,
        seed: int = 0,
        width: int = 448,
        height: int = 448,
        fps: float = 10.0,
        min_objects: int = 1,
        max_objects: int = 3,
        shapes: tuple[str, ...] = SHAPES,
        colours: tuple[str, ...] = tuple(COLOURS),
        sizes: tuple[str, ...] = tuple(SIZES),
        motions: tuple[str, ...] = MOTIONS,
        background: str | None = None,  # None = chosen by the seed
        textured: bool | None = None,  # None = chosen by the seed
        speed: float = DEFAULT_SPEED,
        lifetime_s: tuple[float, float] = DEFAULT_LIFETIME_S,
        appear_rate: float = DEFAULT_APPEAR_RATE,
        noise: float = 0.0,  # per-frame Gaussian sensor noise (std, grey levels)
        colour_jitter: float = 0.0,  # +- RGB levels: each object's and the background's own shade
    ):
        if not 0 <= min_objects <= max_objects or max_objects < 1:
            raise ValueError(f"need 0 <= min_objects <= max_objects, >= 1; got {min_objects}, {max_objects}")
        for name, chosen, known in (("shape", shapes, SHAPES), ("colour", colours, COLOURS),
                                    ("size", sizes, SIZES), ("motion", motions, MOTIONS)):
            bad = [c for c in chosen if c not in known] or ([] if chosen else ["(none)"])
            if bad:
                raise ValueError(f"unknown {name} {bad[0]!r}; choose from {', '.join(known)}")
        if background is not None and background not in BACKGROUNDS:
            raise ValueError(f"unknown background {background!r}; choose from {', '.join(BACKGROUNDS)}")
        self.seed, self.width, self.height, self.fps = seed, width, height, float(fps)
        self.min_objects, self.max_objects = min_objects, max_objects
        self.shapes, self.sizes, self.motions = tuple(shapes), tuple(sizes), tuple(motions)
        self.speed, self.lifetime_s, self.appear_rate, self.noise = speed, lifetime_s, appear_rate, noise
        self.colour_jitter = float(colour_jitter)
        self._rng = np.random.default_rng(seed)
        self.background = background or str(self._rng.choice(list(BACKGROUNDS)))
        self.textured = bool(self._rng.random() < 0.5) if textured is None else textured
        bg = np.array(BACKGROUNDS[self.background], np.float32)
        # Colours too close to the background would be invisible: never use them here.
        self.colours = tuple(c for c in colours if np.linalg.norm(np.array(COLOURS[c]) - bg) >= MIN_COLOUR_DISTANCE)
        if not self.colours:
            raise ValueError(f"no colour among {colours} is visible on a {self.background} background")
        self._canvas = self._make_background()
        self._plans: list[_Plan] = []
        self._planned_until = -1  # timeline is complete for frames <= this
        self._next_id = 0

    # ------------------------------------------------------------ timeline

    def _alive(self, i: int) -> list[_Plan]:
        return [p for p in self._plans if p.first <= i <= p.last]

    def _plan_until(self, i: int) -> None:
        while self._planned_until < i:
            f = self._planned_until + 1
            alive = self._alive(f)
            if f == 0:
                want = int(self._rng.integers(max(self.min_objects, 1), self.max_objects + 1))
            elif len(alive) < self.min_objects:
                want = self.min_objects - len(alive)
            elif len(alive) < self.max_objects and self._rng.random() < self.appear_rate / self.fps:
                want = 1
            else:
                want = 0
            for _ in range(want):
                plan = self._new_plan(f, self._alive(f))
                if plan is not None:
                    self._plans.append(plan)
            self._planned_until = f

    def _new_plan(self, first: int, alive: list[_Plan]) -> _Plan | None:
        rng = self._rng
        shape, colour = str(rng.choice(self.shapes)), str(rng.choice(self.colours))
        size, motion = str(rng.choice(self.sizes)), str(rng.choice(self.motions))
        # Half-extent of the object in normalised units, per axis (it is square in pixels).
        d = SIZES[size] * min(self.width, self.height)
        rx, ry = d / 2 / self.width + 0.01, d / 2 / self.height + 0.01
        life_s = float(rng.uniform(*self.lifetime_s))
        ux, uy = DIRECTIONS[motion]
        # Shorten the life so that the whole path stays inside the frame.
        room = (1 - 2 * rx) if ux else (1 - 2 * ry) if uy else 1.0
        travel = min(self.speed * life_s, room) if (ux or uy) else 0.0
        if ux or uy:
            life_s = travel / self.speed
        n_frames = max(1, int(round(life_s * self.fps)))
        step = travel / n_frames if n_frames > 1 else 0.0
        dx, dy = ux * step, uy * step
        span_x, span_y = abs(dx) * (n_frames - 1), abs(dy) * (n_frames - 1)
        for _ in range(30):  # rejection sampling of a start whose path crosses no live path
            lo_x, hi_x = rx, 1 - rx - span_x
            lo_y, hi_y = ry, 1 - ry - span_y
            if hi_x < lo_x or hi_y < lo_y:
                return None
            sx, sy = float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))
            x0 = sx + span_x if ux < 0 else sx
            y0 = sy + span_y if uy < 0 else sy
            swept = (sx - rx, sy - ry, sx + span_x + rx, sy + span_y + ry)
            if not any(_overlap(swept, p.swept) for p in alive):
                self._next_id += 1
                return _Plan(self._next_id, shape, colour, size, motion, first, first + n_frames - 1,
                             x0, y0, dx, dy, swept)
        return None

    # ------------------------------------------------------------ truth and pixels

    def truth(self, i: int) -> FrameTruth:
        """Ground truth of frame i (plans the timeline as far as needed)."""
        if i < 0:
            raise IndexError(f"frame index {i} < 0")
        self._plan_until(i + 1)  # the next frame decides which objects disappear after i
        objects = tuple(self._object_at(p, i) for p in self._alive(i))
        events = [SceneEvent("appear", i, self._object_at(p, i)) for p in self._plans if p.first == i]
        events += [SceneEvent("disappear", i, self._object_at(p, p.last)) for p in self._plans if p.last == i - 1]
        return FrameTruth(i, i / self.fps, self.background, self.textured, objects, tuple(events))

    def _object_at(self, p: _Plan, i: int) -> SceneObject:
        x, y = p.position(i)
        half = SIZES[p.size] * min(self.width, self.height) / 2
        cx, cy = x * self.width, y * self.height
        bbox = (int(round(cx - half)), int(round(cy - half)), int(round(cx + half)), int(round(cy + half)))
        return SceneObject(p.id, p.shape, p.colour, p.size, p.motion, round(x, 5), round(y, 5), bbox)

    def render(self, truth: FrameTruth) -> np.ndarray:
        img = self._canvas.copy()
        for o in truth.objects:
            draw_shape(img, o.shape, self._shade(COLOURS[o.colour], 13, o.id), (o.x * self.width, o.y * self.height),
                       SIZES[o.size] * min(self.width, self.height))
        if self.noise > 0:
            rng = np.random.default_rng((self.seed, truth.index))
            img = np.clip(img + rng.normal(0, self.noise, img.shape), 0, 255).astype(np.uint8)
        return img  # [H, W, 3] RGB uint8

    def _shade(self, rgb: tuple[int, int, int], *key: int) -> tuple[int, int, int]:
        """`rgb` moved by a seeded offset of up to +-colour_jitter (a stable shade per object)."""
        if self.colour_jitter <= 0:
            return rgb
        # Its own RNG stream: jitter never changes the timeline that the main RNG plans.
        off = np.random.default_rng((self.seed, *key)).uniform(-self.colour_jitter, self.colour_jitter, 3)
        return tuple(int(np.clip(c + d, 0, 255)) for c, d in zip(rgb, off))

    def frame(self, i: int) -> tuple[np.ndarray, FrameTruth]:
        t = self.truth(i)
        return self.render(t), t

    def frames(self, n: int | None = None, *, start: int = 0) -> Iterator[tuple[np.ndarray, FrameTruth]]:
        i = start
        while n is None or i < start + n:
            yield self.frame(i)
            i += 1

    def _make_background(self) -> np.ndarray:
        base = np.empty((self.height, self.width, 3), np.float32)
        base[:] = self._shade(BACKGROUNDS[self.background], 17)
        if self.textured:
            # Smooth blotches (upscaled coarse noise) plus fine grain, both static over time.
            rng = np.random.default_rng((self.seed, 7))
            coarse = rng.uniform(-1, 1, (max(2, self.height // 32), max(2, self.width // 32))).astype(np.float32)
            blotch = cv2.resize(coarse, (self.width, self.height), interpolation=cv2.INTER_CUBIC)
            grain = rng.uniform(-0.4, 0.4, (self.height, self.width)).astype(np.float32)
            base += (TEXTURE_AMPLITUDE * np.clip(blotch + grain, -1, 1))[..., None]
        return np.clip(base, 0, 255).astype(np.uint8)


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _star(cx: float, cy: float, r: float, points: int = 5) -> np.ndarray:
    ang = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    rad = np.where(np.arange(2 * points) % 2 == 0, r, r * 0.45)
    return np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)


def shape_polygon(shape: str, centre: tuple[float, float], diameter: float) -> np.ndarray | None:
    """Vertices [N, 2] (pixels) of a polygonal shape; None for a circle."""
    cx, cy = centre
    r = diameter / 2
    if shape == "circle":
        return None
    if shape == "square":
        s = r * 0.85  # same visual weight as the circle
        return np.array([[cx - s, cy - s], [cx + s, cy - s], [cx + s, cy + s], [cx - s, cy + s]])
    if shape == "triangle":
        return np.array([[cx, cy - r], [cx + r * 0.95, cy + r * 0.8], [cx - r * 0.95, cy + r * 0.8]])
    if shape == "diamond":
        return np.array([[cx, cy - r], [cx + r * 0.75, cy], [cx, cy + r], [cx - r * 0.75, cy]])
    if shape == "star":
        return _star(cx, cy, r)
    if shape == "cross":
        a, b = r, r * 0.35
        return np.array([[cx - b, cy - a], [cx + b, cy - a], [cx + b, cy - b], [cx + a, cy - b],
                         [cx + a, cy + b], [cx + b, cy + b], [cx + b, cy + a], [cx - b, cy + a],
                         [cx - b, cy + b], [cx - a, cy + b], [cx - a, cy - b], [cx - b, cy - b]])
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(img: np.ndarray, shape: str, rgb: tuple[int, int, int], centre: tuple[float, float],
               diameter: float) -> None:
    """Draw a filled, anti-aliased shape in place on an RGB uint8 image."""
    shift = 4  # sub-pixel positions: smooth motion even at low resolution
    scale = 1 << shift
    poly = shape_polygon(shape, centre, diameter)
    colour = tuple(int(c) for c in rgb)
    if poly is None:
        c = (int(round(centre[0] * scale)), int(round(centre[1] * scale)))
        cv2.circle(img, c, int(round(diameter / 2 * scale)), colour, -1, cv2.LINE_AA, shift)
    else:
        pts = np.round(poly * scale).astype(np.int32).reshape(-1, 1, 2)
        cv2.fillPoly(img, [pts], colour, cv2.LINE_AA, shift)
