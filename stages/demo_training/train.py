"""Train the embedded demo model: a tiny MiniCPM-V (2.6 layout) that narrates synthetic shapes.

    python scripts/train_demo_model.py --out pipeline/demo_model [--steps N] [--streams N] ...

Exactly the MiniCPM-V architecture and the engine's own classes (`framecast.model.vlm`): a small
SigLIP NaViT tower, the 2D resampler with few queries and a small qwen2 decoder, plus a
byte-level BPE `tokenizers` tokenizer fitted to the grammar's vocabulary with the special
tokens the processor needs. Deterministic from `--seed` (data, init, batches).

Training examples use the STREAMING layout of the session (`framecast.engine.layout`), token for
token: the prefix, then one `{image placeholder}\\n` span per frame, and at random points a turn
`{prompt}<|im_end|>\\n<|im_start|>assistant\\n{reply}<|im_end|>\\n<|im_start|>user\\n` (several
turns per stream). The loss is on the replies and their `<|im_end|>` only.

Data (`data.py`): scenes from `framecast.stages.sources.scene`, rendered at several resolutions,
through a PyAV h264/mpeg4 round trip, resized by the engine's processor; generated once in a
process pool, then every step draws streams and a fresh turn schedule.

Writes an HF-layout checkpoint: config.json, preprocessor_config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, generation_config.json, training.json (the recipe and
the measured time). Imports only what the GPU machine has (mlx, numpy, cv2, av, PIL, tokenizers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from framecast.model.load import DEMO_MODEL_DIR  # noqa: E402
import framecast  # noqa: E402,F401  (OpenBLAS preload before mlx)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import framecast.stages.demo_training.data as D  # noqa: E402
from framecast.engine.layout import (  # noqa: E402
    CLOSE_TEXT,
    DEFAULT_ASSISTANT_PREFIX,
    DEFAULT_SYSTEM_PROMPT,
    TURN_END,
)

SPECIAL_TOKENS = [
    "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>",
    "<image>", "</image>", "<slice>", "</slice>", "<image_id>", "</image_id>",
    "<think>", "</think>", "<ref>", "</ref>", "<box>", "</box>",
]
# the session's streaming layout, token for token (one definition: framecast.engine.layout)
SESSION_SYSTEM_PROMPT = DEFAULT_SYSTEM_PROMPT
ASSISTANT_PREFIX = DEFAULT_ASSISTANT_PREFIX

# model shape (tiny: CPU inference must beat real time)
VOCAB_SIZE = 640
SCALE_RESOLUTION = 196  # 14 x 14 patches for a square frame
QUERY_NUM = 16
VISION = dict(hidden_size=128, intermediate_size=512, num_attention_heads=2, num_hidden_layers=4,
              patch_size=14, image_size=224)  # 16 x 16 learned position grid
LLM = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=8192,
           rms_norm_eps=1e-6, tie_word_embeddings=True)

DEFAULT_STEPS = 100_000
DEMO_MAX_CACHE_TOKENS = 640  # session budget shipped in config.json (sinks + window eviction)
DEFAULT_BATCH = 16
DEFAULT_STREAMS = 1200
DEFAULT_FRAMES = 120
DEFAULT_LR = 1.5e-3
DENSE_SHARE = 0.5  # streams with a turn every 1-3 frames (direct signal for the vision tower)
DEFAULT_EMBED_LR_SCALE = 0.07  # learning-rate factor of the patch embedding (see main)
DEFAULT_VISION_LR_SCALE = 0.07  # of the rest of the vision tower (Adam + correlated inputs, see main)
DEFAULT_RESAMPLER_LR_SCALE = 0.07  # lr 1e-4 on the whole vision side: no collapse in 80 CPU steps
DEFAULT_VISION_WARMUP = 0.0
AUX_COLOURS = tuple(D.COLOURS)
AUX_SHAPES = tuple(D.SHAPES)
N_AUX = len(AUX_COLOURS) + len(AUX_SHAPES) + 9 + 4
AUX_WEIGHT = 2.0


# ---------------------------------------------------------------- tokenizer and config


def build_tokenizer(seed: int):
    """Byte-level BPE (any text encodes) fitted on the grammar's text + the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = D.corpus(6000, seed) + [SESSION_SYSTEM_PROMPT] + list(D.SYSTEM_PROMPTS)
    tok.train_from_iterator(texts, trainer)
    return tok


def model_config(tok) -> dict:
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab = -(-tok.get_vocab_size() // 64) * 64  # rows for every id, padded for the kernels
    return {
        "architectures": ["MiniCPMV"],
        "model_type": "minicpmv",
        "version": 2.6,
        **LLM,
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
                          "hidden_act": "gelu_pytorch_tanh", **VISION},
        "torch_dtype": "float32",
        "bos_token_id": None,
        "eos_token_id": ids["<|im_end|>"],
        "framecast_demo": True,
        # trained on short streams: `framecast run` keeps the cache within what the model has seen
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


# ---------------------------------------------------------------- data


def _make_stream_job(args: tuple[int, int, int, int]):
    """Worker: one stream -> (uint8 views [F, h, w, 3] at model resolution, truths, fps)."""
    seed, n_frames, scale, patch = args
    from framecast.model.processor import MiniCPMVProcessor

    proc = MiniCPMVProcessor(scale_resolution=scale, patch_size=patch, max_slice_nums=1, query_num=QUERY_NUM)
    s = D.make_stream(seed, n_frames)
    views = np.stack([resize_like_processor(proc, f) for f in s.frames])
    return seed, views, s.truths, s.fps


def resize_like_processor(proc, frame: np.ndarray) -> np.ndarray:
    """The processor's overview view of one frame, kept uint8 (normalised later, on the device)."""
    from PIL import Image

    overview, _rows, _grid = proc.slice_image(Image.fromarray(frame, "RGB"), 1)
    return np.asarray(overview, dtype=np.uint8)


def generate_streams(seeds: list[int], n_frames: int, workers: int) -> list[tuple]:
    jobs = [(s, n_frames, SCALE_RESOLUTION, 14) for s in seeds]
    if workers <= 1:
        return [_make_stream_job(j) for j in jobs]
    import multiprocessing as mp

    # spawn, not fork: the parent may already hold a GPU context
    with mp.get_context("spawn").Pool(workers) as pool:
        return pool.map(_make_stream_job, jobs, chunksize=4)


class SequenceBuilder:
    """Token ids of one training stream in the session's exact segmentation."""

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

    def build(self, n_frames: int, turns: list[D.Turn], system: str) -> tuple[list[int], list[int]]:
        """(ids, loss flags): flag 1 where the token is a target (reply + its <|im_end|>)."""
        ids = self.encode(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n")
        loss = [0] * len(ids)
        by_frame: dict[int, list[D.Turn]] = {}
        for t in turns:
            by_frame.setdefault(t.frame, []).append(t)
        for f in range(n_frames):
            ids += self.frame_ids
            loss += [0] * len(self.frame_ids)
            for t in by_frame.get(f, []):
                p = self.encode(t.prompt + TURN_END + ASSISTANT_PREFIX)
                r = self.encode(t.reply)
                ids += p + r + self.close_ids
                loss += [0] * len(p) + [1] * (len(r) + 1) + [0] * (len(self.close_ids) - 1)
        return ids, loss


# ---------------------------------------------------------------- model


class DemoVLM(nn.Module):
    """The engine's own modules (vision tower, resampler, qwen2 LM) under the HF prefixes.

    Training needs a batched forward over many streams at once; inference goes through
    `framecast.model.vlm` (loaded from the HF files this writes), which runs the same modules.
    `tests/test_demo_model.py` checks that both paths give the same features and logits.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        from framecast.model.lm import build_lm
        from framecast.model.resampler import Resampler
        from framecast.model.vision import SiglipVisionTower, VisionArgs

        self.vpm = SiglipVisionTower(VisionArgs.from_dict(cfg["vision_config"]))
        d, dv = cfg["hidden_size"], cfg["vision_config"]["hidden_size"]
        self.resampler = Resampler(embed_dim=d, kv_dim=dv, num_queries=cfg["query_num"])
        # HF init of the two bare parameters (the engine's zeros are placeholders for loading)
        self.resampler.query = 0.02 * mx.random.normal((cfg["query_num"], d))
        self.resampler.proj = d ** -0.5 * mx.random.normal((d, d))
        self.llm = build_lm({**cfg, "model_type": "qwen2"})
        # Training only (never saved): per-query logits of what a frame shows, max over the
        # queries. A direct signal for the vision tower: without it the LM first learns the
        # grammar, rewards a constant "image token" vector and the tower collapses (all
        # frames' features identical after ~25 steps, seen on GPU and CPU).
        self.aux = nn.Linear(d, N_AUX)


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


FEATURES = (0, 0)  # grid marker: `views` already are resampled features [N, Q, D]


def encode_views(model: DemoVLM, views: mx.array, grid: tuple[int, int] | None = None) -> mx.array:
    """uint8 views [N, h, w, 3] (or, with `grid`, precomputed vision hidden states) -> [N, Q, D]."""
    if grid == FEATURES:
        return views
    if grid is not None:
        return resample(model, views, grid)
    return resample(model, *vision_hidden(model, views))


def aux_labels(truths) -> np.ndarray:
    """[N_AUX] multi-hot of one frame: colours, shapes, 3x3 zones occupied, object count."""
    y = np.zeros(N_AUX, np.float32)
    for o in truths.objects:
        y[AUX_COLOURS.index(o.colour)] = 1
        y[len(AUX_COLOURS) + AUX_SHAPES.index(o.shape)] = 1
        y[len(AUX_COLOURS) + len(AUX_SHAPES) + min(int(o.y * 3), 2) * 3 + min(int(o.x * 3), 2)] = 1
    y[N_AUX - 4 + min(len(truths.objects), 3)] = 1
    return y


def loss_fn(model, inputs, targets, loss_mask, is_img, slot, aux_y, views, lm_to_vision: bool = True,
            grid: tuple[int, int] | None = None):
    feats = encode_views(model, views, grid)  # [B*F, Q, D]
    aux_logits = model.aux(feats).max(axis=1)  # [B*F, N_AUX]
    aux = nn.losses.binary_cross_entropy(aux_logits, aux_y, reduction="mean")
    if not lm_to_vision:  # warm-up phase: the vision side learns from the per-frame labels only
        feats = mx.stop_gradient(feats)
    flat = feats.reshape(-1, feats.shape[-1])  # [B*F*Q, D]
    text = model.llm.embed_tokens(inputs)  # [B, T, D]
    h = mx.where(is_img[..., None], flat[slot], text)  # features scattered into the <unk> slots
    logits = model.llm(input_embeddings=h)  # [B, T, V]
    ce = nn.losses.cross_entropy(logits, targets, reduction="none")
    return (ce * loss_mask).sum() / mx.maximum(loss_mask.sum(), 1.0) + AUX_WEIGHT * aux


# Weights fed by inputs that share one sign (pixels, GELU outputs, attention averages): Adam steps
# every weight of a row the same way, the row's sum (its response to a uniform input) grows by
# fan_in * lr per step, each layer adds one big vector common to all patches and the features
# collapse to a constant (measured: identical across frames within ~20 steps, GPU and CPU).
COMMON_MODE_WEIGHTS = ("patch_embedding.weight", "mlp.fc2.weight", "out_proj.weight", "resampler.proj")


def center_common_mode(grads: dict) -> dict:
    """Remove each row's mean from those weights' gradients (biases still learn offsets)."""
    def fix(path: str, g: mx.array) -> mx.array:
        if g.ndim == 2 and path.endswith(COMMON_MODE_WEIGHTS) and not path.startswith("llm."):
            axis = 0 if path.endswith("resampler.proj") else 1  # proj is used as x @ proj: [in, out]
            return g - g.mean(axis=axis, keepdims=True)
        return g
    from mlx.utils import tree_map_with_path

    return tree_map_with_path(lambda p, g: fix(p, g), grads)


def hf_weights(model: DemoVLM) -> dict[str, mx.array]:
    """Our parameters under HF names and layouts (the inverse of the engine's sanitize)."""
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
    return {k: mx.contiguous(v) for k, v in sorted(out.items())}


# ---------------------------------------------------------------- main


def lr_at(frac: float, peak: float, warmup_frac: float = 0.08, floor: float = 0.05) -> float:
    """Warmup then cosine decay over the fraction of the run done (steps or time budget)."""
    if frac < warmup_frac:
        return peak * max(frac / warmup_frac, 0.01)
    t = min(1.0, (frac - warmup_frac) / (1 - warmup_frac))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


class Buckets:
    """Streams grouped by view size; each stream one uint8 array on the device [F, h, w, 3]
    (one array per stream: a whole group would pass 2^31 elements, past int32 indexing)."""

    def __init__(self, data: list[tuple], n_frames: int):
        groups: dict[tuple[int, int], list[tuple]] = {}
        for item in data:
            groups.setdefault(item[1].shape[1:3], []).append(item)
        self.keys = sorted(groups)
        self.meta = {k: [(seed, truths, fps) for seed, _v, truths, fps in groups[k]] for k in self.keys}
        self.views = {k: [mx.array(v[:n_frames]) for _s, v, _t, _f in groups[k]] for k in self.keys}
        mx.eval([a for arrays in self.views.values() for a in arrays])
        self.sizes = np.array([len(groups[k]) for k in self.keys], np.float64)

    def precompute_vision(self, model: DemoVLM, chunk: int = 64, *, resampled: bool = False) -> None:
        """Frozen tower (and resampler): run it once per frame and keep its output, not the pixels."""
        self.grids = {}
        for k in self.keys:
            out = []
            for v in self.views[k]:
                hid = [vision_hidden(model, v[i:i + chunk]) for i in range(0, v.shape[0], chunk)]
                grid = hid[0][1]
                out.append(mx.concatenate([resample(model, h, grid) if resampled else h for h, _g in hid]))
                self.grids[k] = FEATURES if resampled else grid
                mx.eval(out[-1])
            self.views[k] = out

    def sample(self, rng: np.random.Generator, batch: int):
        key = self.keys[int(rng.choice(len(self.keys), p=self.sizes / self.sizes.sum()))]
        n = len(self.meta[key])
        idx = np.sort(rng.choice(n, size=min(batch, n), replace=False))
        views = mx.concatenate([self.views[key][i] for i in idx])  # [B*F, h, w, 3] or [B*F, L, Dv]
        self.last_grid = getattr(self, "grids", {}).get(key)
        return [self.meta[key][i] for i in idx], views


def batch_arrays(meta: list[tuple], builder: SequenceBuilder, rng: np.random.Generator, n_frames: int):
    """Token-side arrays of a batch (views come from `Buckets`)."""
    seqs = []
    for _seed, truths, fps in meta:
        turns = D.make_turns(truths[:n_frames], fps, rng, dense=rng.random() < DENSE_SHARE)
        system = SESSION_SYSTEM_PROMPT if rng.random() < 0.6 else D._pick(rng, D.SYSTEM_PROMPTS)
        seqs.append(builder.build(n_frames, turns, system))
    T = max(len(ids) for ids, _ in seqs)
    B = len(seqs)
    ids = np.full((B, T + 1), builder.pad, np.int32)
    mask = np.zeros((B, T + 1), np.float32)
    for b, (s, l) in enumerate(seqs):
        ids[b, :len(s)] = s
        mask[b, :len(l)] = l
    inputs, targets, loss_mask = ids[:, :-1], ids[:, 1:], mask[:, 1:]
    is_img = inputs == builder.unk
    # the k-th <unk> of stream b is query k % Q of frame k // Q: an index into [B*F*Q] features
    slot = np.cumsum(is_img, axis=1) - 1
    slot = np.where(is_img, slot + np.arange(B)[:, None] * n_frames * QUERY_NUM, 0).astype(np.int32)
    aux_y = np.stack([aux_labels(t) for _s, truths, _f in meta for t in truths[:n_frames]])  # [B*F, N_AUX]
    return [mx.array(x) for x in (inputs, targets, loss_mask, is_img, slot, aux_y)]


def reply_token_accuracy(model, arrays, views, grid=None) -> float:
    """Teacher-forced share of reply tokens predicted exactly (held-out streams), and the spread
    of the vision features across frames (near 0 = collapsed tower)."""
    inputs, targets, loss_mask, is_img, slot, aux_y = arrays
    feats = encode_views(model, views, grid)
    h = mx.where(is_img[..., None], feats.reshape(-1, feats.shape[-1])[slot], model.llm.embed_tokens(inputs))
    pred = mx.argmax(model.llm(input_embeddings=h), axis=-1)
    acc = float(((pred == targets) * loss_mask).sum() / loss_mask.sum())
    # collapse check: how much the features differ between frames, relative to their size
    spread = float(feats.std(axis=0).mean() / (mx.abs(feats).mean() + 1e-6))
    aux_acc = float(((model.aux(feats).max(axis=1) > 0) == (aux_y > 0.5)).mean())
    return acc, spread, aux_acc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEMO_MODEL_DIR))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="upper bound when --time-budget is given")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="train for this many seconds (the LR schedule follows time, not steps)")
    ap.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    ap.add_argument("--streams", type=int, default=DEFAULT_STREAMS)
    ap.add_argument("--frames", type=int, default=DEFAULT_FRAMES)
    ap.add_argument("--lr", type=float, default=DEFAULT_LR)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--embed-lr-scale", type=float, default=DEFAULT_EMBED_LR_SCALE)
    ap.add_argument("--vision-lr-scale", type=float, default=DEFAULT_VISION_LR_SCALE,
                    help="0 together with --embed-lr-scale 0: keep the tower as initialised (features computed once)")
    ap.add_argument("--resampler-lr-scale", type=float, default=DEFAULT_RESAMPLER_LR_SCALE)
    ap.add_argument("--init-lm-from", help="HF-layout model dir whose llm.* weights start the decoder")
    ap.add_argument("--vision-warmup", type=float, default=DEFAULT_VISION_WARMUP,
                    help="share of the run during which the LM loss does not reach the vision side")
    a = ap.parse_args(argv)

    t_start = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(a.seed)
    cfg = model_config(tok)
    write_tokenizer_files(out, tok, cfg)
    builder = SequenceBuilder(tok)
    print(f"tokenizer: {tok.get_vocab_size()} ids", flush=True)

    t0 = time.time()
    # Training seeds start at 1,000,000; evaluation uses small seeds (held out).
    train_seeds = [1_000_000 + a.seed * 100_000 + i for i in range(a.streams)]
    val_seeds = set(range(900_000, 900_000 + min(16, max(4, a.streams // 4))))
    data = generate_streams(train_seeds + sorted(val_seeds), a.frames, a.workers)
    val_data = [d for d in data if d[0] in val_seeds]
    val = Buckets([d for d in val_data if d[1].shape == val_data[0][1].shape], a.frames)  # one view size
    buckets = Buckets([d for d in data if d[0] not in val_seeds], a.frames)
    del data
    t_data = time.time() - t0
    print(f"data: {a.streams} streams x {a.frames} frames in {t_data:.1f}s; buckets "
          f"{dict(zip(buckets.keys, buckets.sizes.astype(int).tolist()))}", flush=True)

    mx.random.seed(a.seed)
    model = DemoVLM(cfg)
    mx.eval(model.parameters())
    if a.init_lm_from:  # start the decoder from an earlier run (its grammar), vision side fresh
        prev = {k[4:]: v for k, v in mx.load(str(Path(a.init_lm_from) / "model.safetensors")).items()
                if k.startswith("llm.")}
        model.llm.load_weights(list(prev.items()), strict=True)
        print(f"decoder initialised from {a.init_lm_from}", flush=True)
    frozen_vision = a.vision_lr_scale == 0 and a.embed_lr_scale == 0
    if frozen_vision:  # a random SigLIP tower kept as initialised: its features computed once
        model.vpm.freeze()
        if a.resampler_lr_scale == 0:
            model.resampler.freeze()
        t1 = time.time()
        buckets.precompute_vision(model, resampled=a.resampler_lr_scale == 0)
        val.precompute_vision(model, resampled=a.resampler_lr_scale == 0)
        print(f"frozen vision tower: features precomputed in {time.time() - t1:.0f}s", flush=True)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"model: {n_params / 1e6:.2f}M parameters; device {mx.default_device()}", flush=True)

    # The patch embedding sees 588 strongly correlated inputs (a flat background is one value
    # repeated): at the shared learning rate Adam moves every weight of a row the same way, the
    # rows' sums explode and the tower's output becomes one constant vector for every patch (seen:
    # features identical across frames after 1,368 steps). A much smaller rate there fixes it.
    scales = (a.embed_lr_scale, a.vision_lr_scale, a.resampler_lr_scale, 1.0)
    opt = optim.MultiOptimizer(
        [optim.AdamW(learning_rate=a.lr * sc, weight_decay=0.01) for sc in scales],
        [lambda path, _w: "patch_embedding" in path, lambda path, _w: path.startswith("vpm."),
         lambda path, _w: path.startswith("resampler.")])
    step_fn = nn.value_and_grad(model, loss_fn)
    rng = np.random.default_rng(a.seed)
    val_meta, val_views = val.sample(np.random.default_rng(1), 6)
    val_grid = val.last_grid
    val_arrays = batch_arrays(val_meta, builder, np.random.default_rng(2), a.frames)

    t_train = time.time()
    losses: list[float] = []
    history = []
    step = 0
    try:
        while step < a.steps:
            frac = (time.time() - t_train) / a.time_budget if a.time_budget else step / a.steps
            if frac >= 1.0:
                break
            step += 1
            lr = lr_at(frac, a.lr)
            for o, sc in zip(opt.optimizers, scales):
                o.learning_rate = lr * sc
            meta, views = buckets.sample(rng, a.batch)
            arrays = batch_arrays(meta, builder, rng, a.frames)
            loss, grads = step_fn(model, *arrays, views, frac >= a.vision_warmup, buckets.last_grid)
            grads = center_common_mode(grads)
            grads, _ = optim.clip_grad_norm(grads, 1.0)
            opt.update(model, grads)
            mx.eval(loss, model.parameters(), opt.state)
            losses.append(float(loss))
            if step % a.log_every == 0 or step == 1:
                el = time.time() - t_train
                acc, spread, aux_acc = reply_token_accuracy(model, val_arrays, val_views, val_grid)
                history.append({"step": step, "loss": round(float(np.mean(losses[-a.log_every:])), 4),
                                "val_token_acc": round(acc, 4),
                                "feature_spread": round(spread, 4), "aux_acc": round(aux_acc, 4), "s": round(el, 1)})
                print(f"step {step:5d}  loss {np.mean(losses[-a.log_every:]):.4f}  val reply-token acc {acc:.3f}  "
                      f"feature spread {spread:.3f}  aux acc {aux_acc:.3f}  lr {lr:.2e}  {el:.0f}s ({el / step:.3f}s/step)", flush=True)
    except KeyboardInterrupt:
        print(f"interrupted at step {step}: saving", flush=True)
    train_s = time.time() - t_train

    mx.save_safetensors(str(out / "model.safetensors"), hf_weights(model), metadata={"format": "pt"})
    (out / "training.json").write_text(json.dumps({
        "seed": a.seed, "steps": step, "batch": a.batch, "streams": a.streams, "frames": a.frames, "lr": a.lr,
        "params": n_params, "final_loss": float(np.mean(losses[-50:])) if losses else None,
        "data_s": round(t_data, 1), "train_s": round(train_s, 1), "total_s": round(time.time() - t_start, 1),
        "device": str(mx.default_device()), "history": history,
    }, indent=2) + "\n")
    print(f"saved {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB); "
          f"{step} steps, train {train_s:.0f}s, total {time.time() - t_start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
