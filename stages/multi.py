"""Several streams, one model: one graph per stream, side by side in one event loop.

Each stream (a `[[streams]]` entry, or one of several `--source` flags) gets its own graph
(`app.build_graph`): its own source, change detector, encode and decode stages, its own
`StreamingSession` (KV cache, budget, eviction), outputs and MQTT topics, and its own
`Runtime`, so its own bounded edges: a live stream drops its own oldest frame, never another's,
and a stream that stalls, ends or fails stops nobody else. What they share is the model, loaded
once, its one worker thread, and the `BatchEncoder` that turns the frames of all streams that
arrive together into one vision-tower call, the `BatchPrefill` that appends them to their
sessions in one batched prefill and the `BatchDecode` that runs the decode steps of turns
that overlap as one batch (`framecast.engine.scheduler`). Sessions take turns
on the worker step by step (`StreamingSession.narrate`), so a question on one stream is answered
between the steps of the others' narrations.

The run ends when every stream has ended; a signal stops them all. Exit status: the first
non-zero status of a stream (a stream's error does not stop the others), 128 + signal number
after a signal.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from dataclasses import dataclass
from typing import IO, Any

from framecast.config import RunConfig, stream_configs
from framecast.events import Error
from framecast.runtime import RunResult, Runtime
from framecast.stages.app import (
    SharedModel,
    _print_error,
    build_graph,
    format_metrics,
    load_run_model,
)

__all__ = ["LabelledWriter", "StreamRun", "build_streams", "load_shared_model", "run_streams",
           "run_streams_main"]


class LabelledWriter:
    """A text stream that starts every line with `[stream_id] ` (the terminal view of several
    streams shares one stdout). Everything else is the underlying stream's."""

    def __init__(self, stream: IO[str], label: str):
        self._stream = stream
        self.label = f"[{label}] "
        self._line_start = True

    def write(self, text: str) -> int:
        for piece in re.split(r"(?<=\n)", text):
            if not piece:
                continue
            if piece.startswith("\r"):  # a line redrawn in place (partial text on a terminal)
                self._stream.write("\r" + self.label + piece[1:].lstrip("\r"))
            else:
                if self._line_start:
                    self._stream.write(self.label)
                self._stream.write(piece)
            self._line_start = piece.endswith("\n")
        return len(text)

    def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno, ...
        return getattr(self._stream, name)


@dataclass
class StreamRun:
    """One stream of a multi-stream run: its config and its runtime (graph, edges, metrics)."""

    stream_id: str
    config: RunConfig
    runtime: Runtime


def load_shared_model(configs: list[RunConfig]) -> SharedModel:
    """The one model (and worker, and batching encoder) every stream of the run uses."""
    if all(c.runtime.capture_only for c in configs):
        return SharedModel(None)
    model = load_run_model(configs[0])  # model.* is shared by every stream
    if model is None:
        return SharedModel(None)
    from framecast.engine.scheduler import BatchDecode, BatchEncoder, BatchPrefill
    from framecast.engine.worker import worker_for

    worker = worker_for(model)
    # one call batches at most encode_batch frames (or 4.5 frame groups) of every stream
    max_batch = sum(c.session.encode_batch * (c.session.pack_frames or model.default_group_frames) for c in configs)
    return SharedModel(model, worker, BatchEncoder(model, worker=worker, max_batch=max_batch),
                       BatchPrefill(model, worker=worker, max_rows=len(configs)), BatchDecode(model),
                       kv_pool_for(model, configs))


POOL_MEMORY_SLACK = 1.25  # pooled rows may hold this much more cache memory than the budgets' sum


def kv_pool_for(model: Any, configs: list[RunConfig]) -> Any:
    """Shared cache buffers for the streams' sessions (`framecast.model.kv_pool`): one row per
    stream whose token budget fits the rows' length, None when fewer than two streams would use
    it. A session without a token budget, with one in MB or with a quantised cache keeps caches
    of its own, and so does one whose budget is longer than the rows: the row length is the
    budget that pools the most streams while the memory in all (rows x length + the longer
    sessions' own caches) stays within POOL_MEMORY_SLACK of the budgets' sum, so one long-budget
    stream never makes every row that long."""
    from framecast.model.kv_pool import KVPoolSet

    budgets = [c.session.max_cache_tokens or model.session_defaults.get("max_cache_tokens") for c in configs
               if not c.session.kv_bits and c.session.max_cache_mb is None]
    budgets = sorted(int(b) for b in budgets if b)

    def memory(length: int) -> int:  # tokens held in all: the pooled rows, then the others' own caches
        return sum(length if b <= length else b for b in budgets)

    affordable = [n for n in set(budgets) if memory(n) <= POOL_MEMORY_SLACK * sum(budgets)]
    length = max(affordable, key=lambda n: (sum(1 for b in budgets if b <= n), -n), default=None)
    rows = sum(1 for b in budgets if length is not None and b <= length)
    if rows < 2:
        return None
    return KVPoolSet(len(model.language_model.layers), rows=rows, capacity=length)


def _stream_config(cfg: RunConfig, n_streams: int) -> RunConfig:
    """Per-stream adjustments of shared settings: an MQTT client id of its own (a broker drops
    the older of two connections with one id), and no progress bar unless asked for (several
    bars on one terminal would overwrite each other)."""
    update: dict[str, Any] = {}
    sid = cfg.source.stream_id
    if cfg.mqtt.client_id:
        update["mqtt"] = cfg.mqtt.model_copy(update={"client_id": f"{cfg.mqtt.client_id}-{sid}"})
    if n_streams > 1 and cfg.outputs.progress is None:
        update["outputs"] = cfg.outputs.model_copy(update={"progress": False})
    return cfg.model_copy(update=update) if update else cfg


def build_streams(configs: list[RunConfig], *, shared: SharedModel | None = None,
                  out: IO[str] | None = None) -> list[StreamRun]:
    """One `Runtime` per stream config (from `config.stream_configs`), all on one model.

    Every stream's output paths are checked before the model loads or any source opens: a bad
    one stops the run with one line (UserError) and nothing is created."""
    from framecast.stages.outputs.files import check_run_outputs

    check_run_outputs(configs)
    if shared is None:
        shared = load_shared_model(configs)
    stdout = out or sys.stdout
    runs: list[StreamRun] = []
    for cfg in configs:
        cfg = _stream_config(cfg, len(configs))
        sid = cfg.source.stream_id
        writer = LabelledWriter(stdout, sid) if len(configs) > 1 else stdout
        source, stages = build_graph(cfg, shared=shared, out=writer)
        runtime = Runtime(
            source, stages,
            edge_size=cfg.runtime.edge_size,
            stop_timeout=cfg.runtime.stop_timeout_s,
            metrics_interval=cfg.outputs.metrics_interval_s if (cfg.outputs.metrics or cfg.mqtt.url) else None,
            on_metrics=_metrics_printer(sid) if cfg.outputs.metrics else None,
            on_error=_error_printer(sid, source.name),
            stream_id=sid,
        )
        runs.append(StreamRun(sid, cfg, runtime))
    _share_process_status(runs)
    return runs


def _share_process_status(runs: list[StreamRun]) -> None:
    """The streams' MQTT stages share `<prefix>/status` (one process): the last to close says
    offline, so a stream whose file ended does not mark the others unavailable."""
    from framecast.stages.mqtt.stage import MqttStage

    stages = [st for r in runs for st in r.runtime.stages if isinstance(st, MqttStage)]
    open_stages = {id(st) for st in stages}

    def closing(stage: MqttStage):
        def others_running() -> bool:
            open_stages.discard(id(stage))
            return bool(open_stages)
        return others_running

    for st in stages:
        st.others_running = closing(st)


def _metrics_printer(sid: str):
    def show(snapshot: dict[str, dict[str, float]]) -> None:
        print(f"[{sid}]\n{format_metrics(snapshot)}", file=sys.stderr, flush=True)
    return show


def _error_printer(sid: str, source_name: str):
    def show(err: Error) -> None:
        _print_error(err.model_copy(update={"text": f"[{sid}] {err.text}"}), source_name=source_name)
    return show


async def run_streams(runs: list[StreamRun], *, handle_signals: bool = True,
                      early_signals: list[int] | None = None) -> dict[str, RunResult]:
    """Run every stream's graph to its end; a signal stops them all (a second one cancels
    what still drains, as for one stream). `early_signals`: those noted before the handlers
    were in place (`runtime.noting_signals`), counted now. Returns each stream's result by id."""
    loop = asyncio.get_running_loop()
    installed: list[int] = []

    def on_signal(sig: int) -> None:
        for r in runs:
            r.runtime._on_signal(sig)  # the composition root owns the runtimes

    if handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, on_signal, sig)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
    for sig in list(early_signals or ()):  # after the install: a later one reaches on_signal itself
        on_signal(sig)
    try:
        results = await asyncio.gather(*(r.runtime.run(handle_signals=False) for r in runs))
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    return {r.stream_id: res for r, res in zip(runs, results)}


def exit_code(results: dict[str, RunResult]) -> int:
    for res in results.values():
        if res.stopped_by == "signal":
            return res.exit_code or 128 + (res.signal or 2)
    return next((res.exit_code for res in results.values() if res.exit_code), 0)


def run_streams_main(cfg: RunConfig) -> int:
    """`framecast run` with `[[streams]]` (or several `--source`): returns the exit status."""
    from framecast.runtime import noting_signals

    with noting_signals() as early:  # a Ctrl-C while the graphs are built is a stop request too
        runs = build_streams(stream_configs(cfg))
        results = asyncio.run(run_streams(runs, early_signals=early))
    return exit_code(results)
