"""Training and evaluation data for the embedded demo model.

A *stream* is a seeded `framecast.stages.sources.scene.SceneGenerator` scene rendered at one of several
resolutions and frame rates, from frame 0 or from a later frame (what the session's cache holds
after an eviction), passed through a lossy round trip so the model learns on compression
artefacts (`codec`: "av" = PyAV h264/mpeg4 in an in-memory MP4; "jpeg" = OpenCV JPEG per frame,
no PyAV needed, what the GPU machine uses; "none"), with a *turn schedule* on top: after some
frames the user asks for a narration or asks a question, and the assistant answers from the
ground truth.

The text comes from a small grammar with variety; `parse_narration` / `parse_answer` read
any sentence the grammar can produce back into attributes, which is how the accuracy
evaluation scores what the model says.

Narration semantics (what the model is trained to say): the objects that appeared or
disappeared since the previous narration, then how every other visible object moves, left
to right, at most `MAX_CLAUSES` clauses. Questions are about the last frame.

Text-only turns (no frames, a fresh conversation): the chapter title and summary instructions of
`framecast.engine.prompts`, answered from the narration text (`title_example`, `summary_example`).

Imports only numpy, cv2 (PyAV lazily, for codec "av") and `framecast.stages.sources.scene`.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field

import numpy as np

from framecast.stages.sources.scene import COLOURS, SHAPES, FrameTruth, SceneGenerator, SceneObject  # noqa: F401

MAX_CLAUSES = 3
NUMBER_WORDS = ("none", "one", "two", "three", "four", "five")
DIRECTION_PHRASES = {
    "left": ("to the left", "left"),
    "right": ("to the right", "right"),
    "up": ("up", "upward"),
    "down": ("down", "downward"),
}
MOVE_VERBS = ("moves", "is moving", "slides", "goes")
STILL_PHRASES = ("stays still", "is not moving", "does not move", "stays in place")
APPEAR_VERBS = ("appears", "shows up", "comes into view")
DISAPPEAR_VERBS = ("disappears", "vanishes", "is gone")
EMPTY_SENTENCES = ("nothing is there.", "the scene is empty.", "there is nothing to see.")

NARRATION_PROMPTS = (
    "Describe what happens now in one short sentence.",  # NarrationConfig.prompt default
    "Describe what happens now.",
    "What is happening?",
    "Narrate what you see.",
    "What happens in the video?",
)
SYSTEM_PROMPTS = (
    "You are a helpful assistant that watches a live video and describes it.",
    "You narrate a video stream. Answer briefly.",
    "You are a helpful assistant.",
)

# 3x3 zones of the frame, by (row, col)
GRID = 3  # the frame's 3 x 3 grid (`grid_cell`): ZONES name its cells; the resampler's queries hold one each
ZONES = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
ZONE_MARGIN = 0.04  # questions about position only where the object is this far from a zone edge

# data variety (per stream)
RESOLUTIONS = ((640, 480), (448, 448), (320, 240), (512, 288), (256, 256), (480, 360))
FPS_CHOICES = (5.0, 10.0, 10.0, 15.0)
SPEED_RANGE = (0.08, 0.3)  # frame sizes per second
CODECS = ("h264", "h264", "h264", "mpeg4", "mpeg4", "none")  # "none": raw renders, as the demo source


# ---------------------------------------------------------------- scenes through a codec


def jpeg_round_trip(frames: list[np.ndarray], *, quality: int = 60) -> list[np.ndarray]:
    """Each RGB frame through an OpenCV JPEG encode/decode (4:2:0 chroma, blocking, ringing):
    codec artefacts without PyAV. `quality` 0-100."""
    import cv2

    out = []
    for f in frames:
        ok, buf = cv2.imencode(".jpg", f[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        if not ok:
            raise RuntimeError("cv2.imencode failed on a frame")
        out.append(np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]))
    return out


def have_pyav() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def codec_round_trip(frames: list[np.ndarray], *, fps: float, codec: str = "h264",
                     quality: int = 28) -> list[np.ndarray]:
    """Encode RGB frames into an in-memory MP4 with PyAV and decode them back (yuv420p)."""
    import av

    buf = io.BytesIO()
    h, w = frames[0].shape[:2]
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264" if codec == "h264" else "mpeg4", rate=int(round(fps)))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.thread_count = 1  # data workers run in parallel processes
        if codec == "h264":
            stream.options = {"preset": "veryfast", "crf": str(quality)}
        else:  # mpeg4 part 2: a bit rate per pixel that goes down as `quality` goes up (crf-like)
            stream.bit_rate = int(w * h * fps * 0.4 * 2 ** ((20 - quality) / 6))
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    buf.seek(0)
    decoded = []
    with av.open(buf, mode="r") as inp:
        for frame in inp.decode(video=0):
            decoded.append(frame.to_ndarray(format="rgb24"))
    if len(decoded) != len(frames):
        raise RuntimeError(f"codec round trip returned {len(decoded)} frames for {len(frames)}")
    return decoded


@dataclass
class Stream:
    seed: int
    width: int
    height: int
    fps: float
    codec: str
    frames: list[np.ndarray]  # RGB uint8 [H, W, 3] after the codec round trip
    truths: list[FrameTruth]


def stream_params(seed: int) -> dict:
    """The per-stream variety, drawn from the seed alone."""
    rng = np.random.default_rng((seed, 11))
    w, h = RESOLUTIONS[int(rng.integers(len(RESOLUTIONS)))]
    return dict(width=w, height=h, fps=float(rng.choice(FPS_CHOICES)),
                speed=float(rng.uniform(*SPEED_RANGE)), codec=str(rng.choice(CODECS)),
                quality=int(rng.integers(20, 34)), max_objects=int(rng.choice([1, 2, 3, 3])),
                colour_jitter=float(rng.uniform(0, 30)))


CODEC_MODES = ("auto", "av", "jpeg", "none")


def make_stream(seed: int, n_frames: int, *, codec: bool | str = True, start: int = 0, **overrides) -> Stream:
    """Stream `seed` (variety from `stream_params`, or `overrides`), frames start..start+n-1.

    `codec`: "av" (PyAV h264/mpeg4, the stream's own choice), "jpeg" (OpenCV, per frame, the
    stream's quality mapped to JPEG quality), "none"/False, or "auto"/True (av when PyAV is
    installed, else jpeg). Streams whose drawn codec is "none" stay raw in every mode.
    """
    if codec is True:
        codec = "auto"
    if codec is False:
        codec = "none"
    if codec not in CODEC_MODES:
        raise ValueError(f"codec {codec!r}: choose from {', '.join(CODEC_MODES)}")
    if codec == "auto":
        codec = "av" if have_pyav() else "jpeg"
    p = {**stream_params(seed), **overrides}
    gen = SceneGenerator(seed=seed, width=p["width"], height=p["height"], fps=p["fps"],
                         speed=p["speed"], max_objects=p["max_objects"], colour_jitter=p["colour_jitter"])
    frames, truths = [], []
    for img, t in gen.frames(n_frames, start=start):
        frames.append(img)
        truths.append(t)
    used = "none"
    if codec == "av" and p["codec"] != "none":
        frames = codec_round_trip(frames, fps=p["fps"], codec=p["codec"], quality=p["quality"])
        used = p["codec"]
    elif codec == "jpeg" and p["codec"] != "none":
        # crf-like 20..33 -> JPEG quality 85..35 (higher crf = worse, as for the video codecs)
        frames = jpeg_round_trip(frames, quality=int(85 - (p["quality"] - 20) * 50 / 13))
        used = "jpeg"
    return Stream(seed, p["width"], p["height"], p["fps"], used, frames, truths)


# ---------------------------------------------------------------- ground truth -> clauses


@dataclass(frozen=True)
class Clause:
    """One fact of a narration: `action` is appear | disappear | left | right | up | down | still."""

    colour: str
    shape: str
    action: str
    zone: str = ""


def grid_cell(o: SceneObject) -> tuple[int, int]:
    """(row, column) of the GRID x GRID cell that holds an object's centre (x, y in 0-1 of the
    frame; a centre on the far edge counts in the last cell)."""
    return min(int(o.y * GRID), GRID - 1), min(int(o.x * GRID), GRID - 1)


def reading_order(objs) -> list[SceneObject]:
    """Objects as a reader meets them: by the row of the frame's 3 x 3 grid, then by its column,
    then by position. Why (issue 11): the resampler's 9 queries hold one cell each, row by row
    (`grid_cell`, `spec.GRID`), so a reply in this order names the objects in the order of the
    image tokens.
    With the order left to right (by x), the shipped decoder named colour 1.00 right on frames
    with one object and 0.62 on frames with two or more (shape 0.95 and 0.77;
    `scripts/demo_grounding_by_length.py --by-objects`): it must pick the object to name next."""
    return sorted(objs, key=lambda o: (*grid_cell(o), o.y, o.x))


def zone_of(o: SceneObject) -> tuple[str, bool]:
    """(zone name, unambiguous?) of an object's centre."""
    row, col = grid_cell(o)
    clear = all(abs(v - edge) >= ZONE_MARGIN for v in (o.x, o.y) for edge in (1 / 3, 2 / 3))
    return ZONES[(row, col)], clear


def window_clauses(truths: list[FrameTruth], start: int, end: int) -> list[Clause]:
    """What happened in frames start..end (list indices, inclusive), as seen on frame `end`.

    Events on the list's first frame are not news: the viewer never saw the frame before it
    (the scene's first frame, or a stream that starts mid-scene as after a cache eviction)."""
    appeared, disappeared = {}, {}
    for j in range(max(start, 1), end + 1):
        for ev in truths[j].events:
            if ev.kind == "appear":
                appeared[ev.object.id] = ev.object
            elif ev.kind == "disappear":
                disappeared[ev.object.id] = ev.object
    visible = {o.id: o for o in truths[end].objects}
    clauses = []
    # each group in reading order (where the object is, or was last seen): the image tokens' order
    for o in reading_order(visible[oid] for oid in appeared if oid in visible):  # gone again: no word
        clauses.append(Clause(o.colour, o.shape, "appear", zone_of(o)[0]))
    for o in reading_order(o for oid, o in disappeared.items() if oid not in appeared):
        clauses.append(Clause(o.colour, o.shape, "disappear"))
    rest = reading_order(o for o in visible.values() if o.id not in appeared)
    clauses += [Clause(o.colour, o.shape, o.motion) for o in rest]
    return clauses[:MAX_CLAUSES]


# ---------------------------------------------------------------- grammar


def _zone_phrase(zone: str) -> str:
    if zone == "center":
        return "in the center"
    if zone in ("left", "right"):
        return f"on the {zone}"
    return f"at the {zone}"


def clause_text(c: Clause, rng: np.random.Generator) -> str:
    if c.action == "appear":
        return f"{article(c.colour)} {c.colour} {c.shape} {_pick(rng, APPEAR_VERBS)} {_zone_phrase(c.zone)}"
    if c.action == "disappear":
        return f"the {c.colour} {c.shape} {_pick(rng, DISAPPEAR_VERBS)}"
    if c.action == "still":
        return f"{article(c.colour)} {c.colour} {c.shape} {_pick(rng, STILL_PHRASES)}"
    return f"{article(c.colour)} {c.colour} {c.shape} {_pick(rng, MOVE_VERBS)} {_pick(rng, DIRECTION_PHRASES[c.action])}"


def narration_text(clauses: list[Clause], rng: np.random.Generator) -> str:
    if not clauses:
        return _pick(rng, EMPTY_SENTENCES)
    parts = [clause_text(c, rng) for c in clauses]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return body + "."


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _colour_word(rng: np.random.Generator) -> str:
    return "colour" if rng.random() < 0.5 else "color"


@dataclass(frozen=True)
class QA:
    kind: str  # count | colour | shape | position | motion | exists | list
    question: str
    answer: str
    truth: tuple  # what the answer must contain, per kind


def make_question(t: FrameTruth, rng: np.random.Generator, kind: str | None = None) -> QA:
    """A question about frame `t` and its answer (kinds that do not fit the frame are skipped)."""
    objs = reading_order(t.objects)
    kinds = ["count", "exists", "list"]
    if objs:
        kinds += ["colour", "shape", "position", "motion", "motion"]
    for _ in range(20):
        k = kind or _pick(rng, tuple(kinds))
        qa = _question_of_kind(k, objs, rng)
        if qa is not None:
            return qa
        kind = None
    return _question_of_kind("count", objs, rng)


def _question_of_kind(k: str, objs: list[SceneObject], rng: np.random.Generator) -> QA | None:
    if k == "count":
        q = _pick(rng, ("how many objects are there?", "how many shapes do you see?",
                        "how many objects can you see?", "count the objects."))
        n = len(objs)
        return QA(k, q, NUMBER_WORDS[n] + ".", (n,))
    if k == "list":
        q = _pick(rng, ("what do you see?", "what is in the picture?", "which objects are there?"))
        if not objs:
            return QA(k, q, "nothing.", ())
        names = [f"{article(o.colour)} {o.colour} {o.shape}" for o in objs]
        ans = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        return QA(k, q, ans + ".", tuple(sorted((o.colour, o.shape) for o in objs)))
    if k == "exists":
        if objs and rng.random() < 0.5:
            o = objs[int(rng.integers(len(objs)))]
            c, s = o.colour, o.shape
        else:
            c, s = _pick(rng, tuple(COLOURS)), _pick(rng, SHAPES)
        yes = any(o.colour == c and o.shape == s for o in objs)
        q = _pick(rng, (f"is there {article(c)} {c} {s}?", f"do you see {article(c)} {c} {s}?"))
        return QA(k, q, "yes." if yes else "no.", (yes,))
    if not objs:
        return None
    o = objs[int(rng.integers(len(objs)))]
    if k == "colour":
        if sum(x.shape == o.shape for x in objs) > 1:
            return None
        q = _pick(rng, (f"what {_colour_word(rng)} is the {o.shape}?", f"which {_colour_word(rng)} does the {o.shape} have?"))
        return QA(k, q, f"{o.colour}.", (o.colour,))
    if k == "shape":
        if sum(x.colour == o.colour for x in objs) > 1:
            return None
        q = _pick(rng, (f"what shape is the {o.colour} object?", f"which shape is {o.colour}?"))
        return QA(k, q, f"{article(o.shape)} {o.shape}.", (o.shape,))
    if k == "position":
        zone, clear = zone_of(o)
        if not clear:
            return None
        q = _pick(rng, (f"where is the {o.colour} {o.shape}?", f"where is the {o.colour} {o.shape} now?"))
        return QA(k, q, f"{_zone_phrase(zone)}.", (zone,))
    if k == "motion":
        q = _pick(rng, (f"where is the {o.colour} {o.shape} going?", f"how does the {o.colour} {o.shape} move?",
                        f"is the {o.colour} {o.shape} moving?"))
        if o.motion == "still":
            ans = "it " + _pick(rng, STILL_PHRASES) + "."
        else:
            ans = f"it {_pick(rng, MOVE_VERBS)} {_pick(rng, DIRECTION_PHRASES[o.motion])}."
        return QA(k, q, ans, (o.motion,))
    raise ValueError(f"unknown question kind {k!r}")


# ---------------------------------------------------------------- parsing (for evaluation)

_COLOURS_RE = "|".join(COLOURS)
_SHAPES_RE = "|".join(SHAPES)
_CLAUSE_RE = re.compile(rf"^(?:a|an|the) ({_COLOURS_RE}) ({_SHAPES_RE}) (.*)$")


def parse_action(rest: str) -> str | None:
    rest = rest.strip(" .")
    if any(rest.startswith(v) for v in APPEAR_VERBS):
        return "appear"
    if any(rest.startswith(v) for v in DISAPPEAR_VERBS):
        return "disappear"
    if any(rest.startswith(v) for v in STILL_PHRASES):
        return "still"
    for verb in MOVE_VERBS:
        if rest.startswith(verb + " "):
            tail = rest[len(verb) + 1:]
            for d, phrases in DIRECTION_PHRASES.items():
                if tail in phrases:
                    return d
    return None


def parse_narration(text: str) -> list[Clause] | None:
    """Clauses of a grammar sentence; [] for an 'empty scene' sentence; None if unparsable."""
    text = text.strip().lower()
    if text in EMPTY_SENTENCES:
        return []
    parts = re.split(r", | and ", text.rstrip("."))
    out = []
    for p in parts:
        m = _CLAUSE_RE.match(p.strip())
        if not m:
            return None
        action = parse_action(m.group(3))
        if action is None:
            return None
        zone = ""
        if action == "appear":
            for z in ZONES.values():
                if m.group(3).rstrip(" .").endswith(_zone_phrase(z)):
                    zone = z
        out.append(Clause(m.group(1), m.group(2), action, zone))
    return out


def answer_correct(qa: QA, text: str) -> bool:
    """Does the model's answer `text` say what `qa.truth` says?"""
    t = text.strip().lower().rstrip(".")
    if qa.kind == "count":
        return t.split(" ")[0:1] == [NUMBER_WORDS[qa.truth[0]]]
    if qa.kind == "exists":
        return t == ("yes" if qa.truth[0] else "no")
    if qa.kind == "colour":
        return t == qa.truth[0]
    if qa.kind == "shape":
        return t in (f"{article(qa.truth[0])} {qa.truth[0]}", qa.truth[0])
    if qa.kind == "position":
        return t == _zone_phrase(qa.truth[0])
    if qa.kind == "motion":
        if not t.startswith("it "):
            return False
        return parse_action(t[3:]) == qa.truth[0]
    if qa.kind == "list":
        if not qa.truth:
            return t == "nothing"
        items = re.split(r", | and ", t)
        got = []
        for it in items:
            m = re.match(rf"^an? ({_COLOURS_RE}) ({_SHAPES_RE})$", it.strip())
            if not m:
                return False
            got.append((m.group(1), m.group(2)))
        return tuple(sorted(got)) == qa.truth
    return False


# ---------------------------------------------------------------- turn schedules


@dataclass
class Turn:
    """After frame `frame` (inclusive) the user says `prompt`; the assistant replies `reply`."""

    frame: int
    kind: str  # narration | question
    prompt: str
    reply: str
    clauses: list[Clause] = field(default_factory=list)  # narration truth
    qa: QA | None = None  # question truth


def _gap(rng: np.random.Generator, fps: float) -> int:
    r = rng.random()
    if r < 0.25:
        return int(rng.integers(1, 6))
    if r < 0.85:  # around the default 2 s narration interval
        return max(1, int(round(fps * rng.uniform(1.0, 3.0))))
    return max(1, int(round(fps * rng.uniform(3.0, 6.0))))


def make_turns(truths: list[FrameTruth], fps: float, rng: np.random.Generator, *,
               p_narration: float = 0.55, dense: bool = False) -> list[Turn]:
    """A random schedule of narrations and questions over one stream.

    `dense`: a turn every 1-3 frames, so nearly every frame's vision features get a direct
    training signal (cheap: a question costs fewer tokens than a frame).
    """
    turns: list[Turn] = []
    last_narrated = -1
    f = -1
    n = len(truths)
    while True:
        f += int(rng.integers(1, 4)) if dense else _gap(rng, fps)
        if f >= n:
            break
        narrate = rng.random() < p_narration
        if narrate:
            clauses = window_clauses(truths, last_narrated + 1, f)
            # half the time the pipeline's default prompt, which is what `framecast run` sends
            prompt = NARRATION_PROMPTS[0] if rng.random() < 0.5 else _pick(rng, NARRATION_PROMPTS)
            turns.append(Turn(f, "narration", prompt, narration_text(clauses, rng), clauses))
            last_narrated = f
        # questions: dense supervision for little context (a question costs ~15 tokens, a frame ~19)
        n_q = int(rng.choice([0, 1, 2, 3], p=[0.2, 0.35, 0.3, 0.15])) if narrate else int(rng.integers(1, 4))
        for _ in range(n_q):
            qa = make_question(truths[f], rng)
            turns.append(Turn(f, "question", qa.question, qa.answer, qa=qa))
    return turns


def corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """Text the tokenizer is fitted on: every word the grammar, prompts and questions can use."""
    rng = np.random.default_rng(seed)
    texts = list(NARRATION_PROMPTS) + list(SYSTEM_PROMPTS) + list(EMPTY_SENTENCES)
    actions = ("appear", "disappear", "still", "left", "right", "up", "down")
    for _ in range(n):
        k = int(rng.integers(1, MAX_CLAUSES + 1))
        cl = [Clause(_pick(rng, tuple(COLOURS)), _pick(rng, SHAPES), _pick(rng, actions), _pick(rng, tuple(ZONES.values())))
              for _ in range(k)]
        texts.append(narration_text(cl, rng))
        objs = [SceneObject(i, _pick(rng, SHAPES), _pick(rng, tuple(COLOURS)), "small",
                            _pick(rng, ("left", "right", "up", "down", "still")),
                            float(rng.random()), float(rng.random()), (0, 0, 0, 0)) for i in range(int(rng.integers(0, 4)))]
        t = FrameTruth(0, 0.0, "black", False, tuple(objs), ())
        qa = make_question(t, rng)
        texts += [qa.question, qa.answer]
    return texts


# ---------------------------------------------------------------- text-only turns (chapters, summary)

EMPTY_TITLE = "an empty scene"
MAX_TITLE_OBJECTS = 3
MAX_SUMMARY_CHAPTERS = 6


def _mmss(t: float) -> str:
    t = max(0, int(t))
    return f"{t // 60}:{t % 60:02d}"


def title_of(narrations: list[str]) -> str:
    """A chapter title from its narrations: the distinct objects named, in order of first mention
    (at most `MAX_TITLE_OBJECTS`), e.g. 'a red circle and a blue square'; no object: EMPTY_TITLE."""
    seen: list[tuple[str, str]] = []
    for text in narrations:
        for c in parse_narration(text) or []:
            if (c.colour, c.shape) not in seen:
                seen.append((c.colour, c.shape))
    if not seen:
        return EMPTY_TITLE
    names = [f"{article(c)} {c} {s}" for c, s in seen[:MAX_TITLE_OBJECTS]]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def summary_of(titles: list[str]) -> str:
    """The summary of a recording from its chapter titles, e.g.
    'The video shows a red circle, then a blue square and a green star.'"""
    return "The video shows " + ", then ".join(titles) + "."


def parse_title(text: str) -> list[tuple[str, str]] | None:
    """(colour, shape) pairs of a title; [] for EMPTY_TITLE; None if it is not one."""
    t = text.strip().lower().rstrip(".")
    if t == EMPTY_TITLE:
        return []
    got = []
    for it in re.split(r", | and ", t):
        m = re.match(rf"^an? ({_COLOURS_RE}) ({_SHAPES_RE})$", it.strip())
        if not m:
            return None
        got.append((m.group(1), m.group(2)))
    return got


def parse_summary(text: str) -> list[list[tuple[str, str]]] | None:
    t = text.strip()
    if not t.lower().startswith("the video shows "):
        return None
    out = []
    for part in t[len("the video shows "):].rstrip(".").split(", then "):
        parsed = parse_title(part)
        if parsed is None:
            return None
        out.append(parsed)
    return out


def random_narrations(rng: np.random.Generator, n: int) -> list[str]:
    """`n` grammar narrations about a small cast of objects (as one chapter would hold)."""
    actions = ("appear", "disappear", "still", "left", "right", "up", "down")
    cast = [(_pick(rng, tuple(COLOURS)), _pick(rng, SHAPES)) for _ in range(int(rng.integers(1, 4)))]
    out = []
    for _ in range(n):
        if rng.random() < 0.08:
            out.append(_pick(rng, EMPTY_SENTENCES))
            continue
        k = int(rng.integers(1, min(len(cast), MAX_CLAUSES) + 1))
        chosen = [cast[i] for i in sorted(rng.choice(len(cast), size=k, replace=False))]
        cl = [Clause(c, s, _pick(rng, actions), _pick(rng, tuple(ZONES.values()))) for c, s in chosen]
        out.append(narration_text(cl, rng))
    return out


def narration_lines(texts: list[str], start_s: float, rng: np.random.Generator) -> tuple[str, float]:
    """`[m:ss] text` lines (CHAPTER_TITLE_PROMPT's format) and the time after the last one."""
    t, lines = start_s, []
    for text in texts:
        lines.append(f"[{_mmss(t)}] {text}")
        t += float(rng.choice([1.0, 2.0, 2.0, 3.0, 4.0]))
    return "\n".join(lines), t


def title_example(rng: np.random.Generator) -> tuple[str, str]:
    """(user prompt, assistant reply) of one chapter-title turn."""
    from framecast.engine.prompts import CHAPTER_TITLE_PROMPT

    texts = random_narrations(rng, int(rng.integers(1, 7)))
    lines, _ = narration_lines(texts, float(rng.integers(0, 600)), rng)
    return CHAPTER_TITLE_PROMPT.format(narrations=lines), title_of(texts)


def summary_example(rng: np.random.Generator) -> tuple[str, str]:
    """(user prompt, assistant reply) of one summary turn over 1-6 chapters."""
    from framecast.engine.prompts import SUMMARY_PROMPT

    t, rows, titles = 0.0, [], []
    for i in range(int(rng.integers(1, MAX_SUMMARY_CHAPTERS + 1))):
        texts = random_narrations(rng, int(rng.integers(1, 4)))
        title = title_of(texts)
        end = t + float(rng.integers(4, 40))
        rows.append(f"{i + 1}. [{_mmss(t)}-{_mmss(end)}] {title}: {' '.join(texts)}")
        titles.append(title)
        t = end
    return SUMMARY_PROMPT.format(chapters="\n".join(rows)), summary_of(titles)


LOG_QUESTION_KINDS = ("colour", "shape", "count", "list", "exists")
LOG_QUESTION_WHEN = ("", " in chapter {k}", " at {t}", " between {t} and {u}", " in the first part", " then")


def log_question_example(rng: np.random.Generator) -> tuple[str, str]:
    """(user prompt, assistant reply) of one question answered from a narration log
    (`QUESTION_FROM_LOG_PROMPT`, what `framecast ask --session` sends for spans older than the
    cache): the answer is about the objects the narrations name, in the per-frame answer grammar."""
    from framecast.engine.prompts import QUESTION_FROM_LOG_PROMPT

    texts = random_narrations(rng, int(rng.integers(1, 7)))
    start = float(rng.integers(0, 600))
    lines, end = narration_lines(texts, start, rng)
    named = sorted({(c.colour, c.shape) for t in texts for c in (parse_narration(t) or [])})
    objs = [SceneObject(i, s, c, "medium", "still", 0.5, 0.5, (0, 0, 1, 1)) for i, (c, s) in enumerate(named)]
    qa = None
    while qa is None:
        qa = _question_of_kind(_pick(rng, LOG_QUESTION_KINDS), objs, rng)
    spans = LOG_QUESTION_WHEN if qa.kind in ("colour", "shape") else LOG_QUESTION_WHEN[:2] + LOG_QUESTION_WHEN[3:4]
    when = _pick(rng, spans).format(k=int(rng.integers(1, 6)), t=_mmss(start), u=_mmss(end))
    question = qa.question[:-1] + when + qa.question[-1] if when else qa.question
    return (QUESTION_FROM_LOG_PROMPT.format(start=_mmss(start), end=_mmss(end), narrations=lines, question=question),
            qa.answer)
