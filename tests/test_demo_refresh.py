"""--refresh: new training streams rendered in background processes while the demo model trains
(`framecast.stages.demo_training.refresh`), and the pool that swaps them in for its oldest."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

import framecast.stages.demo_training.train as T
from framecast.stages.demo_training import spec as TS
from framecast.stages.demo_training.refresh import StreamRefresher


def _job(seed: int):
    return T.stream_jobs([seed], 4, "jpeg")[0]


def _wait_for(refresher: StreamRefresher, n: int, timeout: float = 120.0) -> list[dict]:
    got, t0 = [], time.time()
    while len(got) < n and time.time() - t0 < timeout:
        got += refresher.poll()
        time.sleep(0.05)
    return got


def test_refresher_renders_each_new_seed_once_within_a_bounded_window():
    with StreamRefresher(T._make_stream_job, _job, first_seed=1_000_050, end_seed=1_000_055, workers=1,
                         window=2) as r:
        assert len(r._pending) == 2 and r.next_seed == 1_000_052  # no more in flight than the window
        got = _wait_for(r, 5)
        assert sorted(d["seed"] for d in got) == list(range(1_000_050, 1_000_055))
        assert r.exhausted and r.poll() == [] and r.delivered == 5
        assert got[0]["views"].shape[0] == 4 and got[0]["views"].dtype == np.uint8
    with pytest.raises(ValueError, match="workers=0"):
        StreamRefresher(T._make_stream_job, _job, first_seed=0, end_seed=1, workers=0)


def test_refresher_skips_a_render_that_never_comes_back():
    """A render pending past the timeout (its worker was killed, or hangs) is dropped and its seed
    reported in `lost`, so the window does not shrink for the rest of the run."""
    with StreamRefresher(time.sleep, lambda seed: 60.0 if seed == 1 else 0.0, first_seed=0, end_seed=3,
                         workers=2, window=3, timeout_s=6.0) as r:  # spawned workers start slowly on a loaded CI
        t0, got = time.time(), []
        while not r.exhausted and time.time() - t0 < 60:
            got += r.poll()
            time.sleep(0.1)
        assert r.exhausted and r.lost == [1] and r.delivered == 2 and got == [None, None]


def _fake(seed: int, hw: tuple[int, int]) -> dict:
    slots = np.zeros((2, TS.QUERY_NUM, TS.SLOT_COLS), np.float32)
    return {"seed": seed, "views": np.zeros((2, *hw, 3), np.uint8), "patch": np.zeros((2, 3), np.int32),
            "slots": slots, "truths": [None, None], "fps": 10.0, "width": hw[1]}


def test_pool_swaps_its_oldest_streams_and_regroups_by_view_size():
    pool = T.Pool([_fake(1, (28, 28)), _fake(2, (28, 42)), _fake(3, (28, 28))])
    assert len(pool) == 3 and pool.keys == [(28, 28), (28, 42)] and pool.sizes.tolist() == [2, 1]
    pool.replace_oldest([_fake(10, (42, 28)), _fake(11, (42, 28))])  # drops 1 and 2: the (28, 42) group empties
    assert len(pool) == 3 and [d["seed"] for d in pool.order] == [3, 10, 11]
    assert pool.keys == [(28, 28), (42, 28)] and pool.sizes.tolist() == [1, 2]
    clips = pool.clips(np.random.default_rng(0), 4, 1)
    assert {d["seed"] for d, _ in clips} <= {3, 10, 11}
    pool.replace_oldest([])
    assert [d["seed"] for d in pool.order] == [3, 10, 11]


def test_trainer_refresh_swaps_new_streams_in(tmp_path, monkeypatch):
    """The toy trainer with --refresh: every step waits for the oldest render in flight here (a
    test must not depend on the workers' timing), the swapped-in seeds are new training seeds, and a
    resumed run goes on with seeds it never started."""

    workers = []

    class Waiting(StreamRefresher):
        def __init__(self, *a, **kw):
            workers.append(kw["workers"])
            super().__init__(*a, **kw)

        def poll(self, limit=None):
            t0 = time.time()
            # the oldest render, not any: with two workers a later seed may finish first
            while self._pending and not self._pending[0][0].ready() and time.time() - t0 < 120:
                time.sleep(0.05)
            return super().poll(limit=1)

    swapped = []
    real = T.Pool.replace_oldest
    monkeypatch.setattr(T, "StreamRefresher", Waiting)
    monkeypatch.setattr(T.Pool, "replace_oldest", lambda self, data: swapped.extend(d["seed"] for d in data)
                        or real(self, data))
    out, ckpt = tmp_path / "model", tmp_path / "ckpt"
    args = ["--tiny", "--out", str(out), "--ckpt", str(ckpt), "--streams", "2", "--frames", "6", "--max-clip", "4",
            "--batch", "1", "--workers", "1", "--time-budget", "1000", "--vision-phase", "0", "--refresh",
            "--log-every", "1"]
    assert T.main([*args, "--max-steps", "3"]) == 0
    assert workers == [1]  # a third of --workers, at least one
    assert swapped == [1_000_002, 1_000_003, 1_000_004]  # after the two first rendered, one a step
    info = json.loads((out / "training.json").read_text())
    assert info["refresh"] is True and info["streams_refreshed"] == 3
    assert [h["refreshed"] for h in info["history"]] == [1, 2, 3]
    # resumed: the pool and the refresher start after every seed the first run started (two were
    # still in flight), so no stream of the stopped run comes back
    rendered = []
    real_jobs = T.stream_jobs
    monkeypatch.setattr(T, "stream_jobs", lambda seeds, *a: rendered.append(list(seeds)) or real_jobs(seeds, *a))
    assert T.main([*args, "--max-steps", "4", "--refresh-workers", "2"]) == 0
    assert workers == [1, 2]
    assert [x for x in rendered[0] if x >= 1_000_000] == [1_000_007, 1_000_008]
    assert swapped[3:] == [1_000_009]
    assert json.loads((out / "training.json").read_text())["streams_refreshed"] == 4


def test_training_cache_limit_is_bounded_by_the_machine(monkeypatch):
    """MLX's buffer cache while training: 16 GB at most, and a quarter of MLX's memory limit on a
    smaller machine (on a 24 GB CPU VM a 16 GB cache beside a large pool was killed for memory)."""
    import mlx.core as mx

    monkeypatch.setattr(mx, "get_memory_limit", lambda: 19 << 30)
    assert TS.train_cache_limit() == (19 << 30) // 4
    monkeypatch.setattr(mx, "get_memory_limit", lambda: 200 << 30)
    assert TS.train_cache_limit() == TS.TRAIN_CACHE_LIMIT_GB << 30 == 16 << 30
