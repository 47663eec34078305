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
from collections.abc import Callable
from typing import Any

DEFAULT_WINDOW_PER_WORKER = 2  # renders in flight per worker: keeps them busy, bounds memory


class StreamRefresher:
    """Renders streams for seeds `first_seed`, `first_seed + 1`, ... below `end_seed` in `workers`
    spawned processes. `job(seed)` builds the picklable argument of `render` for one seed;
    `render` must be a module-level function (it is pickled by name)."""

    def __init__(self, render: Callable[[Any], dict], job: Callable[[int], Any], *, first_seed: int,
                 end_seed: int, workers: int, window: int | None = None):
        if workers < 1:
            raise ValueError(f"StreamRefresher: workers={workers}: need at least 1")
        self._render, self._job = render, job
        self.next_seed, self.end_seed = first_seed, end_seed
        self._window = window or DEFAULT_WINDOW_PER_WORKER * workers
        self._pool = mp.get_context("spawn").Pool(workers)
        self._pending: list = []  # AsyncResult, in submission order
        self.delivered = 0
        self._top_up()

    @property
    def exhausted(self) -> bool:
        """No seed left to render and nothing in flight."""
        return self.next_seed >= self.end_seed and not self._pending

    def _top_up(self) -> None:
        while len(self._pending) < self._window and self.next_seed < self.end_seed:
            self._pending.append(self._pool.apply_async(self._render, (self._job(self.next_seed),)))
            self.next_seed += 1

    def poll(self, limit: int | None = None) -> list[dict]:
        """The streams finished so far (at most `limit`), without waiting; new renders are
        started in their place. A render that raised raises here (a bug, not bad input)."""
        done = [r for r in self._pending if r.ready()]
        if limit is not None:
            done = done[:limit]
        out = [r.get() for r in done]
        taken = {id(r) for r in done}
        self._pending = [r for r in self._pending if id(r) not in taken]
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
