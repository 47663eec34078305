"""Token and label arrays of one training step: the session's exact token layout
(`SequenceBuilder`), clips turned into batches with replies and questions, the motion probe's
targets and the text-only conversations."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

import framecast.stages.demo_training.augment as A
import framecast.stages.demo_training.data as D
from framecast.engine.layout import CLOSE_TEXT, TURN_END
from framecast.stages.sources.scene import MOTIONS
from framecast.stages.demo_training.spec import (
    ASSISTANT_PREFIX, CONTENT_WEIGHT, CONTENT_WORDS, MOTION_MIN_SHIFT, QUERY_NUM, SESSION_SYSTEM_PROMPT,
)
from framecast.stages.demo_training.streams import slot_labels

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


def content_table(tok) -> np.ndarray:
    """[vocab + slack] bool: the token is a content word of some attribute (colour, shape, ...)."""
    words = [tok.decode([i]).strip().lower().strip(".,") for i in range(tok.get_vocab_size())]
    every = set().union(*CONTENT_WORDS.values())
    return np.array([w in every for w in words] + [False] * 4096)


def weight_content(batch: dict, table: np.ndarray) -> None:
    """Reply tokens that name what is seen weigh CONTENT_WEIGHT: the grammar is easy, seeing is not."""
    t = np.array(batch["targets"])
    batch["loss_mask"] = batch["loss_mask"] * mx.array(1.0 + (CONTENT_WEIGHT - 1.0) * table[t])
