"""Can the demo decoder learn to compare frames? The motion probe alone (issue 11).

Frames are encoded one at a time, so an object's motion exists only across frames: the decoder
must find the object's earlier self among the image tokens before it and compare centres. This
trains a decoder on that single objective (the trainer's motion probe, `train.motion_loss`:
at each image token of an object that has visibly moved, say left/right/up/down/still) and
prints the held-out probe accuracy against the majority class, every 100 steps.

    python scripts/check_decoder_motion.py --input code [--noise 0.035] [--frames 12]
    python scripts/check_decoder_motion.py --input features [--decoder fresh|shipped]

--input code: each frame's 9 image positions hold a fixed code of the truth (colour and
  shape one-hot, centre x and y, plus Gaussian noise on the centre) of 1-2 objects moving at
  0.01-0.04 frame sizes a frame; a fresh demo-size decoder. It isolates the decoder side.
--input features: real augmented clips (`augment`) of fresh streams through the shipped model's
  frozen tower and resampler, with a fresh decoder or the shipped one.

It needs a GPU to finish in a minute (measured on an H200: scripts/results/demo_decoder_motion_*).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

CODE_SCALE = 4.0  # size of a code entry next to the decoder's unit-RMS embeddings
SETTLE_FRAMES = 3  # code clips: the probe's targets start on this frame (a shift to see)


def code_batch(T, builder, rng, rows: int, frames: int, dim: int, noise: float):
    """Token arrays of `rows` clips of `frames` frames, codes [rows*frames*Q, dim], probe
    targets and mask [rows*frames*Q]."""
    from framecast.stages.demo_training import batches as TB, spec as TS
    from framecast.stages.sources.scene import DIRECTIONS, MOTIONS

    Q = TS.QUERY_NUM
    codes = np.zeros((rows, frames, Q, dim), np.float32)
    y = np.zeros((rows, frames, Q), np.int32)
    m = np.zeros((rows, frames, Q), np.float32)
    for b in range(rows):
        for _ in range(int(rng.integers(1, 3))):
            motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
            colour, shape = int(rng.integers(7)), int(rng.integers(6))
            speed, (x0, y0) = rng.uniform(0.01, 0.04), rng.uniform(0.2, 0.8, 2)
            for f in range(frames):
                x = float(np.clip(x0 + DIRECTIONS[motion][0] * speed * f, 0, 0.999))
                yy = float(np.clip(y0 + DIRECTIONS[motion][1] * speed * f, 0, 0.999))
                k = int(yy * TS.GRID) * TS.GRID + int(x * TS.GRID)
                codes[b, f, k, colour] = codes[b, f, k, 8 + shape] = CODE_SCALE
                codes[b, f, k, 16] = CODE_SCALE * (x + rng.normal(0, noise))
                codes[b, f, k, 17] = CODE_SCALE * (yy + rng.normal(0, noise))
                y[b, f, k], m[b, f, k] = MOTIONS.index(motion), float(f >= SETTLE_FRAMES)
    seqs = [builder.build(frames, [], TS.SESSION_SYSTEM_PROMPT) for _ in range(rows)]
    return TB.token_arrays(seqs, builder.pad, builder.unk, frames), codes.reshape(-1, dim), y.reshape(-1), m.reshape(-1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", choices=("code", "features"), default="code")
    ap.add_argument("--decoder", choices=("fresh", "shipped"), default="fresh", help="--input features: which decoder")
    ap.add_argument("--model", default=None, help="--input features: model directory (default: the shipped one)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=120.0, help="stop after so long")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--frames", type=int, default=12, help="frames per clip")
    ap.add_argument("--noise", type=float, default=0.0, help="--input code: std of the centre noise (frame sizes)")
    ap.add_argument("--streams", type=int, default=400, help="--input features: training streams to render")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--tiny", action="store_true", help="a toy decoder (tests of this script)")
    a = ap.parse_args(argv)

    import framecast  # noqa: F401  (OpenBLAS preload before mlx)
    import mlx.core as mx

    import framecast.stages.demo_training.train as T
    from framecast.stages.demo_training import heads as TH, spec as TS
    from framecast.stages.demo_training.report import train_with_reports
    from framecast.model.lm import build_lm
    from framecast.model.load import DEMO_MODEL_DIR

    # features: the model's own numbering of tokens (`build_tokenizer` follows the grammar's text)
    tok = TS.model_tokenizer(a.model or DEMO_MODEL_DIR) if a.input == "features" else T.build_tokenizer(0)
    builder = T.SequenceBuilder(tok)
    cfg = T.model_config(tok, tiny=a.tiny)
    mx.random.seed(0)
    model = T.DemoVLM(cfg, T.word_ids(tok))
    if a.input == "features":
        T.load_hf_weights(model, Path(a.model or DEMO_MODEL_DIR), tok)
    if a.input == "code" or a.decoder == "fresh":
        model.llm = build_lm({**cfg, "model_type": "qwen2"})
    model.freeze()
    model.llm.unfreeze()
    model.aux.motion.unfreeze()
    dim = cfg["hidden_size"]
    t0 = time.time()

    if a.input == "code":
        def batch(rng, rows):
            tokens, codes, y, m = code_batch(T, builder, rng, rows, a.frames, dim, a.noise)
            return {**tokens, "feats": mx.array(codes), "motion_y": mx.array(y), "motion_m": mx.array(m)}
        held_out = batch(np.random.default_rng(1), 64)
    else:
        seeds = [1_300_000 + i for i in range(a.streams)] + [900_000 + i for i in range(24)]
        data = T.generate_streams(T.stream_jobs(seeds, max(48, a.frames), "jpeg"), a.workers)
        pool = T.Pool([d for d in data if d["seed"] >= 1_000_000])
        val_data = [d for d in data if d["seed"] < 1_000_000]
        val = T.Pool([d for d in val_data if d["views"].shape == val_data[0]["views"].shape])
        print(f"data: {len(seeds)} streams in {time.time() - t0:.0f}s", flush=True)

        def batch(rng, rows, source=pool, augment=True):
            b = T.make_batch(source.clips(rng, rows, a.frames), a.frames, builder, rng, dense=0.3,
                             max_tokens=T.DEMO_MAX_CACHE_TOKENS, augment=augment)
            b["feats"] = mx.stop_gradient(TH.encode_views(model, b["views"]))  # [B*F, Q, D]
            return b
        held_out = batch(np.random.default_rng(1), 16, val, False)

    def probe(model, b):
        _, mid = TH.lm_forward(model, TH.lm_inputs(model, b["feats"], b["inputs"], b["is_img"], b["slot"]))
        return TH.motion_loss(model, mid, b["is_img"], b["slot"], b["motion_y"], b["motion_m"])

    def loss(model, b):
        return probe(model, b)[0]

    def accuracy(b) -> tuple[float, float]:
        _, logits, y, m = probe(model, b)
        counts = [float(((y == c) * m).sum()) for c in range(TS.N_MOT)]
        return float(((mx.argmax(logits, -1) == y) * m).sum() / m.sum()), max(counts) / max(sum(counts), 1.0)

    def log(i: int, seconds: float, value: float) -> None:
        acc, majority = accuracy(held_out)
        print(f"step {i:5d} {seconds:5.0f}s loss {value:.3f} held-out probe {acc:.3f} (majority {majority:.3f})",
              flush=True)

    train_with_reports(model, loss, lambda rng: batch(rng, 24), lr=a.lr, steps=a.steps, seconds=a.seconds,
                       log_every=a.log_every, log=log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
