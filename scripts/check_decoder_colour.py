"""Can the demo decoder learn to name colour and shape from frozen frame features? Single
frames, replies only (issue 11).

The shipped model's slot read-out names each object's colour 0.99 right from the resampler's
queries on held-out frames, while its decoder names colour words only ~0.8 right, on one
frame as on 12: 1.00 on frames with one object, 0.62 with two or more
(`scripts/demo_grounding_by_length.py --by-objects`), so choosing the object to name next is
what fails. This trains the decoder alone (tower and resampler frozen, their features computed
once) on one-frame clips with a question or a caption on every frame, in the data's current
object order (`data.reading_order`, the order of the image tokens), and prints the held-out
content-word accuracy with real and shuffled features every `--log-every` steps, for all
frames and then colour and shape apart on frames with one object and with two or more. If
colour on the latter climbs well past its step-0 figure (0.69 for run D's decoder) here, the
order was the limit; if it stays, the trainer will not move it. On this CPU, 238 steps did not
lift it (`scripts/results/demo_decoder_colour_order_cpu_2026-12-01.txt`).

    python scripts/check_decoder_colour.py [--decoder shipped|fresh] [--streams 200] [--seconds 600]

Training streams are fresh (seeds 1,400,000+), held-out ones the trainer's (900,000+); 8 frames
of each stream (every 6th of 48) are encoded once. This VM's 2-core CPU: ~14 s a step at batch 64,
~3.5 s at 16 (too slow to conclude); an H200 is meant.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

FRAMES = 48  # rendered per stream
KEPT = tuple(range(0, FRAMES, 6))  # frames of each stream whose features are computed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--decoder", choices=("shipped", "fresh"), default="shipped")
    ap.add_argument("--model", default=None, help="model directory (default: the shipped one)")
    ap.add_argument("--streams", type=int, default=200, help="training streams to render")
    ap.add_argument("--held-out", type=int, default=48, help="held-out streams (two one-frame clips of each)")
    ap.add_argument("--batch", type=int, default=64, help="one-frame clips a step")
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=600.0, help="stop after so long")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--tiny", action="store_true", help="a toy model (tests of this script)")
    a = ap.parse_args(argv)
    for name in ("streams", "held_out", "batch", "steps", "workers", "log_every"):
        least = 2 if name == "held_out" else 1
        if getattr(a, name) < least:
            print(f"check_decoder_colour: --{name.replace('_', '-')} {getattr(a, name)}: at least {least}",
                  file=sys.stderr)
            return 2
    for name in ("lr", "seconds"):
        if not 0 < getattr(a, name) < float("inf"):  # NaN fails too
            print(f"check_decoder_colour: --{name} {getattr(a, name)}: must be above 0", file=sys.stderr)
            return 2
    if a.tiny and a.model:
        print("check_decoder_colour: --model and --tiny: a toy model reads no weights", file=sys.stderr)
        return 2

    import framecast  # noqa: F401  (OpenBLAS preload before mlx)
    import mlx.core as mx
    import mlx.nn as nn

    from framecast.model.lm import build_lm
    from framecast.model.load import DEMO_MODEL_DIR
    from framecast.stages.demo_training.batches import SequenceBuilder, make_batch
    from framecast.stages.demo_training.heads import DemoVLM, encode_views, lm_forward, lm_inputs, load_hf_weights, word_ids
    from framecast.stages.demo_training.report import content_masks, next_clips_features, train_with_reports
    from framecast.stages.demo_training.spec import (
        CONTENT_WORDS, DEMO_MAX_CACHE_TOKENS, build_tokenizer, model_config, model_tokenizer,
        train_cache_limit,
    )
    from framecast.stages.demo_training.streams import Pool, generate_streams, stream_jobs

    t0 = time.time()
    mx.set_cache_limit(train_cache_limit())  # as the trainer: MLX's default cache is the whole device
    directory = Path(a.model or DEMO_MODEL_DIR)
    try:  # the model's own numbering of tokens (a toy fits one to the grammar's text)
        tok = build_tokenizer(0) if a.tiny else model_tokenizer(directory)
        cfg = model_config(tok, tiny=a.tiny)
        mx.random.seed(0)
        model = DemoVLM(cfg, word_ids(tok))
        if not a.tiny:
            load_hf_weights(model, directory, tok)
    except ValueError as e:
        print(f"check_decoder_colour: --model {e}", file=sys.stderr)
        return 2
    builder = SequenceBuilder(tok)
    if a.decoder == "fresh":
        model.llm = build_lm({**cfg, "model_type": "qwen2"})
    model.freeze()
    model.llm.unfreeze()

    seeds = [1_400_000 + i for i in range(a.streams)] + [900_000 + i for i in range(a.held_out)]
    data = generate_streams(stream_jobs(seeds, FRAMES, "jpeg"), a.workers)
    feats: dict[int, dict[int, mx.array]] = {}  # seed -> frame -> [Q, D]
    for d in data:
        f = encode_views(model, mx.array(d["views"][list(KEPT)]))  # [len(KEPT), Q, D]
        mx.eval(f)
        feats[d["seed"]] = dict(zip(KEPT, f))
    pool = Pool([d for d in data if d["seed"] >= 1_000_000])
    val = Pool([d for d in data if d["seed"] < 1_000_000])
    del data  # the pools hold their own copies of the pixels (~9 MB a stream)
    print(f"data and features: {len(seeds)} streams in {time.time() - t0:.0f}s", flush=True)

    def batch(rng, rows, source, key=None):
        # distinct streams of one view size (`Pool.clips`), each at one of its encoded frames
        clips = [(d, int(rng.choice(KEPT))) for d, _ in source.clips(rng, rows, 1, key=key)]
        b = make_batch(clips, 1, builder, rng, dense=1.0, max_tokens=DEMO_MAX_CACHE_TOKENS)
        b["feats"] = mx.stack([feats[d["seed"]][f] for d, f in clips])  # [B, Q, D]
        b["several"] = mx.array([len(d["truths"][f].objects) >= 2 for d, f in clips])  # [B] 2+ objects on the frame
        return b

    def logits_of(model, b, f):
        return lm_forward(model, lm_inputs(model, f, b["inputs"], b["is_img"], b["slot"]))[0]

    def loss(model, b):
        ce = nn.losses.cross_entropy(logits_of(model, b, b["feats"]), b["targets"], reduction="none")
        return (ce * b["loss_mask"]).sum() / mx.maximum(b["loss_mask"].sum(), 1)

    # held-out: every view size, one clip per stream at each of two frames
    vrng = np.random.default_rng(1)
    held = [batch(vrng, len(val.items[k]), val, k) for k in val.keys for _ in range(2)]

    GROUPS = ("all", "one", "several")  # every held-out frame; frames with one object; with two or more

    def report() -> str:
        right = {(g, w, t): 0.0 for g in GROUPS for w in CONTENT_WORDS for t in ("real", "shuf")}
        total = {(g, w): 0.0 for g in GROUPS for w in CONTENT_WORDS}
        for b in held:
            masks = content_masks(tok, b["targets"], b["loss_mask"])
            B = b["inputs"].shape[0]
            rows = {"all": mx.ones((B, 1)), "several": b["several"][:, None].astype(mx.float32)}
            rows["one"] = 1 - rows["several"]  # [B, 1] each
            for tag, f in (("real", b["feats"]), ("shuf", next_clips_features(b["feats"], B, 1))):
                hit = mx.argmax(logits_of(model, b, f), -1) == b["targets"]
                for g, r in rows.items():
                    for w, m in masks.items():
                        right[(g, w, tag)] += float((hit * m * r).sum())
                        if tag == "real":
                            total[(g, w)] += float((m * r).sum())

        def line(g: str, words) -> str:
            return " ".join(f"{w[:3]} {right[(g, w, 'real')] / max(total[(g, w)], 1):.2f}/"
                            f"{right[(g, w, 'shuf')] / max(total[(g, w)], 1):.2f} (n {int(total[(g, w)])})"
                            for w in words)
        split = " | ".join(f"{g} objects: {line(g, ('colour', 'shape'))}" for g in ("one", "several"))
        return f"{line('all', CONTENT_WORDS)} || {split}"

    print(f"step     0 held-out content words real/shuffled: {report()}", flush=True)
    train_with_reports(model, loss, lambda rng: batch(rng, a.batch, pool), lr=a.lr, steps=a.steps,
                       seconds=a.seconds, log_every=a.log_every,
                       log=lambda i, s, v: print(f"step {i:5d} {s:5.0f}s loss {v:.3f} held-out content words "
                                                 f"real/shuffled: {report()}", flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
