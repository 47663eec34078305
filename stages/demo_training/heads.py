"""The demo VLM as trained: the engine's MiniCPM-V modules plus training-only read-outs
(patch, slot and motion heads), the forward passes and losses, and the HF-layout weights in and out."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from framecast.stages.sources.scene import COLOURS, SHAPES
from framecast.stages.demo_training.spec import (
    MOTION_LAYER, MOTION_WEIGHT, N_COL, N_MOT, N_SHP, OBJECT_PATCH_WEIGHT, PATCH_OUT, PATCH_WEIGHT, SLOT_SCALE,
    SLOT_WEIGHT, TEXT_WEIGHT,
)

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


def load_hf_weights(model: DemoVLM, directory: Path, tok=None) -> None:
    """Start from an HF-layout checkpoint this trainer wrote (the inverse of `hf_weights`). With
    `tok`, the directory's tokenizer.json must number every token as `tok` does (read a model
    with `spec.model_tokenizer`): weights read through another numbering are scrambled words.
    Raises ValueError (one line) for a missing file, a weight of another name or size, or
    another tokenizer."""
    directory = Path(directory)
    if not (directory / "model.safetensors").is_file():
        raise ValueError(f"{directory}: no model.safetensors there")
    if tok is not None:
        theirs = json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"] \
            if (directory / "tokenizer.json").is_file() else None
        ours = tok.get_vocab(with_added_tokens=False)
        if theirs is not None and theirs != ours:
            differ = sum(theirs.get(t) != i for t, i in ours.items())
            raise ValueError(f"{directory}: its tokenizer.json numbers {differ} of {len(ours)} tokens otherwise "
                             "than this one (read the model with its own tokenizer)")
    w = mx.load(str(directory / "model.safetensors"))
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
