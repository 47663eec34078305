"""Does the demo model's decoder name colour and shape worse in long clips than in short ones?
The trainer's grounding report (teacher-forced accuracy on the content words of the replies,
with real and with shuffled frame features) on held-out clips of several lengths.

    python scripts/demo_grounding_by_length.py [--model DIR] [--clips 16] [--lengths 1 3 12 48]

Why (issue 11): the vision side's slot read-out names each object's colour and shape 0.99/0.98
right on held-out frames, while the decoder's replies name them 0.71-0.75/0.85-0.90 right in
the trainer's 48-frame report. If short clips score near the read-out, what fails is reading
across a long context, not binding a colour to its shape in one frame. (Measured on run D: ~0.8
at every length; with `--by-objects`, 1.00 on one-object frames and 0.62 with two or more.)

Held-out streams (the trainer's validation seeds, 900,000+, 48 frames, JPEG), one view size, the
same clips' first frames at every length (a clip of n frames is frames 0..n-1 of its stream).
The training read-out heads are not in an exported model, so only the reply figures are printed.
CPU: ~1 minute at 16 clips up to 12 frames, ~5 more for 48.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import framecast  # noqa: F401  (OpenBLAS preload before mlx)
import numpy as np

from framecast.model.load import DEMO_MODEL_DIR
from framecast.stages.demo_training.batches import SequenceBuilder, make_batch
from framecast.stages.demo_training.heads import DemoVLM, load_hf_weights, word_ids
from framecast.stages.demo_training.report import grounding_report
from framecast.stages.demo_training.spec import CONTENT_WORDS, DEMO_MAX_CACHE_TOKENS, model_config, model_tokenizer
from framecast.stages.demo_training.streams import Pool, generate_streams, stream_jobs

DEFAULT_CLIPS = 16
DEFAULT_LENGTHS = (1, 3, 12, 48)
FRAMES = 48  # frames rendered per stream, as the trainer's --frames on the GPU machine


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEMO_MODEL_DIR), help="a model directory the demo trainer wrote")
    ap.add_argument("--clips", type=int, default=DEFAULT_CLIPS, help="held-out clips per length")
    ap.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="clip lengths in frames")
    ap.add_argument("--workers", type=int, default=2, help="processes rendering the streams")
    ap.add_argument("--by-objects", action="store_true",
                    help="also one-frame clips split by the objects on the frame: 1 against 2 or more (a reply names "
                         "several objects in turn, and the decoder must pick the next one)")
    a = ap.parse_args(argv)
    bad = [n for n in a.lengths if not 1 <= n <= FRAMES]
    problem = (f"--lengths {bad[0]}: from 1 to {FRAMES}" if bad
               else f"--clips {a.clips}: at least 2" if a.clips < 2  # the shuffled baseline: the next clip's frames
               else f"--workers {a.workers}: at least 1" if a.workers < 1 else None)
    if problem:
        print(f"demo_grounding_by_length: {problem}", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        tok = model_tokenizer(a.model)  # the model's own numbering of tokens
        model = DemoVLM(model_config(tok), word_ids(tok))
        load_hf_weights(model, Path(a.model), tok)
    except ValueError as e:
        print(f"demo_grounding_by_length: --model {e}", file=sys.stderr)
        return 2
    # 3x the clips: the view sizes split the streams, and every clip must come from one size
    data = generate_streams(stream_jobs([900_000 + i for i in range(3 * a.clips)], FRAMES, "jpeg"), a.workers)
    pool = Pool(data)
    key = pool.keys[int(np.argmax(pool.sizes))]
    streams = pool.items[key][:a.clips]
    print(f"model {a.model}; {len(streams)} held-out clips of view size {key}; data {time.time() - t0:.0f}s; "
          "content-word accuracy real/shuffled (teacher-forced), reply ce real/shuffled", flush=True)
    builder = SequenceBuilder(tok)

    def figures(rep: dict) -> str:
        words = " ".join(f"{w[:3]} {rep[f'{w}_acc_real']:.2f}/{rep[f'{w}_acc_shuf']:.2f}" for w in CONTENT_WORDS)
        return f"{words}; ce {rep['ce_real']:.3f}/{rep['ce_shuf']:.3f}"

    for n in a.lengths:
        t1 = time.time()
        rng = np.random.default_rng(n)
        # every frame gets questions in short clips, as the trainer's short phase; ~0.3 in long ones
        batch = make_batch([(d, 0) for d in streams], n, builder, rng, dense=1.0 if n <= 3 else 0.3,
                           max_tokens=DEMO_MAX_CACHE_TOKENS)
        print(f"{n:3d} frames: {figures(grounding_report(model, batch, tok, n))} ({time.time() - t1:.0f}s)",
              flush=True)
    if a.by_objects:
        for label, fits in (("1 object", lambda k: k == 1), ("2+ objects", lambda k: k >= 2)):
            clips = []  # (stream, its first frame that fits)
            for d in streams:
                f = next((i for i, t in enumerate(d["truths"]) if fits(len(t.objects))), None)
                if f is not None:
                    clips.append((d, f))
            if len(clips) < 2:
                print(f"  1 frame, {label}: fewer than 2 clips have one", flush=True)
                continue
            batch = make_batch(clips, 1, builder, np.random.default_rng(7), dense=1.0,
                               max_tokens=DEMO_MAX_CACHE_TOKENS)
            print(f"  1 frame, {label} ({len(clips)} clips): {figures(grounding_report(model, batch, tok, 1))}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
