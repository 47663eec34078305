"""The demo trainer's clip augmentations (`framecast.stages.demo_training.augment`): a mirrored
or reversed clip is still a true scene, its text and labels say what its pixels show, and
an object's look no longer tells its motion."""

from __future__ import annotations

import numpy as np
import pytest

import framecast.stages.demo_training.augment as A
import framecast.stages.demo_training.data as D
from framecast.stages.sources.scene import COLOURS, SceneGenerator

SIGN = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}


def scene_truths(seed: int, n: int, *, start: int = 0, width: int = 320, height: int = 240):
    gen = SceneGenerator(seed=seed, width=width, height=height, fps=10.0, max_objects=3)
    frames, truths = zip(*gen.frames(n, start=start))
    return list(frames), list(truths)


def assert_motions_match_positions(truths):
    """Every object seen on two neighbouring frames moved the way its motion word says."""
    for a, b in zip(truths, truths[1:]):
        before = {o.id: o for o in a.objects}
        for o in b.objects:
            if o.id in before:
                dx, dy = o.x - before[o.id].x, o.y - before[o.id].y
                sx, sy = SIGN[o.motion]
                assert np.sign(round(dx, 6)) == sx and np.sign(round(dy, 6)) == sy, (o, before[o.id])


def diff_events(truths):
    """(frame position, kind, object id) of every appear/disappear after the first frame."""
    return sorted((j, e.kind, e.object.id) for j, t in enumerate(truths) if j > 0 for e in t.events)


@pytest.mark.parametrize("seed,start", [(0, 0), (5, 40), (11, 0), (23, 130)])
def test_reversed_clip_is_a_true_scene_played_backwards(seed, start):
    _, truths = scene_truths(seed, 60, start=start)
    back = A.reverse_truths(truths)
    assert [t.index for t in back] == [t.index for t in truths]  # time stamps keep increasing
    assert [{o.id for o in t.objects} for t in back] == [{o.id for o in t.objects} for t in truths[::-1]]
    assert_motions_match_positions(truths)
    assert_motions_match_positions(back)
    assert back[0].events == ()
    # twice reversed = the scene generator's own events (after the clip's first frame)
    assert diff_events(A.reverse_truths(back)) == diff_events(truths)
    # an object that appears going forward disappears going backward, and the other way round
    fwd = {(kind, oid) for _, kind, oid in diff_events(truths)}
    swap = {"appear": "disappear", "disappear": "appear"}
    assert {(swap[kind], oid) for _, kind, oid in diff_events(back)} == fwd


@pytest.mark.parametrize("seed", [1, 7, 19])
def test_mirrored_truths_describe_the_mirrored_pixels(seed):
    frames, truths = scene_truths(seed, 30, width=320, height=240)
    mirrored = A.mirror_truths(truths, 320)
    assert_motions_match_positions(mirrored)
    for frame, t in zip(frames, mirrored):
        flipped = frame[:, ::-1]
        for o in t.objects:
            x0, y0, x1, y1 = o.bbox
            cx, cy = int(o.x * 320), int(o.y * 240)
            assert x0 <= cx < x1 and y0 <= cy < y1
            assert np.abs(flipped[cy, cx].astype(int) - COLOURS[o.colour]).max() < 40, (o, flipped[cy, cx])


def test_narration_of_a_mirrored_reversed_clip_names_the_new_motions():
    _, truths = scene_truths(3, 40)
    both = A.reverse_truths(A.mirror_truths(truths, 320))
    both_ways = {"left": "left", "right": "right", "up": "down", "down": "up", "still": "still"}
    checked = 0
    for end in (10, 20, 30, 39):
        # frame `end` of the reversed clip shows frame 39 - end of the forward one
        fwd = {c.colour + c.shape: c.action for c in D.window_clauses(truths, 39 - end, 39 - end)}
        for c in D.window_clauses(both, end, end):
            if c.action in both_ways and fwd.get(c.colour + c.shape) in both_ways:
                assert c.action == both_ways[fwd[c.colour + c.shape]], (end, c, fwd)
                checked += 1
    assert checked >= 3


def test_augmented_batches_mirror_pixels_labels_and_text_together():
    import framecast.stages.demo_training.train as T
    from framecast.stages.demo_training import spec as TS, streams as TD  # noqa: F401

    tok = T.build_tokenizer(0)
    builder = T.SequenceBuilder(tok)
    data = T.generate_streams(T.stream_jobs([1_000_011, 1_000_012], 12, "none"), 1)
    pool = T.Pool(data[:1])
    d = pool.items[pool.keys[0]][0]
    rng = np.random.default_rng(4)
    seen = set()
    for _ in range(12):
        draw = A.draw(np.random.default_rng(rng.integers(1 << 30)))
        seen.add(draw)
    assert len(seen) == 4  # all four variants occur
    # one clip through each variant, against labels computed by hand
    for mirror, reverse in ((True, False), (False, True), (True, True)):
        T_draw = A.draw
        A.draw = lambda _rng, m=mirror, r=reverse: (m, r)
        try:
            batch = T.make_batch([(d, 2)], 6, builder, np.random.default_rng(0), dense=1.0, max_tokens=1024,
                                 augment=True)
        finally:
            A.draw = T_draw
        idx = np.arange(2, 8)[::-1] if reverse else np.arange(2, 8)
        views = np.array(d["views"])[idx]
        patch = np.array(d["patch"])[idx]
        nh, nw = views.shape[1] // 14, views.shape[2] // 14
        if mirror:
            views = views[:, :, ::-1]
            patch = patch.reshape(len(idx), nh, nw, -1)[:, :, ::-1].reshape(len(idx), nh * nw, -1).copy()
            patch[..., [2, 4]] = 1.0 - patch[..., [2, 4]]
        assert np.array_equal(np.array(batch["views"]), views)
        assert np.allclose(np.array(batch["patch_y"]), patch)
        truths = [d["truths"][i] for i in range(2, 8)]
        truths = A.reverse_truths(truths) if reverse else truths
        truths = A.mirror_truths(truths, d["width"]) if mirror else truths
        want = np.stack([TD.slot_labels(t) for t in truths])
        assert np.array_equal(np.array(batch["slot_y"]).reshape(want.shape), want)
        motion_y = np.array(batch["motion_y"]).reshape(len(idx), TS.QUERY_NUM)
        assert np.array_equal(motion_y, want[..., 6].astype(np.int32))  # the probe's targets too


def test_augmentation_breaks_the_look_to_motion_shortcut():
    """Over many draws, one object (one look) is told moving each way along its axis."""
    _, truths = scene_truths(2, 30)
    mover = next(o for t in truths for o in t.objects if o.motion != "still")
    rng = np.random.default_rng(0)
    said = set()
    for _ in range(40):
        mirror, reverse = A.draw(rng)
        t = A.reverse_truths(truths) if reverse else truths
        t = A.mirror_truths(t, 320) if mirror else t
        said |= {o.motion for f in t for o in f.objects if o.id == mover.id}
    axis = {"left": {"left", "right"}, "right": {"left", "right"}, "up": {"up", "down"}, "down": {"up", "down"}}
    assert said == axis[mover.motion]
