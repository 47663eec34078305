"""The composition root: the only module that knows every stage.

`build_graph(cfg)` turns a `RunConfig` into `source -> change -> [encode -> decode] -> outputs
-> [mqtt]`; `run_main(cfg)` runs it and returns the process exit code.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import IO, Any

from framecast.config import RunConfig
from framecast.errors import UserError
from framecast.events import Error
from framecast.runtime import Runtime, Source, Stage


@dataclass
class SharedModel:
    """What the streams of one run share: the loaded model (None: capture only), its one worker
    thread, and the encoder that batches their frames (`framecast.engine.scheduler`)."""

    model: Any
    worker: Any = None
    encoder: Any = None


def build_graph(cfg: RunConfig, *, model_loader=None, shared: SharedModel | None = None,
                out: IO[str] | None = None) -> tuple[Source, list[Stage]]:
    """One stream's graph. `model_loader(cfg)` returns the model to watch with (default
    `load_run_model`); a job worker passes one that loads once and keeps it for every job.
    `shared`: the model of a multi-stream run, with its worker and batching encoder;
    `out`: where the terminal view writes its lines (default stdout)."""
    from framecast.stages.change import ChangeDetector
    from framecast.stages.outputs import make_outputs
    from framecast.stages.outputs import check_output_path
    from framecast.stages.sources import make_source

    # Every output path is checked before the source opens or the model loads: a bad one stops
    # the run with one line and nothing created (not even the outputs whose paths were fine).
    for path, what in ((cfg.outputs.jsonl, "JSONL"), (cfg.outputs.srt, "SRT"), (cfg.outputs.vtt, "VTT"),
                       (cfg.session.state_file, "session state")):
        if path:
            check_output_path(path, what)
    source = make_source(cfg.source)
    stages: list[Stage] = []
    if cfg.change.enabled:
        stages.append(ChangeDetector(cfg.change))
    if not cfg.runtime.capture_only:
        stages.extend(_model_stages(cfg, recorded=not source.live, model_loader=model_loader, shared=shared))
    stages.extend(make_outputs(cfg.outputs, live=source.live, out=out))
    if cfg.mqtt.url:
        from framecast.stages.mqtt.stage import MqttStage

        stages.append(MqttStage(cfg.mqtt, stream_id=cfg.source.stream_id))
    return source, stages


def load_run_model(cfg: RunConfig):
    """The model `run` watches with: `model.path` (+ `mmproj`), else the embedded demo model.

    Returns None when no path is given and no demo model is installed (capture-only run).
    """
    from framecast.model.load import DEMO_MODEL_DIR, load_model
    from framecast.model.protocol import VisionLanguageModel

    if cfg.model.path is not None:
        model = load_model(cfg.model.path, mmproj=cfg.model.mmproj, dtype=cfg.model.dtype)
    elif (DEMO_MODEL_DIR / "config.json").is_file():
        model = load_model(DEMO_MODEL_DIR, dtype=cfg.model.dtype)
    else:
        return None
    if not isinstance(model, VisionLanguageModel):
        raise UserError(f"model.path = {cfg.model.path!r}: a language model alone cannot watch video "
                        "(give its vision GGUF with --mmproj)")
    return model


def _model_stages(cfg: RunConfig, *, recorded: bool = True, model_loader=None,
                  shared: SharedModel | None = None) -> list[Stage]:
    """Encode + decode stages around one streaming session (one KV cache for this stream).
    `recorded`: the input has an end, whose last span gets a closing narration."""
    model = shared.model if shared is not None else (model_loader or load_run_model)(cfg)
    if model is None:
        return []
    from framecast.engine.session import StreamingSession
    from framecast.engine.worker import worker_for
    from framecast.stages.decode import DecodeStage
    from framecast.stages.encode import EncodeStage

    worker = worker_for(model)  # one thread runs all of this model's MLX work
    # A model may carry session defaults in its config.json (`framecast_session`, e.g. the demo
    # model's cache budget: it was trained on short streams); settings the user gave win.
    defaults = model.session_defaults
    unset = {k: v for k, v in defaults.items() if k in type(cfg.session).model_fields and getattr(cfg.session, k) is None}
    session_cfg = cfg.session.model_copy(update=unset) if unset else cfg.session
    session = StreamingSession.from_config(model, session_cfg, worker=worker, max_slice_nums=cfg.model.max_slice_nums)
    return [
        EncodeStage(model, worker=worker, max_slice_nums=cfg.model.max_slice_nums,
                    max_batch=cfg.session.encode_batch, pack_frames=cfg.session.pack_frames,
                    encoder=shared.encoder if shared is not None else None),
        DecodeStage(session, cfg.narration, stream_id=cfg.source.stream_id, state_file=cfg.session.state_file,
                    narrate_at_end=recorded),
    ]


_METRIC_COLUMNS = ("items_in", "items_out", "drops", "queue_depth", "latency_ms_p50", "latency_ms_p95",
                   "throughput_per_s", "errors", "started", "queue_max_depth")


def format_metrics(snapshot: dict[str, dict[str, float]]) -> str:
    """A table of per-stage figures; stage-specific counters (bad_frames, reconnects, ...) follow
    their row as key=value."""
    rows = [f"{'stage':<12}{'in':>8}{'out':>8}{'drops':>7}{'queue':>7}{'p50 ms':>9}{'p95 ms':>9}{'/s':>8}"]
    for name, m in snapshot.items():
        extra = " ".join(f"{k}={v:g}" for k, v in m.items() if k not in _METRIC_COLUMNS)
        rows.append(f"{name:<12}{m['items_in']:>8.0f}{m['items_out']:>8.0f}{m['drops']:>7.0f}"
                    f"{m['queue_depth']:>7.0f}{m['latency_ms_p50']:>9.2f}{m['latency_ms_p95']:>9.2f}"
                    f"{m['throughput_per_s']:>8.1f}" + (f"  {extra}" if extra else ""))
    return "\n".join(rows)


def _print_metrics(snapshot: dict[str, dict[str, float]]) -> None:
    print(format_metrics(snapshot), file=sys.stderr, flush=True)


def _print_error(err: Error, *, source_name: str = "") -> None:
    # Capture errors already name their input (file, URL, camera); others say which stage failed.
    where = f"{err.stage}: " if err.stage and err.stage != source_name and err.stage not in err.text else ""
    print(f"framecast: {where}{err.text}", file=sys.stderr, flush=True)


def _exit_at_once_on_signal() -> None:
    """After the run: SIGINT/SIGTERM exit at once with 128 + the signal (instead of a
    KeyboardInterrupt in the middle of unloading the model and the interpreter)."""
    import os
    import signal

    def now(sig: int, _frame: object) -> None:
        os._exit(128 + sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, now)


def run_main(cfg: RunConfig) -> int:
    if cfg.streams:  # several sources, one model (stages/multi.py)
        from framecast.stages.multi import run_streams_main

        return run_streams_main(cfg)
    from framecast.config import stream_configs

    (cfg,) = stream_configs(cfg)  # `{stream_id}` in output paths
    source, stages = build_graph(cfg)
    runtime = Runtime(
        source,
        stages,
        edge_size=cfg.runtime.edge_size,
        stop_timeout=cfg.runtime.stop_timeout_s,
        metrics_interval=cfg.outputs.metrics_interval_s if (cfg.outputs.metrics or cfg.mqtt.url) else None,
        on_metrics=_print_metrics if cfg.outputs.metrics else None,
        on_error=lambda err: _print_error(err, source_name=source.name),
        stream_id=cfg.source.stream_id,
    )
    import asyncio

    result = asyncio.run(runtime.run())
    _exit_at_once_on_signal()  # the run is over (files closed): a signal now only cuts the teardown short
    if result.stopped_by == "signal":  # the shell convention: 128 + signal number
        return result.exit_code or 128 + (result.signal or 2)
    return result.exit_code


def ask_main(url: str, stream: str, question: str, *, prefix: str, timeout: float, ca_file: str | None,
             cert_file: str | None = None, key_file: str | None = None) -> int:
    from framecast.stages.mqtt.stage import ask_over_mqtt

    return ask_over_mqtt(url, stream, question, prefix=prefix, timeout=timeout, ca_file=ca_file,
                         cert_file=cert_file, key_file=key_file)
