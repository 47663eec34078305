"""Train the embedded demo model: a tiny MiniCPM-V (2.6 layout) that narrates synthetic shapes.

    python scripts/train_demo_model.py --out pipeline/demo_model --time-budget 420 [--codec jpeg] ...

Exactly the MiniCPM-V architecture and the engine's own classes (`framecast.model.vlm`): a small
SigLIP NaViT tower (ReLU MLPs, 252-px views), the 2D resampler with 9 queries and a small qwen2
decoder, plus a byte-level BPE `tokenizers` tokenizer fitted to the grammar's vocabulary with the
special tokens the processor needs. Deterministic from `--seed` (data, init, batches) up to device arithmetic.

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
import collections
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
from mlx.utils import tree_flatten, tree_unflatten

import framecast.stages.demo_training.augment as A
import framecast.stages.demo_training.data as D
from framecast.stages.demo_training.refresh import StreamRefresher
from framecast.engine.layout import CLOSE_TEXT, DEFAULT_ASSISTANT_PREFIX, DEFAULT_SYSTEM_PROMPT, TURN_END
from framecast.stages.sources.scene import COLOURS, MOTIONS, SHAPES, SIZES, draw_shape

SPECIAL_TOKENS = [
    "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>",
    "<image>", "</image>", "<slice>", "</slice>", "<image_id>", "</image_id>",
    "<think>", "</think>", "<ref>", "</ref>", "<box>", "</box>",
]
# the session's streaming layout, token for token (one definition: framecast.engine.layout)
SESSION_SYSTEM_PROMPT = DEFAULT_SYSTEM_PROMPT
ASSISTANT_PREFIX = DEFAULT_ASSISTANT_PREFIX

# model shape (tiny: CPU inference must beat real time)
VOCAB_SIZE = 768
SCALE_RESOLUTION = 252  # 18 x 18 patches for a square frame: a small object spans ~2 patches
GRID = 3  # slot grid: query k <-> cell (k // GRID, k % GRID) of the frame
QUERY_NUM = GRID * GRID
VISION = dict(hidden_size=192, intermediate_size=768, num_attention_heads=3, num_hidden_layers=4,
              patch_size=14, image_size=SCALE_RESOLUTION,  # 18 x 18 learned position grid
              hidden_act="relu")  # MLX's CPU GELU is scalar: ReLU keeps the CPU tower faster than real time
LLM = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
           num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=8192,
           rms_norm_eps=1e-6, tie_word_embeddings=True)
DEMO_MAX_CACHE_TOKENS = 1024  # session budget shipped in config.json = the longest training clip

# training recipe
DEFAULT_BATCH = 24  # clips per step in the long phase (the short phase uses 3x as many)
DEFAULT_STREAMS = 1600
DEFAULT_FRAMES = 64  # frames rendered per stream; clips are windows of them
DEFAULT_LR = 1e-3
DEFAULT_VISION_LR_SCALE = 0.5
DEFAULT_VISION_PHASE = 0.3  # share of the run training the vision side alone (dense + slot targets)
DEFAULT_SHORT_PHASE = 0.25  # then this share on 1-3 frame clips with dense questions (the decoder learns to read)
VISION_BATCH = 768  # frames per step in the vision phase
SHORT_FRAMES = 3  # longest clip of the short phase
DEFAULT_MOTION_PHASE = 0.0  # share on MOTION_PHASE_FRAMES-frame clips with the motion probe as the only decoder loss
MOTION_PHASE_FRAMES = 24  # frames of a motion-phase clip (a mover shows MOTION_MIN_SHIFT within 0.3-1 s)
DEFAULT_GAP_PHASE = 0.0  # share on 2-frame clips whose frames lie GAP_FRAMES apart (motion questions)
GAP_FRAMES = (5, 10)  # frames between the two frames of a gap clip: shifts the features show
DEFAULT_GAP_MIX = 0.0  # after the phases, the chance that a step is a gap step (motion not forgotten)
# After the vision phase the tower is frozen (its dense targets taught it; the decoder's gradient
# through 4 layers x 1000 frames a step would cost most of a step): the resampler, its slot targets
# and the decoder train. The long phase's longest clip grows from SHORT_FRAMES to --max-clip over
# the first LONG_RAMP of that phase, so the decoder keeps finding the image tokens as they thin out.
LONG_RAMP = 0.5
STREAMS_PER_DATA_SEED = 100_000  # training stream seeds: 1,000,000 + data_seed * this + i
REFRESH_PER_STEP = 64  # --refresh: most new streams swapped in before one step (each costs a host->device copy)
MAX_SEED = 1000  # --seed and --data-seed are below this
MIN_CLIP_TOKENS = 256  # --max-tokens: the smallest session budget framecast accepts
TEXT_ROWS = 8  # text-only conversations (title, summary, question from a log) per step
PATCH_WEIGHT = 1.0
SLOT_WEIGHT = 1.0
TEXT_WEIGHT = 0.3
MAX_LOSS_WEIGHT = 100.0  # --motion-weight / --text-weight above this only make the loss overflow
MAX_TEXT_ROWS = 512
OBJECT_PATCH_WEIGHT = 4.0
CONTENT_WEIGHT = 3.0  # reply tokens naming a colour, shape, count, place or motion  # object patches are rare next to background ones
N_COL, N_SHP = len(COLOURS), len(SHAPES)
SLOT_DIM = 1 + N_COL + N_SHP + 2  # objectness, colour, shape, centre (x, y)
SLOT_COLS = 7  # slot labels: objectness, colour id, shape id, x, y, object id, motion id
N_MOT = len(MOTIONS)
MOTION_LAYER = 4  # the motion probe reads the decoder's residual stream after this many layers
MOTION_WEIGHT = 1.0
# frame sizes an object must have moved in the clip before its motion is a probe target: about
# twice the features' own centre error (slot read-out 0.035-0.04 on training clips, a linear
# read-out 0.065 on held-out ones), since a shift under the noise is a target nothing can learn
# (scripts/check_decoder_motion.py with centre noise 0.035: 0.75 at 12 frames, 0.92 at 24)
MOTION_MIN_SHIFT = 0.08
SLOT_SCALE = 10.0  # cosine -> logit: a small scale asks for a wide cosine margin (~0.5 for a low loss)
PATCH_Y = 6  # colour, shape, own x, y, object centre x, y
PATCH_OUT = 1 + N_COL + 1 + N_SHP + 4

# reply words by attribute: the content tokens the log scores separately
CONTENT_WORDS = {
    "colour": set(COLOURS),
    "shape": set(SHAPES),
    "count": set(D.NUMBER_WORDS) | {"yes", "no", "nothing"},
    "position": {"top", "bottom", "left", "right", "center"},
    "motion": {"left", "right", "up", "down", "upward", "downward", "still", "place", "not", "appears",
               "vanishes", "disappears", "gone", "shows", "comes"},
}


# ---------------------------------------------------------------- tokenizer and config


def build_tokenizer(seed: int):
    """Byte-level BPE (any text encodes) fitted on the grammar's text + the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    rng = np.random.default_rng((seed, 3))
    texts = D.corpus(6000, seed) + [SESSION_SYSTEM_PROMPT] + list(D.SYSTEM_PROMPTS)
    for _ in range(300):
        texts += list(D.title_example(rng)) + list(D.summary_example(rng))
    tok.train_from_iterator(texts, trainer)
    return tok


TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=1, num_hidden_layers=1)
TINY_LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1)


def model_config(tok, *, tiny: bool = False) -> dict:
    """The shipped shape; `tiny` = a toy of the same layout for CPU tests of the trainer."""
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab = -(-tok.get_vocab_size() // 64) * 64  # rows for every id, padded for the kernels
    return {
        "architectures": ["MiniCPMV"],
        "model_type": "minicpmv",
        "version": 2.6,
        **LLM, **(TINY_LLM if tiny else {}),
        "vocab_size": vocab,
        "query_num": QUERY_NUM,
        "image_size": SCALE_RESOLUTION,
        "patch_size": 14,
        "slice_mode": True,
        "slice_config": {"max_slice_nums": 1, "patch_size": 14, "scale_resolution": SCALE_RESOLUTION,
                         "model_type": "minicpmv"},
        "batch_vision_input": True,
        "drop_vision_last_layer": False,
        "use_image_id": False,
        "vision_config": {"model_type": "siglip_vision_model", "num_channels": 3, "layer_norm_eps": 1e-6,
                          **VISION, **(TINY_VISION if tiny else {})},
        "torch_dtype": "float16",
        "bos_token_id": None,
        "eos_token_id": ids["<|im_end|>"],
        "framecast_demo": True,
        # the longest clip training saw: `framecast run` keeps its cache within it (sinks + window)
        "framecast_session": {"max_cache_tokens": DEMO_MAX_CACHE_TOKENS},
    }


def write_tokenizer_files(out: Path, tok, cfg: dict) -> None:
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": "<unk>", "model_max_length": LLM["max_position_embeddings"],
    }, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"],
    }, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "MiniCPMVImageProcessor", "max_slice_nums": 1,
        "scale_resolution": SCALE_RESOLUTION, "patch_size": 14, "use_image_id": False,
        "image_feature_size": QUERY_NUM, "slice_mode": True, "im_start": "<image>", "im_end": "</image>",
        "slice_start": "<slice>", "slice_end": "</slice>", "unk": "<unk>",
        "norm_mean": [0.5, 0.5, 0.5], "norm_std": [0.5, 0.5, 0.5], "version": 2.6,
    }, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


# ---------------------------------------------------------------- data: pixels and dense labels


def slot_labels(truth) -> np.ndarray:
    """Per-slot targets of one frame [QUERY_NUM, SLOT_COLS] float32: objectness, colour id, shape
    id, x, y, object id and motion id (index in MOTIONS) of the object whose centre lies in the
    slot's cell (the one nearest the cell centre if two do)."""
    slots = np.zeros((QUERY_NUM, SLOT_COLS), np.float32)
    best = np.full(QUERY_NUM, np.inf)
    for o in truth.objects:
        r, c = min(int(o.y * GRID), GRID - 1), min(int(o.x * GRID), GRID - 1)
        k = r * GRID + c
        d = (o.x - (c + 0.5) / GRID) ** 2 + (o.y - (r + 0.5) / GRID) ** 2
        if d < best[k]:
            best[k] = d
            slots[k] = (1.0, list(COLOURS).index(o.colour), SHAPES.index(o.shape), o.x, o.y, o.id,
                        MOTIONS.index(o.motion))
    return slots


def frame_labels(truth, width: int, height: int, nh: int, nw: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch and per-slot targets of one frame.

    patch [nh*nw, PATCH_Y] float32: colour id + 1 and shape id + 1 of the object under each patch
    centre (0 = background, from one mask per object drawn at the frame's own resolution), the
    patch's own centre (x, y) in [0, 1] and its object's centre (x, y) (own centre on background):
    position must survive in the tower output, since the resampler's values carry no position.
    slots [QUERY_NUM, SLOT_COLS] float32: `slot_labels`.
    """
    ys = ((np.arange(nh) + 0.5) / nh * height).astype(int).clip(0, height - 1)
    xs = ((np.arange(nw) + 0.5) / nw * width).astype(int).clip(0, width - 1)
    patch = np.zeros((nh * nw, PATCH_Y), np.float32)
    gx, gy = np.meshgrid((np.arange(nw) + 0.5) / nw, (np.arange(nh) + 0.5) / nh)
    patch[:, 2], patch[:, 3] = gx.reshape(-1), gy.reshape(-1)
    patch[:, 4], patch[:, 5] = patch[:, 2], patch[:, 3]
    for o in truth.objects:  # one mask per object (anti-aliased edges thresholded at half)
        mask = np.zeros((height, width, 3), np.uint8)
        draw_shape(mask, o.shape, (255, 0, 0), (o.x * width, o.y * height), SIZES[o.size] * min(width, height))
        hit = mask[ys[:, None], xs[None, :], 0].reshape(-1) >= 128
        patch[hit, 0] = list(COLOURS).index(o.colour) + 1
        patch[hit, 1] = SHAPES.index(o.shape) + 1
        patch[hit, 4], patch[hit, 5] = o.x, o.y
    return patch, slot_labels(truth)


def _make_stream_job(args: tuple):
    """Worker: one stream -> dict of uint8 views [F, h, w, 3] at model resolution, labels, truths."""
    seed, n_frames, start, codec = args
    from framecast.model.processor import MiniCPMVProcessor

    proc = MiniCPMVProcessor(scale_resolution=SCALE_RESOLUTION, patch_size=14, max_slice_nums=1, query_num=QUERY_NUM)
    s = D.make_stream(seed, n_frames, codec=codec, start=start)
    views = np.stack([resize_like_processor(proc, f) for f in s.frames])
    nh, nw = views.shape[1] // 14, views.shape[2] // 14
    labels = [frame_labels(t, s.width, s.height, nh, nw) for t in s.truths]
    return {"seed": seed, "views": views, "patch": np.stack([p for p, _ in labels]),
            "slots": np.stack([q for _, q in labels]), "truths": s.truths, "fps": s.fps, "width": s.width}


def resize_like_processor(proc, frame: np.ndarray) -> np.ndarray:
    """The processor's overview view of one frame, kept uint8 (normalised later, on the device)."""
    from PIL import Image

    overview, _rows, _grid = proc.slice_image(Image.fromarray(frame, "RGB"), 1)
    return np.asarray(overview, dtype=np.uint8)


def stream_jobs(seeds: list[int], n_frames: int, codec: str) -> list[tuple]:
    """Half the streams start at the scene's first frame, half mid-scene (seeded offset)."""
    jobs = []
    for s in seeds:
        rng = np.random.default_rng((s, 13))
        start = 0 if rng.random() < 0.5 else int(rng.integers(1, 300))
        jobs.append((s, n_frames, start, codec))
    return jobs


def generate_streams(jobs: list[tuple], workers: int) -> list[dict]:
    if workers <= 1:
        return [_make_stream_job(j) for j in jobs]
    import multiprocessing as mp

    # spawn, not fork: the parent may already hold a GPU context
    with mp.get_context("spawn").Pool(workers) as pool:
        return list(pool.imap(_make_stream_job, jobs, chunksize=8))


class SequenceBuilder:
    """Token ids of one training clip in the session's exact segmentation."""

    def __init__(self, tok):
        self.tok = tok
        self.unk = tok.token_to_id("<unk>")
        self.im_end = tok.token_to_id("<|im_end|>")
        self.pad = tok.token_to_id("<|endoftext|>")
        placeholder = "<image>" + "<unk>" * QUERY_NUM + "</image>" + "\n"
        self.frame_ids = self.encode(placeholder)
        self.close_ids = self.encode(CLOSE_TEXT)
        assert self.close_ids[0] == self.im_end
        assert sum(i == self.unk for i in self.frame_ids) == QUERY_NUM

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def build(self, n_frames: int, turns: list[D.Turn], system: str,
              max_tokens: int | None = None) -> tuple[list[int], list[int]]:
        """(ids, loss flags): flag 1 where the token is a target (reply + its <|im_end|>).
        With `max_tokens`, frames stop being added (with their turns) before the limit."""
        ids = self.encode(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n")
        loss = [0] * len(ids)
        by_frame: dict[int, list[D.Turn]] = {}
        for t in turns:
            by_frame.setdefault(t.frame, []).append(t)
        for f in range(n_frames):
            add, flags = list(self.frame_ids), [0] * len(self.frame_ids)
            for t in by_frame.get(f, []):
                p = self.encode(t.prompt + TURN_END + ASSISTANT_PREFIX)
                r = self.encode(t.reply)
                add += p + r + self.close_ids
                flags += [0] * len(p) + [1] * (len(r) + 1) + [0] * (len(self.close_ids) - 1)
            if max_tokens is not None and len(ids) + len(add) > max_tokens and f > 0:
                break
            ids += add
            loss += flags
        return ids, loss

    def build_text(self, system: str, prompt: str, reply: str) -> tuple[list[int], list[int]]:
        """A fresh text-only conversation: system, one user message, the assistant's reply."""
        p = self.encode(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{prompt}"
                        + TURN_END + ASSISTANT_PREFIX)
        r = self.encode(reply)
        return p + r + [self.im_end], [0] * len(p) + [1] * (len(r) + 1)


# ---------------------------------------------------------------- model


class AuxHeads(nn.Module):
    """Training-only readouts (never saved): per patch on the tower; per slot on the resampler
    the objectness and centre (colour and shape are read against the word embeddings); per image
    token in the decoder, the motion of the slot's object (`motion_loss`)."""

    def __init__(self, dv: int, d: int):
        super().__init__()
        self.patch = nn.Linear(dv, PATCH_OUT)
        self.slot = nn.Linear(d, 3)  # objectness, centre (x, y)
        self.motion = nn.Linear(d, N_MOT)


def word_ids(tok) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Token ids of " red", " green", ... and " circle", " square", ...: the words as narrations
    say them (mid-sentence, one token each; the trainer refuses a tokenizer that splits one)."""
    out = []
    for words in (tuple(COLOURS), SHAPES):
        ids = [tok.encode(" " + w, add_special_tokens=False).ids for w in words]
        bad = [w for w, i in zip(words, ids) if len(i) != 1]
        if bad:
            raise ValueError(f"the tokenizer splits {bad[0]!r} into several tokens; the slot readout needs one")
        out.append(tuple(i[0] for i in ids))
    return out[0], out[1]


class DemoVLM(nn.Module):
    """The engine's own modules (vision tower, resampler, qwen2 LM) under the HF prefixes.

    Training needs a batched forward over many clips at once; inference goes through
    `framecast.model.vlm` (loaded from the HF files this writes), which runs the same modules.
    `tests/test_demo_model.py` checks that both paths give the same features and logits.
    """

    def __init__(self, cfg: dict, words: tuple[tuple[int, ...], tuple[int, ...]]):
        super().__init__()
        from framecast.model.lm import build_lm
        from framecast.model.resampler import Resampler
        from framecast.model.vision import SiglipVisionTower, VisionArgs

        self.vpm = SiglipVisionTower(VisionArgs.from_dict(cfg["vision_config"]))
        d, dv = cfg["hidden_size"], cfg["vision_config"]["hidden_size"]
        # 2D sin-cos start for the learned position table: neighbours look alike from step 0, so
        # attention can gather an object's patches (its shape) before positions are learned
        from framecast.model.resampler import sincos_2d

        side = self.vpm.args.num_patches_per_side
        self.vpm.embeddings.position_embedding.weight = 0.5 * mx.array(
            sincos_2d(dv, side, side).reshape(side * side, dv), dtype=mx.float32)
        self.resampler = Resampler(embed_dim=d, kv_dim=dv, num_queries=cfg["query_num"])
        # HF init of the two bare parameters (the engine's zeros are placeholders for loading)
        self.resampler.query = 0.02 * mx.random.normal((cfg["query_num"], d))
        self.resampler.proj = d ** -0.5 * mx.random.normal((d, d))
        self.llm = build_lm({**cfg, "model_type": "qwen2"})
        self.aux = AuxHeads(dv, d)
        self.word_ids = words  # (colour ids, shape ids): the slot readout's words (`word_ids`)


def vision_hidden(model: DemoVLM, views_u8: mx.array) -> tuple[mx.array, tuple[int, int]]:
    """uint8 [N, h, w, 3] views of one size -> vision tower output [N, L, Dv] and (nh, nw).

    The engine's processor normalisation, patch order and NaViT position ids; all views share
    one size, so no padding and no masks.
    """
    from framecast.model.vision import navit_position_ids

    n, h, w, _ = views_u8.shape
    args = model.vpm.args
    p = args.patch_size
    nh, nw = h // p, w // p
    x = (views_u8.astype(mx.float32) / 255.0 - 0.5) / 0.5
    patches = x.reshape(n, nh, p, nw, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, nh * nw, p * p * 3)
    pos = mx.broadcast_to(mx.array(navit_position_ids(nh, nw, args.num_patches_per_side))[None], (n, nh * nw))
    return model.vpm(patches, pos, None), (nh, nw)


def resample(model: DemoVLM, hidden: mx.array, grid: tuple[int, int]) -> mx.array:
    """Vision hidden [N, L, Dv] -> [N, Q, D] with the resampler's own layers (2D positions on keys)."""
    from framecast.model.resampler import sincos_2d

    nh, nw = grid
    r = model.resampler
    kv = r.ln_kv(r.kv_proj(hidden) if "kv_proj" in r else hidden)  # [N, L, D]
    k = kv + mx.array(sincos_2d(r.embed_dim, nh, nw).reshape(nh * nw, -1))
    out = r.attn(r.ln_q(r.query), k, kv, None)  # [N, Q, D]
    return r.ln_post(out) @ r.proj


def encode_views(model: DemoVLM, views: mx.array) -> mx.array:
    """uint8 views [N, h, w, 3] -> resampled features [N, Q, D] (what the decoder reads)."""
    return resample(model, *vision_hidden(model, views))


def patch_loss(model: DemoVLM, hidden: mx.array, patch_y: mx.array) -> tuple[mx.array, mx.array]:
    """Dense per-patch loss (scalar) on the tower output [N, L, Dv], with its logits [N, L, PATCH_OUT]."""
    pl = model.aux.patch(hidden)  # [N, L, PATCH_OUT]
    pc, ps = pl[..., :1 + N_COL], pl[..., 1 + N_COL:2 + N_COL + N_SHP]
    yc, ys = patch_y[..., 0].astype(mx.int32), patch_y[..., 1].astype(mx.int32)
    w = mx.where(yc > 0, OBJECT_PATCH_WEIGHT, 1.0)
    xy = ((mx.sigmoid(pl[..., -4:]) - patch_y[..., 2:6]) ** 2).sum(-1)
    patch = ((nn.losses.cross_entropy(pc, yc, reduction="none") + nn.losses.cross_entropy(ps, ys, reduction="none")
              + 20.0 * xy) * w).sum() / w.sum()
    return patch, pl


def slot_logits(model: DemoVLM, feats: mx.array) -> mx.array:
    """Resampled features [N, Q, D] -> slot logits [N, Q, SLOT_DIM]: objectness, colour (N_COL),
    shape (N_SHP), centre (x, y).

    All read from the RMS-normalised feature, as the decoder's first norm sees it; colour and
    shape are `SLOT_SCALE` x cosine with the decoder's embeddings of the words (`word_ids`)."""
    x = feats * mx.rsqrt((feats * feats).mean(-1, keepdims=True) + 1e-6)  # [N, Q, D], rms 1
    unit = x / math.sqrt(x.shape[-1])  # norm 1
    emb = model.llm.model.embed_tokens.weight  # [V, D], tied with the output head
    reads = []
    for ids in model.word_ids:
        e = emb[mx.array(ids)]  # [n_words, D]
        reads.append(SLOT_SCALE * unit @ (e * mx.rsqrt((e * e).sum(-1, keepdims=True) + 1e-12)).T)
    head = model.aux.slot(x)  # [N, Q, 3]
    return mx.concatenate([head[..., :1], *reads, head[..., 1:]], axis=-1)


def slot_loss(model: DemoVLM, feats: mx.array, slot_y: mx.array) -> tuple[mx.array, mx.array]:
    """Slot loss (scalar) on the resampled features [N, Q, D], with its logits [N, Q, SLOT_DIM]."""
    sl = slot_logits(model, feats)  # [N, Q, SLOT_DIM]
    obj = slot_y[..., 0]
    occ = obj.sum() + 1.0
    slot = nn.losses.binary_cross_entropy(sl[..., 0], obj, reduction="mean")
    slot = slot + (nn.losses.cross_entropy(sl[..., 1:1 + N_COL], slot_y[..., 1].astype(mx.int32), reduction="none") * obj).sum() / occ
    slot = slot + (nn.losses.cross_entropy(sl[..., 1 + N_COL:1 + N_COL + N_SHP], slot_y[..., 2].astype(mx.int32),
                                           reduction="none") * obj).sum() / occ
    slot = slot + 20.0 * (((mx.sigmoid(sl[..., -2:]) - slot_y[..., 3:5]) ** 2).sum(-1) * obj).sum() / occ
    return slot, sl


def vision_losses(model: DemoVLM, hidden: mx.array, feats: mx.array, patch_y: mx.array, slot_y: mx.array):
    """Dense patch loss and slot loss (scalars) with their logits, for logging."""
    (patch, pl), (slot, sl) = patch_loss(model, hidden, patch_y), slot_loss(model, feats, slot_y)
    return patch, slot, pl, sl


def lm_inputs(model: DemoVLM, feats: mx.array, inputs: mx.array, is_img: mx.array, slot: mx.array) -> mx.array:
    """Decoder input embeddings [B, T, D]: features [B*F, Q, D] scattered into the <unk> slots."""
    flat = feats.reshape(-1, feats.shape[-1])  # [B*F*Q, D]
    text = model.llm.embed_tokens(inputs)  # [B, T, D]
    return mx.where(is_img[..., None], flat[slot], text)


def lm_forward(model: DemoVLM, h: mx.array) -> tuple[mx.array, mx.array]:
    """Input embeddings [B, T, D] -> (logits [B, T, V], residual stream after MOTION_LAYER layers
    [B, T, D]): the LM's own forward (`framecast.model.lm.decoder.Model`), with a tap."""
    from framecast.model.lm.base import causal_mask

    lm = model.llm
    mask = causal_mask(h.shape[1])
    mid = h
    for i, layer in enumerate(lm.model.layers):
        h = layer(h, mask, None)
        if i + 1 == MOTION_LAYER:
            mid = h
    return lm.head(lm.model.norm(h)), mid


def motion_logits(model: DemoVLM, mid: mx.array) -> mx.array:
    """Residual stream [B, T, D] -> motion logits [B, T, N_MOT] (read at image tokens only)."""
    x = mid * mx.rsqrt((mid * mid).mean(-1, keepdims=True) + 1e-6)
    return model.aux.motion(x)


def motion_loss(model: DemoVLM, mid: mx.array, is_img: mx.array, slot: mx.array, motion_y: mx.array,
                motion_m: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """The motion probe: at each image token whose slot holds an object that has visibly moved (or
    visibly not) in the clip so far, the decoder's residual stream must say left/right/up/down/still.

    Frames are encoded one by one, so motion exists only across frames: the probe makes the first
    MOTION_LAYER layers compare an object with its earlier self, a dense target on every frame,
    where replies name a motion a few times a clip. Returns (loss, logits [B, T, N_MOT], targets
    [B, T], mask [B, T])."""
    y = motion_y.reshape(-1)[slot]  # [B, T]: per image token, its slot's motion id
    m = motion_m.reshape(-1)[slot] * is_img  # [B, T]
    ml = motion_logits(model, mid)
    loss = (nn.losses.cross_entropy(ml, y, reduction="none") * m).sum() / mx.maximum(m.sum(), 1.0)
    return loss, ml, y, m


def masked_ce(logits: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
    ce = nn.losses.cross_entropy(logits, targets, reduction="none")
    return (ce * mask).sum() / mx.maximum(mask.sum(), 1.0)


def loss_fn(model, views, patch_y, slot_y, inputs, targets, loss_mask, is_img, slot, motion_y, motion_m,
            t_inputs, t_targets, t_mask, *, text_weight: float = TEXT_WEIGHT, motion_weight: float = MOTION_WEIGHT,
            reply_weight: float = 1.0):
    """The decoder phases: replies + text-only turns + the slot targets + the motion probe; the
    tower is frozen. The motion phase zeroes the replies and the text turns."""
    hidden, grid = vision_hidden(model, views)  # [N, L, Dv]
    hidden = mx.stop_gradient(hidden)
    feats = resample(model, hidden, grid)  # [N, Q, D]
    slots, _ = slot_loss(model, feats, slot_y)  # the frozen tower's patch loss would teach nothing
    logits, mid = lm_forward(model, lm_inputs(model, feats, inputs, is_img, slot))
    ce = masked_ce(logits, targets, loss_mask)
    motion = motion_loss(model, mid, is_img, slot, motion_y, motion_m)[0]
    text_ce = masked_ce(model.llm(t_inputs), t_targets, t_mask)
    total = reply_weight * ce + text_weight * text_ce + SLOT_WEIGHT * slots + motion_weight * motion
    return total, (ce, text_ce, mx.array(0.0), slots, motion)


def vision_loss_fn(model, views, patch_y, slot_y):
    """The vision phase: tower and resampler against the dense and slot targets only."""
    hidden, grid = vision_hidden(model, views)
    patch, slot_loss, _, _ = vision_losses(model, hidden, resample(model, hidden, grid), patch_y, slot_y)
    return PATCH_WEIGHT * patch + SLOT_WEIGHT * slot_loss, (patch, slot_loss)


def hf_weights(model: DemoVLM, dtype=None) -> dict[str, mx.array]:
    """Our parameters under HF names and layouts (the inverse of the engine's sanitize); the
    training-only heads are left out."""
    out = {}
    for k, v in tree_flatten(model.vpm.parameters()):
        if k == "embeddings.patch_embedding.weight":  # Linear [D, p*p*3] -> Conv2d [D, 3, p, p]
            p = model.vpm.args.patch_size
            v = v.reshape(v.shape[0], p, p, 3).transpose(0, 3, 1, 2)
        out[f"vpm.{k}"] = v
    res = dict(tree_flatten(model.resampler.parameters()))
    for kind in ("weight", "bias"):
        out[f"resampler.attn.in_proj_{kind}"] = mx.concatenate(
            [res.pop(f"attn.{q}_proj.{kind}") for q in ("q", "k", "v")], axis=0)
    out.update({f"resampler.{k}": v for k, v in res.items()})
    out.update({f"llm.{k}": v for k, v in tree_flatten(model.llm.parameters())})
    return {k: mx.contiguous(v if dtype is None else v.astype(dtype)) for k, v in sorted(out.items())}


# ---------------------------------------------------------------- batches


def lr_at(frac: float, peak: float, warmup_frac: float = 0.05, floor: float = 0.05) -> float:
    """Warmup then cosine decay over the fraction of the run done (time budget)."""
    if frac < warmup_frac:
        return peak * max(frac / warmup_frac, 0.01)
    t = min(1.0, (frac - warmup_frac) / (1 - warmup_frac))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


class Pool:
    """Rendered streams grouped by view size; pixels and labels on the device, one array per
    stream and kind (a whole group would pass 2^31 elements, past int32 indexing)."""

    def __init__(self, data: list[dict]):
        self.items: dict[tuple[int, int], list[dict]] = {}
        self.order: collections.deque[dict] = collections.deque()  # oldest first (`replace_oldest`)
        for item in data:
            self._add(item)
        mx.eval([[d["views"], d["patch"], d["slots"]] for d in self.order])
        self._index()

    def _add(self, item: dict) -> None:
        d = {"seed": item["seed"], "truths": item["truths"], "fps": item["fps"], "width": item["width"],
             "views": mx.array(item["views"]), "patch": mx.array(item["patch"]), "slots": mx.array(item["slots"]),
             "slots_np": item["slots"]}
        self.items.setdefault(item["views"].shape[1:3], []).append(d)
        self.order.append(d)

    def _index(self) -> None:
        self.items = {k: g for k, g in self.items.items() if g}
        self.keys = sorted(self.items)
        self.sizes = np.array([len(self.items[k]) for k in self.keys], np.float64)

    def __len__(self) -> int:
        return len(self.order)

    def replace_oldest(self, data: list[dict]) -> None:
        """Swap the len(data) oldest streams for `data` (rendered dicts, as `__init__` takes);
        the pool keeps its size. Its view-size groups follow what the new streams are."""
        for item in data:
            old = self.order.popleft()
            group = self.items[old["views"].shape[1:3]]
            group.pop(next(i for i, d in enumerate(group) if d is old))
            self._add(item)
        if data:
            mx.eval([[d["views"], d["patch"], d["slots"]] for d in list(self.order)[-len(data):]])
            self._index()

    def clips(self, rng: np.random.Generator, rows: int, n_frames: int) -> list[tuple[dict, int]]:
        key = self.keys[int(rng.choice(len(self.keys), p=self.sizes / self.sizes.sum()))]
        group = self.items[key]
        idx = rng.choice(len(group), size=min(rows, len(group)), replace=False)
        out = []
        for i in idx:
            d = group[int(i)]
            n_all = len(d["truths"])
            a = 0 if rng.random() < 0.3 else int(rng.integers(0, max(1, n_all - n_frames + 1)))
            out.append((d, min(a, n_all - n_frames)))
        return out


def gap_clips(pool: Pool, rng: np.random.Generator, rows: int) -> list[tuple[dict, np.ndarray]]:
    """2-frame clips whose frames lie GAP_FRAMES apart: [(stream, frame indices [2])]."""
    out = []
    for d, _ in pool.clips(rng, rows, 1):
        g = int(rng.integers(GAP_FRAMES[0], GAP_FRAMES[1] + 1))
        a = int(rng.integers(0, len(d["truths"]) - g))
        out.append((d, np.array([a, a + g])))
    return out


def gap_turns(truths: list, rng: np.random.Generator) -> list[D.Turn]:
    """1-3 questions on a gap clip's second frame, two in three about motion."""
    turns = []
    for _ in range(int(rng.integers(1, 4))):
        qa = D.make_question(truths[-1], rng, kind="motion" if rng.random() < 2 / 3 else None)
        turns.append(D.Turn(len(truths) - 1, "question", qa.question, qa.answer, qa=qa))
    return turns


def make_batch(clips: list[tuple[dict, int | np.ndarray]], n_frames: int, builder: SequenceBuilder,
               rng: np.random.Generator, *, dense: float, max_tokens: int, augment: bool = False) -> dict:
    """Arrays of one batch of clips: pixels and vision labels [B*F, ...], tokens [B, T].

    A clip is (stream, first frame) for n_frames consecutive frames, or (stream, frame indices
    [n_frames]) for a gap clip (`gap_clips`: questions on its last frame, `gap_turns`). With
    `augment`, each clip is mirrored and/or played backwards at random (`augment`), truths,
    text and labels with it."""
    clips = [(d, np.arange(a, a + n_frames) if isinstance(a, (int, np.integer)) else np.asarray(a))
             for d, a in clips]
    seqs, motion, views, patch, slot_y = [], [], [], [], []
    for d, idx in clips:
        stride = abs(int(idx[1] - idx[0])) if len(idx) > 1 else 1  # source frames between clip frames
        mirror, reverse = A.draw(rng) if augment else (False, False)
        truths = [d["truths"][i] for i in idx]
        if reverse:
            idx = idx[::-1]
            truths = A.reverse_truths(truths)
        if mirror:
            truths = A.mirror_truths(truths, d["width"])
        take = mx.array(idx.astype(np.int32))
        if mirror or reverse:  # the stored labels are the rendered clip's: recompute from the new truths
            slots = np.stack([slot_labels(t) for t in truths])
            slot_y.append(mx.array(slots))
        else:
            slots = d["slots_np"][idx]
            slot_y.append(d["slots"][take])
        v, p = d["views"][take], d["patch"][take]
        if mirror:
            nh, nw = v.shape[1] // 14, v.shape[2] // 14
            v, p = A.flip_views(v), A.flip_patch_labels(p, nh, nw)
        views.append(v)
        patch.append(p)
        if stride > 1:
            turns = gap_turns(truths, rng)
        else:
            turns = D.make_turns(truths, d["fps"], rng, dense=rng.random() < dense)
            if dense >= 1.0 and not any(t.frame == len(truths) - 1 for t in turns):
                for _ in range(int(rng.integers(1, 4))):  # short clips always end with questions
                    qa = D.make_question(truths[-1], rng)
                    turns.append(D.Turn(len(truths) - 1, "question", qa.question, qa.answer, qa=qa))
        system = SESSION_SYSTEM_PROMPT if rng.random() < 0.6 else D._pick(rng, D.SYSTEM_PROMPTS)
        seqs.append(builder.build(n_frames, turns, system, max_tokens=max_tokens))
        motion.append(motion_targets(slots, d["fps"] / stride))  # fps per clip frame
    out = {"views": mx.concatenate(views), "patch_y": mx.concatenate(patch), "slot_y": mx.concatenate(slot_y),
           "motion_y": mx.array(np.concatenate([y for y, _ in motion])),
           "motion_m": mx.array(np.concatenate([m for _, m in motion]))}
    out.update(token_arrays(seqs, builder.pad, builder.unk, n_frames))
    return out


def motion_targets(slots: np.ndarray, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """Slot labels of one clip [F, Q, SLOT_COLS] -> motion ids [F, Q] int32 and mask [F, Q] float32.

    A slot's motion is a target once the clip shows it: a mover that has gone MOTION_MIN_SHIFT
    frame sizes since its first frame in the clip, a still object after as many frames as the
    slowest mover needs for that shift (before that, still and slow look the same)."""
    F = slots.shape[0]
    y = slots[..., 6].astype(np.int32)
    m = np.zeros(slots.shape[:2], np.float32)
    first: dict[int, tuple[int, float, float]] = {}  # object id -> (frame, x, y) first seen in the clip
    still = MOTIONS.index("still")
    need = MOTION_MIN_SHIFT * fps / D.SPEED_RANGE[0]  # frames a still object must be watched
    for f in range(F):
        for k in np.flatnonzero(slots[f, :, 0] > 0.5):
            oid = int(slots[f, k, 5])
            f0, x0, y0 = first.setdefault(oid, (f, float(slots[f, k, 3]), float(slots[f, k, 4])))
            if y[f, k] == still:
                m[f, k] = float(f - f0 >= need)
            else:
                m[f, k] = float(max(abs(slots[f, k, 3] - x0), abs(slots[f, k, 4] - y0)) >= MOTION_MIN_SHIFT)
    return y, m


def token_arrays(seqs: list[tuple[list[int], list[int]]], pad: int, unk: int | None, n_frames: int = 0) -> dict:
    T = max(len(ids) for ids, _ in seqs)
    B = len(seqs)
    ids = np.full((B, T + 1), pad, np.int32)
    mask = np.zeros((B, T + 1), np.float32)
    for b, (s, l) in enumerate(seqs):
        ids[b, :len(s)] = s
        mask[b, :len(l)] = l
    inputs, targets, loss_mask = ids[:, :-1], ids[:, 1:], mask[:, 1:]
    out = {"inputs": inputs, "targets": targets, "loss_mask": loss_mask}
    if unk is not None:
        is_img = inputs == unk
        # the k-th <unk> of clip b is query k % Q of frame k // Q: an index into [B*F*Q] features
        slot = np.cumsum(is_img, axis=1) - 1
        out["is_img"] = is_img
        out["slot"] = np.where(is_img, slot + np.arange(B)[:, None] * n_frames * QUERY_NUM, 0).astype(np.int32)
    return {k: mx.array(v) for k, v in out.items()}


def text_batch(builder: SequenceBuilder, rng: np.random.Generator, rows: int) -> dict:
    seqs = []
    for _ in range(rows):
        r = rng.random()
        make = D.title_example if r < 0.45 else D.summary_example if r < 0.7 else D.log_question_example
        prompt, reply = make(rng)
        system = SESSION_SYSTEM_PROMPT if rng.random() < 0.7 else D._pick(rng, D.SYSTEM_PROMPTS)
        seqs.append(builder.build_text(system, prompt, reply))
    a = token_arrays(seqs, builder.pad, None)
    return {"t_inputs": a["inputs"], "t_targets": a["targets"], "t_mask": a["loss_mask"]}


BATCH_ORDER = ("views", "patch_y", "slot_y", "inputs", "targets", "loss_mask", "is_img", "slot",
               "motion_y", "motion_m", "t_inputs", "t_targets", "t_mask")


# ---------------------------------------------------------------- measuring grounding


def content_table(tok) -> np.ndarray:
    """[vocab + slack] bool: the token is a content word of some attribute (colour, shape, ...)."""
    words = [tok.decode([i]).strip().lower().strip(".,") for i in range(tok.get_vocab_size())]
    every = set().union(*CONTENT_WORDS.values())
    return np.array([w in every for w in words] + [False] * 4096)


def weight_content(batch: dict, table: np.ndarray) -> None:
    """Reply tokens that name what is seen weigh CONTENT_WEIGHT: the grammar is easy, seeing is not."""
    t = np.array(batch["targets"])
    batch["loss_mask"] = batch["loss_mask"] * mx.array(1.0 + (CONTENT_WEIGHT - 1.0) * table[t])


def content_masks(tok, targets: mx.array, loss_mask: mx.array) -> dict[str, mx.array]:
    """[B, T] masks of reply tokens that are a content word of each attribute."""
    vocab = tok.get_vocab_size()
    words = [tok.decode([i]).strip().lower().strip(".,") for i in range(vocab)]
    out = {}
    t = np.array(targets)
    for name, ws in CONTENT_WORDS.items():
        table = np.array([w in ws for w in words] + [False] * 4096)
        out[name] = mx.array(table[t]) * loss_mask
    return out


def attention_mass(model: DemoVLM, h: mx.array, is_img: mx.array, loss_mask: mx.array) -> list[float]:
    """Per decoder layer: the share of attention that reply tokens give to image tokens."""
    from framecast.model.lm.base import causal_mask

    out = []
    T = h.shape[1]
    causal = mx.tril(mx.ones((T, T), dtype=mx.bool_))
    for layer in model.llm.layers:
        a = layer.self_attn
        x = layer.input_layernorm(h)
        B = x.shape[0]
        q = a.rope(a.q_proj(x).reshape(B, T, a.n_heads, a.head_dim).transpose(0, 2, 1, 3))
        k = a.rope(a.k_proj(x).reshape(B, T, a.n_kv_heads, a.head_dim).transpose(0, 2, 1, 3))
        k = mx.repeat(k, a.n_heads // a.n_kv_heads, axis=1)
        s = (q * a.scale) @ k.transpose(0, 1, 3, 2)  # [B, H, T, T]
        p = mx.softmax(mx.where(causal, s, -1e9), axis=-1)
        mass = (p * is_img[:, None, None, :]).sum(-1).mean(1)  # [B, T]
        out.append(float((mass * loss_mask).sum() / mx.maximum(loss_mask.sum(), 1)))
        h = layer(h, causal_mask(T), None)
    return out


def grounding_report(model: DemoVLM, batch: dict, tok, n_frames: int) -> dict:
    """Held-out CE and accuracy on content tokens with real vs shuffled features (features of
    another clip), vision-head accuracies with their trivial baselines, attention mass."""
    hidden, grid = vision_hidden(model, batch["views"])
    feats = resample(model, hidden, grid)
    _, _, pl, sl = vision_losses(model, hidden, feats, batch["patch_y"], batch["slot_y"])
    rep = {}
    yc, ys = batch["patch_y"][..., 0].astype(mx.int32), batch["patch_y"][..., 1].astype(mx.int32)
    objp = yc > 0
    n_obj = mx.maximum(objp.sum(), 1)
    rep["patch_colour_acc"] = float(((mx.argmax(pl[..., :1 + N_COL], -1) == yc) * objp).sum() / n_obj)
    rep["patch_shape_acc"] = float(((mx.argmax(pl[..., 1 + N_COL:2 + N_COL + N_SHP], -1) == ys) * objp).sum() / n_obj)
    rep["patch_centre_err"] = float(mx.sqrt((((mx.sigmoid(pl[..., -2:]) - batch["patch_y"][..., 4:6]) ** 2).sum(-1)
                                             * objp).sum() / n_obj))
    rep["patch_bg_acc"] = float(((mx.argmax(pl[..., :1 + N_COL], -1) == 0) * (1 - objp)).sum() / mx.maximum((1 - objp).sum(), 1))
    obj = batch["slot_y"][..., 0]
    rep["slot_obj_acc"] = float(((sl[..., 0] > 0) == (obj > 0.5)).mean())
    rep["slot_obj_baseline"] = float(1 - obj.mean())  # always "empty"
    occ = mx.maximum(obj.sum(), 1)
    rep["slot_colour_acc"] = float(((mx.argmax(sl[..., 1:1 + N_COL], -1) == batch["slot_y"][..., 1]) * obj).sum() / occ)
    rep["slot_shape_acc"] = float(((mx.argmax(sl[..., 1 + N_COL:1 + N_COL + N_SHP], -1) == batch["slot_y"][..., 2])
                                   * obj).sum() / occ)
    rep["slot_xy_err"] = float(mx.sqrt((((mx.sigmoid(sl[..., -2:]) - batch["slot_y"][..., 3:5]) ** 2).sum(-1) * obj).sum() / occ))
    B = batch["inputs"].shape[0]
    shuffled = feats.reshape(B, n_frames, *feats.shape[1:])
    shuffled = mx.concatenate([shuffled[1:], shuffled[:1]]).reshape(feats.shape)  # clip b sees clip b+1
    masks = content_masks(tok, batch["targets"], batch["loss_mask"])
    for tag, f in (("real", feats), ("shuf", shuffled)):
        logits, mid = lm_forward(model, lm_inputs(model, f, batch["inputs"], batch["is_img"], batch["slot"]))
        _, ml, my, mm = motion_loss(model, mid, batch["is_img"], batch["slot"], batch["motion_y"], batch["motion_m"])
        rep[f"motion_probe_acc_{tag}"] = float(((mx.argmax(ml, -1) == my) * mm).sum() / mx.maximum(mm.sum(), 1))
        if tag == "real":  # always the most common motion among the targets
            counts = mx.stack([((my == c) * mm).sum() for c in range(N_MOT)])
            rep["motion_probe_baseline"] = float(counts.max() / mx.maximum(mm.sum(), 1))
        ce = nn.losses.cross_entropy(logits, batch["targets"], reduction="none")
        right = mx.argmax(logits, -1) == batch["targets"]
        rep[f"ce_{tag}"] = float((ce * batch["loss_mask"]).sum() / mx.maximum(batch["loss_mask"].sum(), 1))
        for name, m in masks.items():
            n = mx.maximum(m.sum(), 1)
            rep[f"{name}_acc_{tag}"] = float((right * m).sum() / n)
            rep[f"{name}_ce_{tag}"] = float((ce * m).sum() / n)
    flat = feats.reshape(-1, feats.shape[-1])
    h = mx.where(batch["is_img"][..., None], flat[batch["slot"]], model.llm.embed_tokens(batch["inputs"]))
    rep["attn_img"] = [round(x, 3) for x in attention_mass(model, h, batch["is_img"], batch["loss_mask"])]
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rep.items()}


SEEN_KEYS = ("ce_real", "colour_acc_real", "shape_acc_real", "position_acc_real", "motion_acc_real",
             "motion_acc_shuf", "motion_probe_acc_real", "motion_probe_acc_shuf")


def format_seen(rep: dict) -> str:
    """The report's line for training streams (`SEEN_KEYS`, as `seen_*`)."""
    r = {k: rep[f"seen_{k}"] for k in SEEN_KEYS}
    return (f"  training streams: ce {r['ce_real']:.3f}; content acc col {r['colour_acc_real']:.2f} "
            f"sha {r['shape_acc_real']:.2f} pos {r['position_acc_real']:.2f} mot {r['motion_acc_real']:.2f} "
            f"(shuffled {r['motion_acc_shuf']:.2f}); motion probe {r['motion_probe_acc_real']:.2f} "
            f"(shuffled {r['motion_probe_acc_shuf']:.2f})")


def format_report(step: int, rep: dict) -> str:
    c = " ".join(f"{n[:3]} {rep[f'{n}_acc_real']:.2f}/{rep[f'{n}_acc_shuf']:.2f}" for n in CONTENT_WORDS)
    return (f"  held-out: ce {rep['ce_real']:.3f} (shuffled {rep['ce_shuf']:.3f}); content acc real/shuffled: {c}\n"
            f"  vision: patch colour {rep['patch_colour_acc']:.2f} shape {rep['patch_shape_acc']:.2f} "
            f"(always-background 0.00; bg acc {rep['patch_bg_acc']:.2f}) centre err {rep['patch_centre_err']:.3f}; slot obj {rep['slot_obj_acc']:.2f} "
            f"(always-empty {rep['slot_obj_baseline']:.2f}) colour {rep['slot_colour_acc']:.2f} shape "
            f"{rep['slot_shape_acc']:.2f} (chance {1 / N_COL:.2f}/{1 / N_SHP:.2f}) xy err {rep['slot_xy_err']:.3f}; "
            f"motion probe {rep['motion_probe_acc_real']:.2f} (shuffled {rep['motion_probe_acc_shuf']:.2f}, "
            f"majority {rep['motion_probe_baseline']:.2f}); "
            f"attention on image tokens per layer {rep['attn_img']}")


# ---------------------------------------------------------------- checkpoints


def load_hf_weights(model: DemoVLM, directory: Path) -> None:
    """Start from an HF-layout checkpoint this trainer wrote (the inverse of `hf_weights`)."""
    w = mx.load(str(Path(directory) / "model.safetensors"))
    out = {}
    for k, v in w.items():
        v = v.astype(mx.float32)
        if k == "vpm.embeddings.patch_embedding.weight":  # Conv2d [D, 3, p, p] -> Linear [D, p*p*3]
            v = v.transpose(0, 2, 3, 1).reshape(v.shape[0], -1)
        if k.startswith("resampler.attn.in_proj_"):
            kind = k.rsplit("_", 1)[1]
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), mx.split(v, 3, axis=0)):
                out[f"resampler.attn.{part}.{kind}"] = chunk
            continue
        out[k] = v
    ours = dict(tree_flatten(model.parameters()))
    for k, v in out.items():
        if k not in ours:
            raise ValueError(f"{directory}: weight {k!r} has no place in this model (not a demo model of this trainer?)")
        if tuple(v.shape) != tuple(ours[k].shape):
            raise ValueError(f"{directory}: weight {k!r} is {tuple(v.shape)}, this model's is {tuple(ours[k].shape)} "
                             "(another size: --tiny?)")
    model.load_weights(list(out.items()), strict=False)


def save_checkpoint(path: Path, model: DemoVLM, opt, state: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    mx.save_safetensors(str(path / "optimizer.safetensors"),
                        {k: v for k, v in tree_flatten(opt.state) if isinstance(v, mx.array)})
    (path / "state.json").write_text(json.dumps(state))


def load_checkpoint(path: Path, model: DemoVLM, opt) -> dict | None:
    if not (path / "state.json").is_file():
        return None
    model.load_weights(list(mx.load(str(path / "model.safetensors")).items()), strict=True)
    if (path / "optimizer.safetensors").is_file():
        opt.state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
    return json.loads((path / "state.json").read_text())


def export(out: Path, model: DemoVLM, a, state: dict, n_params: int, t_data: float, tok, cfg: dict) -> None:
    """The shipped files: config, tokenizer and processor files, float16 HF weights and
    training.json (recipe, time, the whole log). All are written to `out/.partial/` first, then
    each replaces its old self, so a crash never leaves a config of one model beside the
    weights of another (`--out pipeline/demo_model` overwrites the shipped model)."""
    staging = out / ".partial"
    staging.mkdir(parents=True, exist_ok=True)
    write_tokenizer_files(staging, tok, cfg)
    mx.save_safetensors(str(staging / "model.safetensors"), hf_weights(model, mx.float16), metadata={"format": "pt"})
    (staging / "training.json").write_text(json.dumps({
        "seed": a.seed, "data_seed": a.data_seed, "steps": state["step"], "batch": a.batch, "streams": a.streams, "frames": a.frames,
        "max_clip": a.max_clip, "max_tokens": a.max_tokens, "lr": a.lr, "vision_lr_scale": a.vision_lr_scale,
        "codec": a.codec, "init_from": a.init_from, "vision_phase": a.vision_phase,
        "motion_phase": a.motion_phase, "gap_phase": a.gap_phase,
        "gap_mix": a.gap_mix, "augment": a.augment, "refresh": a.refresh,
        "streams_refreshed": state.get("refreshed", 0),
        "short_phase": a.short_phase, "motion_weight": a.motion_weight, "text_weight": a.text_weight,
        "text_rows": a.text_rows,
        "params": n_params, "data_s": round(t_data, 1), "train_s": round(state["train_s"], 1),
        "time_budget": a.time_budget, "device": str(mx.default_device()), "command": a.command,
        # every run this model descends from (its --init-from chain), this one last
        "lineage": a.parent_lineage + [{"run": str(out), "command": a.command, "init_from": a.init_from,
                                        "seed": a.seed, "data_seed": a.data_seed, "steps": state["step"], "train_s": round(state["train_s"], 1),
                                        "data_s": round(t_data, 1), "device": str(mx.default_device())}],
        "history": state["history"],
    }, indent=1) + "\n")
    for f in sorted(staging.iterdir()):
        os.replace(f, out / f.name)
    staging.rmdir()


def resumed_next_seed(a, block: int) -> int:
    """--refresh: the first seed a run renders, `block` or, when --ckpt holds a stopped run of
    the same data seed, the seed after every one that run started."""
    state = Path(a.ckpt) / "state.json" if a.ckpt else None
    if state is None or not state.is_file():
        return block
    seed = json.loads(state.read_text()).get("next_seed")
    return seed if isinstance(seed, int) and block <= seed < block + STREAMS_PER_DATA_SEED else block


def long_clip_frames(frac: float, a) -> int:
    """Longest clip at run fraction `frac` of the long phase: SHORT_FRAMES -> --max-clip over LONG_RAMP."""
    start = a.vision_phase + a.motion_phase + a.gap_phase + a.short_phase
    ramp = min(1.0, max(0.0, (frac - start) / max(LONG_RAMP * (1.0 - start), 1e-9)))
    return max(SHORT_FRAMES, int(round(SHORT_FRAMES + ramp * (a.max_clip - SHORT_FRAMES))))


def parent_lineage(directory: Path) -> list[dict]:
    """The runs a model directory descends from, from its training.json (read once, before this
    run's exports can overwrite it): its `lineage`, or one entry for a file written without one."""
    f = directory / "training.json"
    if not f.is_file():
        return [{"run": str(directory), "note": "no training.json"}]
    info = json.loads(f.read_text())
    if info.get("lineage"):
        return list(info["lineage"])
    return [{"run": str(directory), **{k: info.get(k) for k in ("command", "init_from", "steps", "train_s", "data_s",
                                                                 "device")}}]


def settle_seeds(a) -> str | None:
    """Fill in --seed and --data-seed (see --help); one line naming what is wrong, or None.
    Runs written before the lineage kept seeds count as seed 0 (runs A-E all were)."""
    parent_seed = None
    if a.init_from:
        info = json.loads((Path(a.init_from) / "training.json").read_text()) \
            if (Path(a.init_from) / "training.json").is_file() else {}
        parent_seed = int(info.get("seed", 0))
    if a.seed is None:
        a.seed = parent_seed if parent_seed is not None else 0
    if not 0 <= a.seed < MAX_SEED:
        return f"--seed {a.seed}: from 0 to {MAX_SEED - 1}"
    if parent_seed is not None and a.seed != parent_seed:
        return (f"--seed {a.seed}: {a.init_from}'s tokenizer was fitted with seed {parent_seed}; another seed "
                "would renumber its vocabulary (--data-seed picks other streams)")
    if a.data_seed is None:
        used = [int(e.get("data_seed", e.get("seed", 0)) or 0) for e in a.parent_lineage]
        a.data_seed = max(used) + 1 if a.init_from else a.seed
    if not 0 <= a.data_seed < MAX_SEED:
        return f"--data-seed {a.data_seed}: from 0 to {MAX_SEED - 1}"
    return None


def shape_mismatch(theirs: dict, ours: dict) -> str | None:
    """The first config field that makes a model directory's weights unusable here, or None."""
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "query_num"):
        if theirs.get(key) != ours[key]:
            return f"{key} is {theirs.get(key)!r}, this model's is {ours[key]!r} (another size: --tiny?)"
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "patch_size", "image_size"):
        if theirs.get("vision_config", {}).get(key) != ours["vision_config"][key]:
            return (f"vision_config.{key} is {theirs.get('vision_config', {}).get(key)!r}, "
                    f"this model's is {ours['vision_config'][key]!r}")
    return None


def check_args(a) -> str | None:
    """One line naming the first bad option, or None: checked before the data (a minute on the
    GPU machine) is generated."""
    for name in ("time_budget", "lr", "vision_lr_scale"):
        v = getattr(a, name)
        if not 0 < v < math.inf:  # NaN fails too
            return f"--{name.replace('_', '-')} {v}: must be above 0"
    if a.stop_after is not None and not 0 < a.stop_after < math.inf:
        return f"--stop-after {a.stop_after}: must be above 0 (seconds)"
    if a.max_steps < 1:
        return f"--max-steps {a.max_steps}: must be at least 1"
    if a.max_tokens < MIN_CLIP_TOKENS:  # the session budget it becomes: prefix, a frame, a reply
        return f"--max-tokens {a.max_tokens}: at least {MIN_CLIP_TOKENS} (the session budget the model ships with)"
    for name in ("streams", "frames", "max_clip", "batch", "workers", "max_tokens", "log_every", "text_rows"):
        v = getattr(a, name)
        if v < 1:
            return f"--{name.replace('_', '-')} {v}: must be at least 1"
    for name in ("motion_weight", "text_weight"):
        v = getattr(a, name)
        if not 0 <= v <= MAX_LOSS_WEIGHT:  # NaN and inf fail too
            return f"--{name.replace('_', '-')} {v}: must be from 0 to {MAX_LOSS_WEIGHT:g}"
    if a.text_rows > MAX_TEXT_ROWS:
        return f"--text-rows {a.text_rows}: at most {MAX_TEXT_ROWS} a step"
    if a.streams > STREAMS_PER_DATA_SEED:  # the next data seed's streams would be the same ones
        return f"--streams {a.streams}: at most {STREAMS_PER_DATA_SEED} (one data seed's block of stream seeds)"

    for name in ("vision_phase", "motion_phase", "gap_phase", "short_phase", "gap_mix"):
        v = getattr(a, name)
        if not 0.0 <= v <= 1.0:
            return f"--{name.replace('_', '-')} {v}: a share of the run, from 0 to 1"
    if a.frames < max(SHORT_FRAMES, a.max_clip):  # clips are windows of a stream's frames
        return f"--frames {a.frames}: each stream needs at least --max-clip ({a.max_clip}) and {SHORT_FRAMES} frames"
    if a.vision_phase + a.motion_phase + a.gap_phase + a.short_phase > 1.0:
        return (f"--vision-phase {a.vision_phase} + --motion-phase {a.motion_phase} + --gap-phase {a.gap_phase} "
                f"+ --short-phase {a.short_phase} is more than the whole run (1)")
    if a.motion_phase > 0 and a.motion_weight == 0:
        return "--motion-phase trains the motion probe alone: it needs --motion-weight above 0"
    for name in ("gap_phase", "gap_mix"):
        if getattr(a, name) > 0 and a.frames <= GAP_FRAMES[1]:
            return f"--frames {a.frames}: a --{name.replace('_', '-')} clip needs more than {GAP_FRAMES[1]} frames per stream"
    if a.deadline is not None and a.deadline <= time.time():
        return f"--deadline {a.deadline:.0f} is already past (now {time.time():.0f}, unix seconds)"
    if a.init_from is not None:
        init = Path(a.init_from)
        for f in ("config.json", "model.safetensors"):
            if not (init / f).is_file():
                return f"--init-from {init}: no {f} there (a model directory this trainer wrote)"
    return None


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m framecast.stages.demo_training.train", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", required=True,
                    help=f"model directory to write (the shipped one is {DEMO_MODEL_DIR}: name it to replace it)")
    ap.add_argument("--seed", type=int, default=None,
                    help="tokenizer, init and batch order (and data: --data-seed); default 0, and an --init-from "
                         "model's own (its tokenizer was fitted with it: another seed would renumber the vocabulary)")
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
                    help="keep rendering new training streams in --workers background processes while training "
                         "and swap each in for the oldest of the pool, so no stream is trained on for long "
                         "(off by default: batches then depend on the workers' timing)")
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
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(a.seed)
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
    data = generate_streams(stream_jobs(train_seeds + val_seeds, a.frames, a.codec), a.workers)
    val_data = [d for d in data if d["seed"] >= 900_000 and d["seed"] < 1_000_000]
    shape0 = val_data[0]["views"].shape
    val = Pool([d for d in val_data if d["views"].shape == shape0])
    pool = Pool([d for d in data if d["seed"] >= 1_000_000])
    del data, val_data
    t_data = time.time() - t0
    print(f"data: {a.streams} streams x {a.frames} frames ({a.codec}) in {t_data:.1f}s; view sizes "
          f"{dict(zip(pool.keys, pool.sizes.astype(int).tolist()))}", flush=True)

    mx.random.seed(a.seed)
    model = DemoVLM(cfg, word_ids(tok))
    mx.eval(model.parameters())
    if a.init_from:
        try:
            load_hf_weights(model, Path(a.init_from))
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
    val_batch = make_batch(val.clips(vrng, 12, val_frames), val_frames, builder, vrng, dense=0.3,
                           max_tokens=a.max_tokens)
    val_batch.update(text_batch(builder, vrng, 4))
    # the same report on streams it trains on: a gap to the held-out one is memorisation
    seen_batch = make_batch(pool.clips(vrng, 12, val_frames), val_frames, builder, vrng, dense=0.3,
                            max_tokens=a.max_tokens)
    seen_batch.update(text_batch(builder, vrng, 4))

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
                                    workers=a.workers)
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
                    srng = np.random.default_rng(step)
                    seen_batch = make_batch(pool.clips(srng, 12, val_frames), val_frames, builder, srng, dense=0.3,
                                            max_tokens=a.max_tokens)
                    seen_batch.update(text_batch(builder, srng, 4))
                seen = grounding_report(model, seen_batch, tok, val_frames)
                rep.update({f"seen_{k}": seen[k] for k in SEEN_KEYS})
                history.append({"step": step, "s": round(el, 1), "refreshed": state.get("refreshed", 0),
                                "loss": round(float(m[0]), 4),
                                "reply_ce": round(float(m[1]), 4), "text_ce": round(float(m[2]), 4),
                                "patch": round(float(m[3]), 4), "slot": round(float(m[4]), 4),
                                "motion": round(float(m[5]), 4), **rep})
                print(f"step {step:5d} {el:6.0f}s lr {lr:.1e}  loss {m[0]:.3f} (reply {m[1]:.3f} text {m[2]:.3f} "
                      f"patch {m[3]:.3f} slot {m[4]:.3f} motion {m[5]:.3f})\n" + format_report(step, rep)
                      + "\n" + format_seen(rep)
                      + (f"\n  refreshed: {state.get('refreshed', 0)} new streams so far (pool {len(pool)})"
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
