"""Train the embedded demo model: a tiny MiniCPM-V (2.6 layout) that narrates synthetic shapes.

    python scripts/train_demo_model.py --out pipeline/demo_model --time-budget 420 [--codec jpeg] ...

Exactly the MiniCPM-V architecture and the engine's own classes (`framecast.model.vlm`): a small
SigLIP NaViT tower (ReLU MLPs, 252-px views), the 2D resampler with 9 queries and a small qwen2
decoder, plus a byte-level BPE `tokenizers` tokenizer fitted to the grammar's vocabulary with the
special tokens the processor needs. Deterministic from `--seed` (data, init, batches) up to device arithmetic.

The trainer in modules: `spec` (sizes, tokenizer, constants), `streams` (rendered streams with
dense labels, the device pool, gap clips), `batches` (token layout and step arrays), `heads`
(the model with its training read-outs and losses), `report` (grounding measurements), `refresh`
(new streams while training), `options` (checks of the options, seeds), `run_files` (checkpoints,
the exported model, lineage) and this module (the options, the schedule and the loop).

Why it sees (issue 11): the vision side is taught directly, not only through the decoder.
Two training-only heads (never shipped) supervise it with the generator's ground truth:
- a dense per-patch head on the tower output: the colour and the shape of the object under
  each patch centre (or background), a segmentation-style signal every patch gets;
- a slot head on the resampler output: query k answers for the k-th cell of a 3x3 grid of the
  frame (row-major; the same 3x3 zones the position questions use): is an object's centre in
  it, its colour, shape and centre (x, y). The features the decoder reads are therefore a
  fixed, readable code per cell, like the attribute code of the decoder-can-read test.
  Colour and shape are read against the decoder's own word embeddings (`slot_logits`):
  the logit of "red" is the cosine between the RMS-normalised feature (what the decoder's
  first norm sees) and the embedding of the token " red", times `SLOT_SCALE`. A learned
  linear head read colour at 99 % from features whose colour classes were nearly as far apart
  as their own spread (the decoder named colours at chance); a cosine readout needs a margin
  in the direction the decoder reads, and copying a word embedding is what attention does best.
After the vision-only phase the tower is frozen (`mx.stop_gradient`): the decoder loss flows into
the resampler, which keeps its slot targets.

Training examples use the STREAMING layout of the session (`framecast.engine.layout`), token for
token: the prefix, then one `{image placeholder}\\n` span per frame, and at random points a turn
`{prompt}<|im_end|>\\n<|im_start|>assistant\\n{reply}<|im_end|>\\n<|im_start|>user\\n`. Clips start
at frame 0 or mid-scene (what the cache holds after the session evicts the oldest spans) and
never exceed `DEMO_MAX_CACHE_TOKENS`, the budget the shipped config.json gives the session.
Curriculum (shares of the run): vision alone (`--vision-phase`, 0.3), the motion probe alone on
24-frame clips (`--motion-phase`, 0), 2-frame gap clips (`--gap-phase`, 0), 1-3-frame clips with
dense questions (`--short-phase`, 0.25), then clips whose longest length ramps up to `--max-clip`.

Motion: frames are encoded one by one, so the decoder must compare an object with its earlier
self. The motion probe (`motion_loss`) asks for that at every image token. Two things stood in
its way (issue 11, scripts/results/demo_*_2026-11-30): an object keeps one motion for its life,
so on a few thousand streams its look told its motion and runs A-E learnt the look (their probe
loss fell on training streams, not on held-out ones); `augment` mirrors and reverses clips at
random (on by default, `--no-augment`) so the look no longer tells the direction (it still
tells the axis and a still object). And with the replies in the
same loss the probe stayed at chance even on training streams; trained alone it rises
(`scripts/check_decoder_motion.py`), hence `--motion-phase`. Run G (2026-12-01) showed the
probe still memorising streams that come back dozens of times (training streams 0.52, held-out at
the majority) and the language lost while the probe trains alone; `--refresh` (`refresh.py`)
keeps swapping freshly rendered streams into the pool so that no stream comes back for long.
Text-only conversations (chapter titles, summaries and questions answered from a narration log,
`framecast.engine.prompts`) ride along.

Resumable: `--ckpt DIR` holds the full state (weights, optimiser, step, time); a later run with
the same DIR continues; `--stop-after S` ends this run early (checkpoint written), and
`--time-budget` is the whole training time the learning-rate schedule spans.

Writes an HF-layout checkpoint (float16 weights, the loader casts to float32 on CPU):
config.json, preprocessor_config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json, training.json (the recipe, the measured time and the log).
Imports only what the GPU machine has (mlx, numpy, cv2, PIL, tokenizers; PyAV only with --codec av).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

from framecast.model.load import DEMO_MODEL_DIR
import framecast  # noqa: F401  (OpenBLAS preload before mlx)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

import framecast.stages.demo_training.data as D
from framecast.stages.demo_training.refresh import StreamRefresher
from framecast.stages.demo_training.options import check_args, settle_seeds, shape_mismatch
from framecast.stages.demo_training.run_files import (
    export, load_checkpoint, parent_lineage, resumed_next_seed, save_checkpoint,
)
from framecast.stages.demo_training.spec import (
    DEFAULT_BATCH, DEFAULT_FRAMES, DEFAULT_GAP_MIX, DEFAULT_GAP_PHASE, DEFAULT_LR, DEFAULT_MOTION_PHASE,
    DEFAULT_SHORT_PHASE, DEFAULT_STREAMS, DEFAULT_VISION_LR_SCALE, DEFAULT_VISION_PHASE, DEMO_MAX_CACHE_TOKENS,
    GAP_FRAMES, LONG_RAMP, MOTION_PHASE_FRAMES, PROBE_STREAMS, MOTION_WEIGHT, REFRESH_PER_STEP, SHORT_FRAMES,
    STREAMS_PER_DATA_SEED, TEXT_ROWS, TEXT_WEIGHT, VISION_BATCH, build_tokenizer, model_config, model_tokenizer,
    train_cache_limit,
)
from framecast.stages.demo_training.streams import Pool, _make_stream_job, gap_clips, generate_streams, stream_jobs
from framecast.stages.demo_training.batches import (
    BATCH_ORDER, SequenceBuilder, content_table, make_batch, text_batch, weight_content,
)
from framecast.stages.demo_training.heads import DemoVLM, load_hf_weights, loss_fn, vision_loss_fn, word_ids
from framecast.stages.demo_training.report import (
    SEEN_KEYS, format_motion_probe, format_report, format_seen, grounding_report, motion_probe_report,
)


def lr_at(frac: float, peak: float, warmup_frac: float = 0.05, floor: float = 0.05) -> float:
    """Warmup then cosine decay over the fraction of the run done (time budget)."""
    if frac < warmup_frac:
        return peak * max(frac / warmup_frac, 0.01)
    t = min(1.0, (frac - warmup_frac) / (1 - warmup_frac))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def long_clip_frames(frac: float, a) -> int:
    """Longest clip at run fraction `frac` of the long phase: SHORT_FRAMES -> --max-clip over LONG_RAMP."""
    start = a.vision_phase + a.motion_phase + a.gap_phase + a.short_phase
    ramp = min(1.0, max(0.0, (frac - start) / max(LONG_RAMP * (1.0 - start), 1e-9)))
    return max(SHORT_FRAMES, int(round(SHORT_FRAMES + ramp * (a.max_clip - SHORT_FRAMES))))


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m framecast.stages.demo_training.train", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", required=True,
                    help=f"model directory to write (the shipped one is {DEMO_MODEL_DIR}: name it to replace it)")
    ap.add_argument("--seed", type=int, default=None,
                    help="tokenizer, init and batch order (and data: --data-seed); default 0, and an --init-from "
                         "model's own (its tokenizer was fitted with it, and a model's runs keep one seed)")
    ap.add_argument("--data-seed", type=int, default=None,
                    help="which training streams are rendered; default --seed for a new model, and for an "
                         "--init-from model one more than the highest its lineage used, so a fine-tuning run "
                         "never trains on streams an earlier run of its lineage saw")
    ap.add_argument("--time-budget", type=float, default=420.0, help="training seconds the LR schedule spans")
    ap.add_argument("--stop-after", type=float, default=None, help="end this run after so many seconds (resume later)")
    ap.add_argument("--max-steps", type=int, default=10**9, help="end after this many steps (all runs together)")
    ap.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="clips per step in the long phase (3x in the short one)")
    ap.add_argument("--streams", type=int, default=DEFAULT_STREAMS, help="synthetic training streams to render")
    ap.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help="frames rendered per stream")
    ap.add_argument("--max-clip", type=int, default=48, help="frames of the longest clip (then cut at the token budget)")
    ap.add_argument("--max-tokens", type=int, default=DEMO_MAX_CACHE_TOKENS, help="longest clip in tokens (the session budget)")
    ap.add_argument("--lr", type=float, default=DEFAULT_LR, help="peak learning rate (warmup, then cosine)")
    ap.add_argument("--vision-lr-scale", type=float, default=DEFAULT_VISION_LR_SCALE,
                    help="learning rate of tower and resampler after the vision phase, times --lr")
    ap.add_argument("--codec", default="jpeg", choices=D.CODEC_MODES, help="lossy round trip of the data")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="processes rendering the data")
    ap.add_argument("--log-every", type=int, default=100, help="steps between held-out grounding reports")
    ap.add_argument("--ckpt", default=None, help="checkpoint directory (resumed from when it holds one)")
    ap.add_argument("--ckpt-every", type=float, default=120.0, help="seconds between checkpoints")
    ap.add_argument("--deadline", type=float, default=None,
                    help="unix time by which training must end (the schedule is shortened to fit)")
    ap.add_argument("--vision-phase", type=float, default=DEFAULT_VISION_PHASE,
                    help="share of the run that trains the vision side alone, first")
    ap.add_argument("--motion-phase", type=float, default=DEFAULT_MOTION_PHASE,
                    help=f"share of the run, after the vision phase, on {MOTION_PHASE_FRAMES}-frame clips with the "
                         "motion probe as the decoder's only loss (learning to compare frames before the replies)")
    ap.add_argument("--gap-phase", type=float, default=DEFAULT_GAP_PHASE,
                    help=f"share of the run on 2-frame clips {GAP_FRAMES[0]}-{GAP_FRAMES[1]} frames apart with motion "
                         "questions, after the vision phase")
    ap.add_argument("--gap-mix", type=float, default=DEFAULT_GAP_MIX,
                    help="after the phases, the chance that a step trains on gap clips instead of long ones")
    ap.add_argument("--short-phase", type=float, default=DEFAULT_SHORT_PHASE,
                    help="share of the run on 1-3 frame clips with dense questions, after the vision phase")
    ap.add_argument("--motion-weight", type=float, default=MOTION_WEIGHT,
                    help="weight of the motion probe on the decoder's image tokens (0: off)")
    ap.add_argument("--text-weight", type=float, default=TEXT_WEIGHT,
                    help="weight of the text-only turns (titles, summaries, questions about a log)")
    ap.add_argument("--text-rows", type=int, default=TEXT_ROWS, help="text-only conversations per step")
    ap.add_argument("--no-augment", dest="augment", action="store_false",
                    help="train on the clips as rendered (default: each clip mirrored and/or reversed at random, "
                         "so an object's look cannot tell its direction)")
    ap.add_argument("--refresh", action="store_true",
                    help="keep rendering new training streams in background processes (--refresh-workers) while training "
                         "and swap each in for the oldest of the pool, so no stream is trained on for long "
                         "(off by default: batches then depend on the workers' timing)")
    ap.add_argument("--refresh-workers", type=int, default=None,
                    help="processes rendering for --refresh (default: a third of --workers; with all 15 of the GPU "
                         "machine's, run H trained at 2.0 steps/s against 3.5-4.5 without --refresh)")
    ap.add_argument("--init-from", default=None, help="HF-layout model dir (this trainer's) to start from")
    ap.add_argument("--tiny", action="store_true", help="a toy-sized model (tests of the trainer itself)")
    a = ap.parse_args(argv)
    problem = check_args(a)
    if problem:
        print(f"train: {problem}", file=sys.stderr)
        return 2
    a.command = "python -m framecast.stages.demo_training.train " + shlex.join(sys.argv[1:] if argv is None else argv)
    a.parent_lineage = parent_lineage(Path(a.init_from)) if a.init_from else []
    problem = settle_seeds(a)
    if problem:
        print(f"train: {problem}", file=sys.stderr)
        return 2

    t_start = time.time()
    out = Path(a.out)
    for flag, path in (("--out", a.out), ("--ckpt", a.ckpt)):  # before the data: a place that fails fails now
        try:
            if path is not None:
                Path(path).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(f"train: {flag} {path}: cannot be made ({e.strerror})", file=sys.stderr)
            return 2
    try:  # a start keeps its own token numbering; a fresh model fits one to the grammar's text
        tok = model_tokenizer(a.init_from) if a.init_from else build_tokenizer(a.seed)
    except ValueError as e:
        print(f"train: --init-from {e}", file=sys.stderr)
        return 2
    cfg = model_config(tok, tiny=a.tiny)
    cfg["framecast_session"] = {"max_cache_tokens": a.max_tokens}  # the longest clip it trained on
    if a.init_from:  # before a minute of data: a model of another size cannot be a start
        problem = shape_mismatch(json.loads((Path(a.init_from) / "config.json").read_text()), cfg)
        if problem:
            print(f"train: --init-from {a.init_from}: {problem}", file=sys.stderr)
            return 2
    builder = SequenceBuilder(tok)  # the model files are written at the first export, all together
    print(f"tokenizer: {tok.get_vocab_size()} ids; frame span {len(builder.frame_ids)} tokens", flush=True)

    t0 = time.time()
    # Training seeds start at 1,000,000; evaluation uses small seeds (held out); 900,000+ = log.
    block = 1_000_000 + a.data_seed * STREAMS_PER_DATA_SEED  # this data seed's training seeds: block, block + 1, ...
    # --refresh, resumed: the pool starts with streams after every one the stopped run started
    first = resumed_next_seed(a, block) if a.refresh else block
    train_seeds = list(range(first, min(first + a.streams, block + STREAMS_PER_DATA_SEED)))
    val_seeds = [900_000 + i for i in range(min(48, max(4, a.streams // 8)))]
    probe_seeds = [val_seeds[-1] + 1 + i for i in range(min(PROBE_STREAMS, max(4, a.streams // 8)))]
    data = generate_streams(stream_jobs(train_seeds + val_seeds + probe_seeds, a.frames, a.codec), a.workers)
    held_out = set(val_seeds)
    val_data = [d for d in data if d["seed"] in held_out]
    shape0 = val_data[0]["views"].shape
    val = Pool([d for d in val_data if d["views"].shape == shape0])
    probe_pool = Pool([d for d in data if probe_seeds[0] <= d["seed"] <= probe_seeds[-1]])
    pool = Pool([d for d in data if d["seed"] >= 1_000_000])
    del data, val_data
    t_data = time.time() - t0
    print(f"data: {a.streams} streams x {a.frames} frames ({a.codec}) in {t_data:.1f}s; view sizes "
          f"{dict(zip(pool.keys, pool.sizes.astype(int).tolist()))}", flush=True)

    # MLX keeps freed buffers for reuse up to its cache limit, which defaults to the whole card; with
    # clips of many lengths few are reused, and at ~138 GB of 141 a CUDA graph could not be built
    # (out of memory at step 2 on an H200, measured): a bounded cache leaves the rest free
    mx.set_cache_limit(train_cache_limit())
    mx.random.seed(a.seed)
    model = DemoVLM(cfg, word_ids(tok))
    mx.eval(model.parameters())
    if a.init_from:
        try:
            load_hf_weights(model, Path(a.init_from), tok)
        except ValueError as e:
            print(f"train: --init-from {e}", file=sys.stderr)
            return 2
        print(f"initialised from {a.init_from} (training heads fresh)", flush=True)
    n_params = sum(v.size for k, v in tree_flatten(model.parameters()) if not k.startswith("aux."))
    print(f"model: {n_params / 1e6:.2f}M parameters (+ training heads); device {mx.default_device()}", flush=True)
    scales = (a.vision_lr_scale, 1.0)
    opt = optim.MultiOptimizer(
        [optim.AdamW(learning_rate=a.lr * sc, weight_decay=0.01) for sc in scales],
        [lambda path, _w: path.startswith(("vpm.", "resampler."))])
    state = {"step": 0, "train_s": 0.0, "history": [], "rng": None}
    ckpt = Path(a.ckpt) if a.ckpt else None
    if ckpt is not None:
        # the optimiser needs its state tree before loading into it
        opt.init(model.trainable_parameters())
        got = load_checkpoint(ckpt, model, opt)
        if got is not None:
            state = got
            print(f"resumed from {ckpt}: step {state['step']}, {state['train_s']:.0f}s trained", flush=True)
    rng = np.random.default_rng(a.seed)
    if state.get("rng"):
        rng.bit_generator.state = state["rng"]
    step_fn = nn.value_and_grad(model, functools.partial(loss_fn, text_weight=a.text_weight,
                                                         motion_weight=a.motion_weight))
    vision_step = nn.value_and_grad(model, vision_loss_fn)
    motion_step = nn.value_and_grad(model, functools.partial(loss_fn, text_weight=0.0, reply_weight=0.0,
                                                             motion_weight=a.motion_weight))
    table = content_table(tok)

    val_frames = min(a.max_clip, a.frames)
    vrng = np.random.default_rng(1)
    def report_batch(source: Pool, rng: np.random.Generator) -> dict:
        """12 clips of `source` with replies and 4 text-only turns: what a grounding report reads."""
        batch = make_batch(source.clips(rng, 12, val_frames), val_frames, builder, rng, dense=0.3,
                           max_tokens=a.max_tokens)
        batch.update(text_batch(builder, rng, 4))
        return batch

    val_batch = report_batch(val, vrng)
    # the motion probe on more held-out clips than the report's 12 (its sample is the objects)
    probe_frames = min(MOTION_PHASE_FRAMES, val_frames)
    prng = np.random.default_rng(2)
    probe_batches = [make_batch(probe_pool.clips(prng, len(probe_seeds), probe_frames, key=k), probe_frames, builder,
                                prng, dense=0.3, max_tokens=a.max_tokens) for k in probe_pool.keys]
    # the same report on streams it trains on: a gap to the held-out one is memorisation
    seen_batch = report_batch(pool, vrng)

    t_run = time.time()
    train_s0 = state["train_s"]
    if a.deadline is not None:  # a device call has a hard limit: end the schedule before it
        a.time_budget = min(a.time_budget, train_s0 + a.deadline - t_run)
        if a.time_budget <= train_s0:
            print(f"train: --deadline passed before training could start (data took {t_data:.0f}s); "
                  "nothing trained", file=sys.stderr)
            return 2
        print(f"time budget {a.time_budget:.0f}s of training ({train_s0:.0f}s done)", flush=True)
    last_ckpt = time.time()
    parts_log: list[list[float]] = []
    history = state["history"]
    refresher = None
    if a.refresh:  # after the first render, which had every worker; resumed runs go on with new seeds
        refresher = StreamRefresher(_make_stream_job, lambda seed: stream_jobs([seed], a.frames, a.codec)[0],
                                    first_seed=train_seeds[-1] + 1, end_seed=block + STREAMS_PER_DATA_SEED,
                                    workers=a.refresh_workers or max(1, a.workers // 3))
    try:
        while state["step"] < a.max_steps:
            if refresher is not None:
                fresh = refresher.poll(limit=min(REFRESH_PER_STEP, len(pool)))  # more would swap out new ones
                pool.replace_oldest(fresh)
                state["refreshed"] = state.get("refreshed", 0) + len(fresh)
                state["next_seed"] = refresher.next_seed
                if refresher.exhausted:
                    print(f"refresh: all {STREAMS_PER_DATA_SEED} seeds of data seed {a.data_seed} rendered; "
                          "the pool stays as it is (a later run: another --data-seed)", flush=True)
                    refresher.close()
                    refresher = None
            train_s = train_s0 + time.time() - t_run
            frac = train_s / a.time_budget
            if frac >= 1.0 or (a.stop_after and time.time() - t_run >= a.stop_after):
                break
            state["step"] += 1
            step = state["step"]
            lr = lr_at(frac, a.lr)
            vision_only = frac < a.vision_phase
            for o, sc in zip(opt.optimizers, scales):
                o.learning_rate = lr * (1.0 if vision_only else sc)
            if vision_only:  # frames from many streams, no text: the tower and resampler learn to see
                views, patch_y, slot_y = [], [], []
                for d, f in pool.clips(rng, VISION_BATCH // 2, 2):
                    views.append(d["views"][f:f + 2])
                    patch_y.append(d["patch"][f:f + 2])
                    slot_y.append(d["slots"][f:f + 2])
                (loss, parts), grads = vision_step(model, mx.concatenate(views), mx.concatenate(patch_y),
                                                   mx.concatenate(slot_y))
                parts = (mx.array(0.0), mx.array(0.0), *parts, mx.array(0.0))
            else:
                motion_end = a.vision_phase + a.motion_phase
                after_phases = frac >= motion_end + a.gap_phase + a.short_phase
                only_motion = frac < motion_end
                if only_motion:  # the decoder learns to compare frames, nothing else
                    n = min(MOTION_PHASE_FRAMES, a.max_clip)
                    batch = make_batch(pool.clips(rng, a.batch, n), n, builder, rng, dense=0.3, max_tokens=a.max_tokens,
                                       augment=a.augment)
                elif frac < motion_end + a.gap_phase or (after_phases and rng.random() < a.gap_mix):
                    # two frames far enough apart to show motion
                    n = 2
                    batch = make_batch(gap_clips(pool, rng, a.batch * 3), n, builder, rng, dense=1.0,
                                       max_tokens=a.max_tokens, augment=a.augment)
                elif frac < motion_end + a.gap_phase + a.short_phase:  # short clips, a question every frame or so
                    n = int(rng.integers(1, SHORT_FRAMES + 1))
                    batch = make_batch(pool.clips(rng, a.batch * 3, n), n, builder, rng, dense=1.0,
                                       max_tokens=a.max_tokens, augment=a.augment)
                else:
                    n = int(rng.integers(SHORT_FRAMES, long_clip_frames(frac, a) + 1))
                    rows = max(a.batch, a.batch * 3 * SHORT_FRAMES // n)  # ~constant frames a step (n >= SHORT_FRAMES)
                    batch = make_batch(pool.clips(rng, rows, n), n, builder, rng, dense=0.3, max_tokens=a.max_tokens,
                                       augment=a.augment)
                weight_content(batch, table)
                batch.update(text_batch(builder, rng, a.text_rows))
                (loss, parts), grads = (motion_step if only_motion else step_fn)(model, *[batch[k] for k in BATCH_ORDER])
            mx.eval(loss)
            if not math.isfinite(float(loss)):  # nothing of this step reaches the weights or any file
                kept = (f"the last export in {out} and checkpoint (if any) are from before it"
                        if (out / "model.safetensors").is_file() else f"nothing was exported to {out}")
                print(f"train: the loss is {float(loss)} at step {step}: stopped; {kept}", file=sys.stderr)
                return 1
            grads, _ = optim.clip_grad_norm(grads, 1.0)
            opt.update(model, grads)
            mx.eval(loss, parts, model.parameters(), opt.state)
            parts_log.append([float(loss)] + [float(p) for p in parts])
            if step % a.log_every == 0 or step == 1:
                m = np.mean(parts_log[-a.log_every:], axis=0)
                el = train_s0 + time.time() - t_run
                rep = grounding_report(model, val_batch, tok, val_frames)
                if refresher is not None:  # the first streams have left the pool: report on those in it now
                    seen_batch = report_batch(pool, np.random.default_rng(step))
                seen = grounding_report(model, seen_batch, tok, val_frames)
                rep.update({f"seen_{k}": seen[k] for k in SEEN_KEYS})
                probe = motion_probe_report(model, probe_batches, probe_frames)
                mx.clear_cache()  # the reports' shapes are not the training steps'
                rep.update({f"probe_{k}": v for k, v in probe.items()})
                history.append({"step": step, "s": round(el, 1), "refreshed": state.get("refreshed", 0),
                                "loss": round(float(m[0]), 4),
                                "reply_ce": round(float(m[1]), 4), "text_ce": round(float(m[2]), 4),
                                "patch": round(float(m[3]), 4), "slot": round(float(m[4]), 4),
                                "motion": round(float(m[5]), 4), **rep})
                print(f"step {step:5d} {el:6.0f}s lr {lr:.1e}  loss {m[0]:.3f} (reply {m[1]:.3f} text {m[2]:.3f} "
                      f"patch {m[3]:.3f} slot {m[4]:.3f} motion {m[5]:.3f})\n" + format_report(step, rep)
                      + "\n" + format_motion_probe(probe) + "\n" + format_seen(rep)
                      + (f"\n  refreshed: {state.get('refreshed', 0)} new streams so far (pool {len(pool)}; "
                         f"renders lost {len(refresher.lost)})"
                         if refresher is not None else ""), flush=True)
            if ckpt is not None and time.time() - last_ckpt > a.ckpt_every:
                state.update(train_s=train_s0 + time.time() - t_run, rng=rng.bit_generator.state, history=history)
                save_checkpoint(ckpt, model, opt, state)
                export(out, model, a, state, n_params, t_data, tok, cfg)  # a usable model at every checkpoint
                last_ckpt = time.time()
    except KeyboardInterrupt:
        print(f"interrupted at step {state['step']}: saving", flush=True)
    finally:
        if refresher is not None:
            refresher.close()
    state.update(train_s=train_s0 + time.time() - t_run, rng=rng.bit_generator.state, history=history)
    if ckpt is not None:
        save_checkpoint(ckpt, model, opt, state)

    export(out, model, a, state, n_params, t_data, tok, cfg)
    print(f"saved {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB); {state['step']} steps, "
          f"trained {state['train_s']:.0f}s, this run {time.time() - t_start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
