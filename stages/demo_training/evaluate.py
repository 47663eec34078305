"""Accuracy of the demo model on held-out synthetic streams, through the real streaming session.

    python scripts/eval_demo_model.py [--model DIR] [--streams 30] [--frames 120] [--json]

Each held-out stream (seeds 0.. ; training uses seeds >= 1,000,000) is rendered by
`framecast.stages.sources.scene`, passed through a lossy round trip (`--codec`: PyAV h264/mpeg4 by
default when PyAV is installed, which training never saw; `jpeg` otherwise) and fed frame by
frame into a `framecast.engine.session.SessionCore` (greedy) with the model's own cache budget,
so long streams go through evictions as in `framecast run`. At the points of a seeded turn schedule it asks for a
narration or asks a question, exactly as `framecast run` would; the answers are parsed with the
grammar (`framecast.stages.demo_training.data`) and compared with the ground truth.

Narration: every ground-truth clause (an object's colour + shape + action: appear, disappear,
left/right/up/down, still) is an event; it counts as correct when a clause of the narration
names the same colour, shape and action. Questions: correct when the parsed answer matches.
Prints the accuracy, the confusion per attribute and per question kind; `--json` adds one
JSON object on the last line.

Baselines, so that a number means the model sees: `--shuffled` runs the same turns on the frames
of ANOTHER stream (features that carry nothing about the scored scene: what the decoder gets
from priors alone); the report also gives the trivial answers (always the most frequent answer
of each question kind, "nothing is there" for every narration = 0 events) and chance.
Text-only turns (chapter titles, summaries) are scored on `--text N` grammar examples.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from framecast.model.load import DEMO_MODEL_DIR  # noqa: E402
import framecast  # noqa: E402,F401  (OpenBLAS preload before mlx)
import numpy as np  # noqa: E402

import framecast.stages.demo_training.data as D  # noqa: E402

DEFAULT_MODEL = DEMO_MODEL_DIR
ATTRIBUTES = ("colour", "shape", "action")


def load(model_dir: str | Path):
    from framecast.model.load import load_model

    return load_model(str(model_dir))


def run_stream(model, stream: D.Stream, turns: list[D.Turn], *, max_tokens: int = 40) -> list[str]:
    """Feed the stream frame by frame into a streaming session; the reply text of every turn."""
    from framecast.engine.session import SessionCore

    defaults = (getattr(getattr(model, "args", None), "config", None) or {}).get("framecast_session") or {}
    core = SessionCore(model, max_cache_tokens=defaults.get("max_cache_tokens"))  # as `framecast run` does
    core.start()
    by_frame: dict[int, list[D.Turn]] = defaultdict(list)
    for t in turns:
        by_frame[t.frame].append(t)
    replies = []
    for i, frame in enumerate(stream.frames):
        core.add_image(frame)
        for t in by_frame.get(i, []):
            replies.append(core.generate(t.prompt, max_tokens=max_tokens).text)
    return replies


def match_clauses(truth: list[D.Clause], said: list[D.Clause]) -> list[tuple[D.Clause, D.Clause | None]]:
    """Pair each true clause with the said clause that agrees on most attributes (each used once)."""
    free = list(range(len(said)))
    pairs = []
    for c in truth:
        best, best_score = None, -1
        for j in free:
            s = said[j]
            score = (s.colour == c.colour) + (s.shape == c.shape) + (s.action == c.action)
            if score > best_score:
                best, best_score = j, score
        if best is not None:
            free.remove(best)
            pairs.append((c, said[best]))
        else:
            pairs.append((c, None))
    return pairs


class Scores:
    def __init__(self):
        self.events = 0
        self.events_ok = 0
        self.narrations = 0
        self.unparsed = 0
        self.extra_clauses = 0
        self.confusion = {a: Counter() for a in ATTRIBUTES}  # (truth, said) -> n
        self.qa = Counter()  # kind -> asked
        self.qa_ok = Counter()
        self.qa_confusion: dict[str, Counter] = defaultdict(Counter)
        self.examples: list[tuple[str, str, str]] = []  # (kind, expected, said) mistakes

    def add_narration(self, truth: list[D.Clause], text: str) -> None:
        self.narrations += 1
        said = D.parse_narration(text)
        if said is None:
            self.unparsed += 1
            said = []
        self.extra_clauses += max(0, len(said) - len(truth))
        ok_all = True
        for c, s in match_clauses(truth, said):
            self.events += 1
            ok = s is not None and (s.colour, s.shape, s.action) == (c.colour, c.shape, c.action)
            self.events_ok += ok
            ok_all &= ok
            for a in ATTRIBUTES:
                self.confusion[a][(getattr(c, a), getattr(s, a) if s else "(missing)")] += 1
        if not ok_all and len(self.examples) < 12:
            self.examples.append(("narration", D.narration_text(truth, np.random.default_rng(0)), text))

    def add_answer(self, qa: D.QA, text: str) -> None:
        ok = D.answer_correct(qa, text)
        self.qa[qa.kind] += 1
        self.qa_ok[qa.kind] += ok
        if qa.kind in ("colour", "shape", "position", "motion", "count", "exists"):
            self.qa_confusion[qa.kind][(str(qa.truth[0]), "ok" if ok else text.strip())] += 1
        if not ok and len(self.examples) < 24:
            self.examples.append((qa.question, qa.answer, text))

    @property
    def narration_accuracy(self) -> float:
        return self.events_ok / max(1, self.events)

    @property
    def qa_accuracy(self) -> float:
        return sum(self.qa_ok.values()) / max(1, sum(self.qa.values()))

    def report(self) -> str:
        lines = [f"narration: {self.events_ok}/{self.events} events correct ({100 * self.narration_accuracy:.1f} %) "
                 f"in {self.narrations} narrations; unparsable {self.unparsed}; extra clauses {self.extra_clauses}"]
        for a in ATTRIBUTES:
            lines.append(f"  confusion of {a} (rows: truth, columns: said)")
            lines += _confusion_table(self.confusion[a])
        lines.append(f"questions: {sum(self.qa_ok.values())}/{sum(self.qa.values())} correct "
                     f"({100 * self.qa_accuracy:.1f} %)")
        for k in sorted(self.qa):
            lines.append(f"  {k:<9} {self.qa_ok[k]:>4}/{self.qa[k]:<4} {100 * self.qa_ok[k] / self.qa[k]:5.1f} %")
        for k, conf in sorted(self.qa_confusion.items()):
            wrong = {key: n for key, n in conf.items() if key[1] != "ok"}
            if wrong:
                lines.append(f"  {k} mistakes (truth -> answer): " +
                             ", ".join(f"{t} -> {s!r} x{n}" for (t, s), n in sorted(wrong.items())[:10]))
        if self.examples:
            lines.append("examples of mistakes (prompt | expected | said):")
            lines += [f"  {p} | {e} | {s}" for p, e, s in self.examples[:12]]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"narration_accuracy": round(self.narration_accuracy, 4), "events": self.events,
                "narrations": self.narrations, "unparsed": self.unparsed,
                "qa_accuracy": round(self.qa_accuracy, 4), "questions": sum(self.qa.values()),
                "qa_by_kind": {k: round(self.qa_ok[k] / self.qa[k], 4) for k in sorted(self.qa)},
                "confusion": {a: {f"{t}->{s}": n for (t, s), n in sorted(c.items())}
                              for a, c in self.confusion.items()}}


def _confusion_table(conf: Counter) -> list[str]:
    rows = sorted({t for t, _ in conf})
    cols = sorted({s for _, s in conf})
    width = max([len(c) for c in cols + rows] + [5]) + 1
    out = ["    " + " " * width + "".join(f"{c:>{width}}" for c in cols)]
    for r in rows:
        out.append("    " + f"{r:<{width}}" + "".join(f"{conf.get((r, c), 0) or '.':>{width}}" for c in cols))
    return out


SHUFFLE_OFFSET = 500_000  # --shuffled: stream `seed` is scored on the frames of seed + this


def evaluate(model, seeds: list[int], n_frames: int, *, scores: Scores | None = None, shuffled: bool = False,
             **stream_kw) -> Scores:
    """Scores of `model` on streams `seeds`; `shuffled`: frames from other streams (baseline)."""
    scores = scores or Scores()
    for seed in seeds:
        stream = D.make_stream(seed, n_frames, **stream_kw)
        turns = D.make_turns(stream.truths, stream.fps, np.random.default_rng((seed, 5)))
        shown = stream
        if shuffled:  # same size and rate, another scene
            other = D.make_stream(seed + SHUFFLE_OFFSET, n_frames, **stream_kw)
            shown = D.Stream(seed, stream.width, stream.height, stream.fps, stream.codec,
                             [_fit(f, stream.width, stream.height) for f in other.frames], stream.truths)
        for t, text in zip(turns, run_stream(model, shown, turns)):
            if t.kind == "narration":
                scores.add_narration(t.clauses, text)
            else:
                scores.add_answer(t.qa, text)
    return scores


def _fit(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    import cv2

    if frame.shape[:2] == (height, width):
        return frame
    return cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)


def trivial_baselines(scores: Scores) -> dict:
    """Accuracy of always giving each question kind's most frequent true answer (from the
    confusion counts), and the chance of naming an event's colour, shape and action."""
    best = 0
    for kind, conf in scores.qa_confusion.items():
        by_truth = Counter()
        for (truth, _said), n in conf.items():
            by_truth[truth] += n
        best += max(by_truth.values()) if by_truth else 0
    best += 0  # "list" questions: no single answer fits many frames
    n_q = max(1, sum(scores.qa.values()))
    return {"qa_majority": round(best / n_q, 4), "narration_absent": 0.0,
            "narration_chance": round(1 / (len(D.COLOURS) * len(D.SHAPES) * 7), 4)}


class TextScores:
    """Chapter titles and summaries: exact object lists (order kept) against the grammar's."""

    def __init__(self):
        self.n = {"title": 0, "summary": 0}
        self.ok = {"title": 0, "summary": 0}
        self.examples: list[tuple[str, str]] = []

    def add(self, kind: str, expected: str, said: str) -> None:
        parse = D.parse_title if kind == "title" else D.parse_summary
        ok = parse(said) is not None and parse(said) == parse(expected)
        self.n[kind] += 1
        self.ok[kind] += ok
        if not ok and len(self.examples) < 4:
            self.examples.append((expected, said))

    def report(self) -> str:
        return "text-only turns: " + ", ".join(f"{k} {self.ok[k]}/{self.n[k]}" for k in self.n) + "".join(
            f"\n  expected {e!r} | said {s!r}" for e, s in self.examples)


def evaluate_text(model, n: int, seed: int = 7) -> TextScores:
    """Title and summary turns in a fresh conversation each (system + user + assistant)."""
    from framecast.engine.session import SessionCore

    rng = np.random.default_rng(seed)
    scores = TextScores()
    for i in range(n):
        kind = "title" if i % 2 == 0 else "summary"
        prompt, reply = D.title_example(rng) if kind == "title" else D.summary_example(rng)
        core = SessionCore(model)
        scores.add(kind, reply, core.generate(prompt, max_tokens=120).text)
    return scores


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--streams", type=int, default=30)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--codec", default="auto", choices=D.CODEC_MODES)
    ap.add_argument("--shuffled", action="store_true", help="also run the shuffled-frames baseline")
    ap.add_argument("--text", type=int, default=0, help="also score this many title/summary turns")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    t0 = time.time()
    model = load(a.model)
    seeds = list(range(a.first_seed, a.first_seed + a.streams))
    scores = evaluate(model, seeds, a.frames, codec=a.codec)
    print(f"held-out seeds {a.first_seed}..{a.first_seed + a.streams - 1}, {a.frames} frames each, codec {a.codec}, "
          f"model {a.model} ({time.time() - t0:.0f}s)")
    print(scores.report())
    result = {"real": scores.to_dict(), "trivial": trivial_baselines(scores)}
    print(f"trivial baselines: {result['trivial']}")
    if a.shuffled:
        sh = evaluate(model, seeds, a.frames, codec=a.codec, shuffled=True)
        result["shuffled"] = sh.to_dict()
        print(f"shuffled frames (another stream's): narration {sh.events_ok}/{sh.events} "
              f"({100 * sh.narration_accuracy:.1f} %), questions {sum(sh.qa_ok.values())}/{sum(sh.qa.values())} "
              f"({100 * sh.qa_accuracy:.1f} %)")
        for k in sorted(sh.qa):
            print(f"  {k:<9} {sh.qa_ok[k]:>4}/{sh.qa[k]:<4} {100 * sh.qa_ok[k] / sh.qa[k]:5.1f} %")
    if a.text:
        ts = evaluate_text(model, a.text)
        result["text"] = {k: round(ts.ok[k] / max(1, ts.n[k]), 4) for k in ts.n}
        print(ts.report())
    if a.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def score_narration_events(narrations: list[dict], truths: list[D.FrameTruth], fps: float,
                           scores: Scores | None = None) -> Scores:
    """Score `framecast run` narration events (JSONL dicts with text, pts_start, pts_end) against
    the scene generator's ground truth: each event covers the frames after the previous narration
    up to its own frame, the window the model is trained to narrate."""
    scores = scores or Scores()
    prev = -1
    for n in sorted(narrations, key=lambda e: e["pts_end"] if e.get("pts_end") is not None else e["pts"]):
        end = int(round((n.get("pts_end") if n.get("pts_end") is not None else n["pts"]) * fps))
        end = min(end, len(truths) - 1)
        scores.add_narration(D.window_clauses(truths, prev + 1, end), n["text"])
        prev = end
    return scores
