"""The seeded synthetic scene generator: determinism, ground truth, visibility, events."""

from __future__ import annotations

import numpy as np
import pytest

from framecast.stages.sources.scene import BACKGROUNDS, COLOURS, SHAPES, SIZES, SceneGenerator


def test_same_seed_same_pixels_and_truth_in_any_order():
    a, b = SceneGenerator(seed=7, width=96, height=64), SceneGenerator(seed=7, width=96, height=64)
    seq = [a.frame(i) for i in range(40)]
    img, truth = b.frame(33)  # random access first
    assert np.array_equal(img, seq[33][0]) and truth == seq[33][1]
    assert img.shape == (64, 96, 3) and img.dtype == np.uint8
    other, _ = SceneGenerator(seed=8, width=96, height=64).frame(33)
    assert not np.array_equal(other, img)


def test_truth_lists_visible_objects_with_their_attributes():
    g = SceneGenerator(seed=1, fps=5, min_objects=1, max_objects=3)
    for img, t in g.frames(100):
        assert 1 <= len(t.objects) <= 3
        for o in t.objects:
            assert o.shape in SHAPES and o.colour in COLOURS and o.size in SIZES
            x0, y0, x1, y1 = o.bbox
            assert 0 <= x0 < x1 <= g.width and 0 <= y0 < y1 <= g.height  # fully inside the frame
            # the object's colour is really painted at its centre
            cy, cx = int(o.y * g.height), int(o.x * g.width)
            patch = img[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).astype(int)
            assert np.abs(patch - np.array(COLOURS[o.colour])).max(axis=1).min() < 30, (o, t.index)
        # no two objects overlap
        boxes = [o.bbox for o in t.objects]
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])
        assert t.caption().endswith(".")


def test_motion_matches_label_and_appear_disappear_events():
    g = SceneGenerator(seed=4, fps=10, lifetime_s=(1.0, 2.0), appear_rate=2.0)
    prev = {}
    kinds = set()
    for _, t in g.frames(120):
        cur = {o.id: o for o in t.objects}
        for e in t.events:
            kinds.add(e.kind)
            assert (e.object.id in cur) == (e.kind == "appear")
        for oid, o in cur.items():
            if oid in prev:
                dx, dy = o.x - prev[oid].x, o.y - prev[oid].y
                want = {"left": (dx < 0 and dy == 0), "right": (dx > 0 and dy == 0), "up": (dy < 0 and dx == 0),
                        "down": (dy > 0 and dx == 0), "still": (dx == 0 and dy == 0)}[o.motion]
                assert want, (o, dx, dy)
            else:
                assert any(e.kind == "appear" and e.object.id == oid for e in t.events)
        for oid in prev.keys() - cur.keys():
            assert any(e.kind == "disappear" and e.object.id == oid for e in t.events)
        prev = cur
    assert kinds == {"appear", "disappear"}


def test_restricted_vocabulary_backgrounds_and_texture():
    g = SceneGenerator(seed=2, shapes=("star",), colours=("red",), sizes=("large",), motions=("still",),
                       background="white", textured=False, width=64, height=48)
    img, t = g.frame(0)
    assert {(o.shape, o.colour, o.size, o.motion) for o in t.objects} == {("star", "red", "large", "still")}
    assert tuple(img[0, 0]) == BACKGROUNDS["white"]
    tex, _ = SceneGenerator(seed=2, background="gray", textured=True).frame(0)
    assert 2 < tex[:20, :20].std() < 20  # lightly textured, not noise
    with pytest.raises(ValueError, match="hexagon"):
        SceneGenerator(shapes=("hexagon",))
