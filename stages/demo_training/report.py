"""Measuring grounding during training: content-word accuracy with real against shuffled
features, attention mass on image tokens, the slot and motion read-outs, and their log lines."""

from __future__ import annotations

import time
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from framecast.stages.demo_training.spec import CONTENT_WORDS, N_COL, N_MOT, N_SHP
from framecast.stages.demo_training.heads import (
    DemoVLM, encode_views, lm_forward, lm_inputs, motion_loss, resample, vision_hidden, vision_losses,
)

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


def next_clips_features(feats: mx.array, clips: int, n_frames: int) -> mx.array:
    """Features [clips*F, Q, D] with clip b given clip b+1's (the last the first's): the
    shuffled-frames baseline of every grounding measurement."""
    f = feats.reshape(clips, n_frames, *feats.shape[1:])  # [clips, F, Q, D]
    return mx.concatenate([f[1:], f[:1]]).reshape(feats.shape)


def probe_tally(model: DemoVLM, mid: mx.array, batch: dict) -> tuple[float, np.ndarray]:
    """The motion probe on the decoder's residual stream `mid` [B, T, D]: (targets it gets
    right, targets per motion [N_MOT] float64, whose max is the majority-class baseline)."""
    _, ml, my, mm = motion_loss(model, mid, batch["is_img"], batch["slot"], batch["motion_y"], batch["motion_m"])
    right = float(((mx.argmax(ml, -1) == my) * mm).sum())
    counts = np.array(mx.stack([((my == c) * mm).sum() for c in range(N_MOT)]), dtype=np.float64)
    return right, counts


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
    shuffled = next_clips_features(feats, batch["inputs"].shape[0], n_frames)
    masks = content_masks(tok, batch["targets"], batch["loss_mask"])
    for tag, f in (("real", feats), ("shuf", shuffled)):
        logits, mid = lm_forward(model, lm_inputs(model, f, batch["inputs"], batch["is_img"], batch["slot"]))
        right, counts = probe_tally(model, mid, batch)
        rep[f"motion_probe_acc_{tag}"] = right / max(float(counts.sum()), 1.0)
        if tag == "real":  # always the most common motion among the targets
            rep["motion_probe_baseline"] = float(counts.max()) / max(float(counts.sum()), 1.0)
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


def motion_probe_report(model: DemoVLM, batches: list[dict], n_frames: int) -> dict:
    """The motion probe alone on many held-out clips (`batches`: one per view size, clips of
    `n_frames` frames): accuracy with real and shuffled features (clip b sees clip b+1's of its
    batch), the majority-class baseline, and its sample. The targets of one object are nearly
    the same question asked again, so the number of distinct objects, not of targets, says how
    far apart two accuracies must be to differ."""
    right = {"real": 0.0, "shuf": 0.0}
    counts = np.zeros(N_MOT)
    objects, clips = 0, 0
    for batch in batches:
        feats = encode_views(model, batch["views"])  # [B*F, Q, D]
        B = batch["inputs"].shape[0]
        for tag, f in (("real", feats), ("shuf", next_clips_features(feats, B, n_frames))):
            _, mid = lm_forward(model, lm_inputs(model, f, batch["inputs"], batch["is_img"], batch["slot"]))
            got, per_motion = probe_tally(model, mid, batch)
            right[tag] += got
            if tag == "real":
                counts += per_motion
        m = np.array(batch["motion_m"]) > 0  # [B*F, Q]
        ids = np.array(batch["slot_y"][..., 5]).astype(np.int64)  # [B*F, Q] object id in its stream
        clip = np.arange(m.shape[0])[:, None] // n_frames  # [B*F, 1]
        objects += len(set(zip(np.broadcast_to(clip, m.shape)[m].tolist(), ids[m].tolist())))
        clips += int(B)
    n = max(float(counts.sum()), 1.0)
    return {"acc_real": round(right["real"] / n, 4), "acc_shuf": round(right["shuf"] / n, 4),
            "baseline": round(float(counts.max()) / n, 4), "targets": int(counts.sum()), "objects": objects,
            "clips": clips}


def format_motion_probe(rep: dict) -> str:
    return (f"  motion probe, {rep['clips']} held-out clips ({rep['objects']} objects, {rep['targets']} targets): "
            f"{rep['acc_real']:.2f} (shuffled {rep['acc_shuf']:.2f}, majority {rep['baseline']:.2f})")


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


def train_with_reports(model: nn.Module, loss: Callable, next_batch: Callable[[np.random.Generator], dict], *,
                       lr: float, steps: int, seconds: float, log_every: int,
                       log: Callable[[int, float, float], None]) -> None:
    """The diagnosis scripts' training loop (`scripts/check_decoder_colour.py`,
    `check_decoder_motion.py`): AdamW (weight decay 0.01) on `loss(model, batch)` over the
    model's trainable parameters, gradients clipped to norm 1, batches `next_batch(rng)` (rng
    seeded 0), until `steps` steps or `seconds` s; `log(step, elapsed s, loss)` every `log_every`
    steps and after the last."""
    opt = optim.AdamW(learning_rate=lr, weight_decay=0.01)
    step = nn.value_and_grad(model, loss)
    rng = np.random.default_rng(0)
    t0 = time.time()
    for i in range(1, steps + 1):
        value, grads = step(model, next_batch(rng))
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        last = i == steps or time.time() - t0 > seconds
        if i % log_every == 0 or last:
            log(i, time.time() - t0, float(value))
        if last:
            return
