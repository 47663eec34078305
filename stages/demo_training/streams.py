"""Training streams: rendered frames at the model's resolution with dense per-patch and
per-slot labels, the device-side pool that clips are drawn from, and its 2-frame gap clips."""

from __future__ import annotations

import collections

import mlx.core as mx
import numpy as np

import framecast.stages.demo_training.data as D
from framecast.stages.sources.scene import COLOURS, MOTIONS, SHAPES, SIZES, draw_shape
from framecast.stages.demo_training.spec import GAP_FRAMES, GRID, PATCH_Y, QUERY_NUM, SCALE_RESOLUTION, SLOT_COLS

def slot_labels(truth) -> np.ndarray:
    """Per-slot targets of one frame [QUERY_NUM, SLOT_COLS] float32: objectness, colour id, shape
    id, x, y, object id and motion id (index in MOTIONS) of the object whose centre lies in the
    slot's cell (the one nearest the cell centre if two do)."""
    slots = np.zeros((QUERY_NUM, SLOT_COLS), np.float32)
    best = np.full(QUERY_NUM, np.inf)
    for o in truth.objects:
        r, c = D.grid_cell(o)
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

    def clips(self, rng: np.random.Generator, rows: int, n_frames: int,
              key: tuple[int, int] | None = None) -> list[tuple[dict, int]]:
        """Up to `rows` clips of `n_frames` frames from distinct streams of one view size (`key`,
        or one drawn in proportion to the groups' sizes): [(stream, first frame)]."""
        if key is None:
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
