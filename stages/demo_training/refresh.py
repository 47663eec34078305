"""Fresh training streams while the demo model trains (issue 11).

Why: a run renders its streams once (2,500 in 84 s on the GPU machine's 15 workers) and then
samples clips from them for thousands of steps, so every stream comes back ~30 times. Runs E-G
showed what that does: the motion probe's accuracy rose on the training streams (0.52 against
0.36 with shuffled frames in run G) and stayed at the majority class on held-out ones, since an
object's look and start tell which clip it is and so its motion. With `--refresh`, worker
processes keep rendering new streams (new seeds, never a held-out one) and the trainer swaps each
in for the oldest stream of its pool, so a stream is used for a minute or two, not for the run.

`StreamRefresher` keeps at most `window` renders in flight (results are whole streams, ~9 MB
each: an unbounded queue would fill memory) and hands back the finished ones without waiting.
Its processes are spawned, not forked (the parent holds a GPU context); they do no MLX work in
the parent, and the parent turns their arrays into device arrays on its own (MLX) thread.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable
from typing import Any

DEFAULT_WINDOW_PER_WORKER = 2  # renders in flight per worker: keeps them busy, bounds memory
# a render takes ~0.5 s (48 frames); one still pending after this was lost with its worker (a pool
# replaces a killed process but never answers the task it held): its seed is skipped
RENDER_TIMEOUT_S = 300.0


class StreamRefresher:
    """Renders streams for seeds `first_seed`, `first_seed + 1`, ... below `end_seed` in `workers`
    spawned processes. `job(seed)` builds the picklable argument of `render` for one seed;
    `render` must be a module-level function (it is pickled by name)."""

    def __init__(self, render: Callable[[Any], dict], job: Callable[[int], Any], *, first_seed: int,
                 end_seed: int, workers: int, window: int | None = None, timeout_s: float = RENDER_TIMEOUT_S):
        if workers < 1:
            raise ValueError(f"StreamRefresher: workers={workers}: need at least 1")
        self._render, self._job = render, job
        self.next_seed, self.end_seed = first_seed, end_seed
        self._window = window or DEFAULT_WINDOW_PER_WORKER * workers
        self._pool = mp.get_context("spawn").Pool(workers)
        self._timeout_s = timeout_s
        self._pending: list = []  # (AsyncResult, seed, submitted at: time.monotonic()), in submission order
        self.delivered = 0
        self.lost: list[int] = []  # seeds whose render never came back (`RENDER_TIMEOUT_S`)
        self._top_up()

    @property
    def exhausted(self) -> bool:
        """No seed left to render and nothing in flight."""
        return self.next_seed >= self.end_seed and not self._pending

    def _top_up(self) -> None:
        while len(self._pending) < self._window and self.next_seed < self.end_seed:
            result = self._pool.apply_async(self._render, (self._job(self.next_seed),))
            self._pending.append((result, self.next_seed, time.monotonic()))
            self.next_seed += 1

    def poll(self, limit: int | None = None) -> list[dict]:
        """The streams finished so far (at most `limit`), without waiting; new renders are
        started in their place, also for renders pending past the timeout (their seeds go to
        `lost`). A render that raised raises here (a bug, not bad input)."""
        now = time.monotonic()
        done = [p for p in self._pending if p[0].ready()]
        if limit is not None:
            done = done[:limit]
        stale = [p for p in self._pending if not p[0].ready() and now - p[2] > self._timeout_s]
        out = [p[0].get() for p in done]
        self.lost += [p[1] for p in stale]
        gone = {id(p) for p in done + stale}
        self._pending = [p for p in self._pending if id(p) not in gone]
        self.delivered += len(out)
        self._top_up()
        return out

    def close(self) -> None:
        """Stop the workers (renders in flight are dropped)."""
        self._pool.terminate()
        self._pool.join()
        self._pending = []

    def __enter__(self) -> StreamRefresher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
