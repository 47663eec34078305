"""Clip augmentations that keep the ground truth true: a left-right mirror and time reversal.

Why they exist: the training set is a few thousand rendered streams, and an object keeps one
motion for its whole life, so within the set an object's look (colour, shape, size, background)
tells its motion. A decoder can learn that shortcut instead of comparing frames: run D's
teacher-forced motion words were no better on held-out streams than with another stream's
frames. A mirrored clip shows the same objects moving the other way along x; a reversed clip
plays them backwards (left <-> right, up <-> down, appear <-> disappear). With both drawn at
random, an object's look no longer tells its direction; it still tells its axis and whether it
stands still (22 % of the probe's targets are still objects), so a look-only guess can still
beat the majority class, and the trainer's "training streams" line is what shows it.

Mirroring top to bottom (or transposing) would also swap up and down, but it turns triangles and
stars upside down, which the scene generator never draws; time reversal swaps up and down for
every shape as drawn.

The pixels are re-indexed on the device (`flip_views`, `flip_patch_labels`); the truths are
rebuilt here and the slot labels recomputed from them by the caller.
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import numpy as np

from framecast.stages.sources.scene import FrameTruth, SceneEvent, SceneObject

MIRROR_MOTION = {"left": "right", "right": "left", "up": "up", "down": "down", "still": "still"}
REVERSE_MOTION = {"left": "right", "right": "left", "up": "down", "down": "up", "still": "still"}
MIRROR_CHANCE = 0.5
REVERSE_CHANCE = 0.5


def mirror_object(o: SceneObject, width: int) -> SceneObject:
    """The object in the left-right mirror of a `width`-pixel frame: pixel column c -> W-1-c, so
    x -> (W-1)/W - x (normalised; cv2 draws at pixel centres), bbox columns reflected (x0, x1
    exclusive), left <-> right."""
    x0, y0, x1, y1 = o.bbox
    return replace(o, x=round((width - 1) / width - o.x, 5), bbox=(width - x1, y0, width - x0, y1),
                   motion=MIRROR_MOTION[o.motion])


def mirror_truths(truths: list[FrameTruth], width: int) -> list[FrameTruth]:
    """Every object and event of a clip's truths mirrored left-right (`mirror_object`)."""
    return [replace(t, objects=tuple(mirror_object(o, width) for o in t.objects),
                    events=tuple(replace(e, object=mirror_object(e.object, width)) for e in t.events))
            for t in truths]


def reverse_truths(truths: list[FrameTruth]) -> list[FrameTruth]:
    """The clip played backwards: frame j shows what frame n-1-j showed, with motions reversed.

    Frame numbers and pts stay increasing (frame j keeps the j-th index and pts of the forward
    clip). Events follow the scene generator's meaning on the reversed order: "appear" on the
    first frame an object is visible, "disappear" on the first frame it is gone, with the object
    as last seen. The clip's first frame gets none: what came before it is unknown, and
    `data.window_clauses` ignores that frame's events anyway.
    """
    back = truths[::-1]
    out = []
    for j, t in enumerate(back):
        objects = tuple(replace(o, motion=REVERSE_MOTION[o.motion]) for o in t.objects)
        events: list[SceneEvent] = []
        if j > 0:
            before = {o.id: o for o in out[-1].objects}
            now = {o.id for o in objects}
            events += [SceneEvent("appear", truths[j].index, o) for o in objects if o.id not in before]
            events += [SceneEvent("disappear", truths[j].index, o) for i, o in before.items() if i not in now]
        out.append(FrameTruth(truths[j].index, truths[j].pts, t.background, t.textured, objects, tuple(events)))
    return out


def flip_views(views: mx.array) -> mx.array:
    """uint8 views [F, h, w, 3] -> their left-right mirror [F, h, w, 3]."""
    return views[:, :, ::-1, :]


def flip_patch_labels(patch: mx.array, nh: int, nw: int) -> mx.array:
    """Per-patch labels [F, nh*nw, 6] (colour, shape, patch x, y, object x, y; see
    `train.frame_labels`) of mirrored views: patches re-ordered, x columns -> 1 - x."""
    f = patch.shape[0]
    p = patch.reshape(f, nh, nw, -1)[:, :, ::-1, :]
    flip_x = mx.array([0, 0, 1, 0, 1, 0], dtype=patch.dtype)  # the columns that hold an x
    p = mx.where(flip_x.astype(mx.bool_), 1.0 - p, p)
    return p.reshape(f, nh * nw, -1)


def draw(rng: np.random.Generator) -> tuple[bool, bool]:
    """(mirror?, reverse?) for one clip."""
    return bool(rng.random() < MIRROR_CHANCE), bool(rng.random() < REVERSE_CHANCE)
