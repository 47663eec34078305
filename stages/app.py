"""The composition root: the only module that knows every stage.

`build_graph(cfg)` turns a `RunConfig` into `source -> change -> [encode -> decode] -> outputs
-> [mqtt]`; `run_main(cfg)` runs it and returns the process exit code.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import IO, Any

from framecast.config import RunConfig
from framecast.errors import UserError
from framecast.events import Error
from framecast.redact import redact_url
from framecast.runtime import Runtime, Source, Stage


@dataclass
class SharedModel:
    """What the streams of one run share: the loaded model (None: capture only), its one worker
    thread, the encoder that batches their frames, the prefill that batches appending them to
    their sessions, the decoder that batches their turns' steps (`framecast.engine.scheduler`)
    and the buffers their caches are rows of (`framecast.model.kv_pool`)."""

    model: Any
    worker: Any = None
    encoder: Any = None
    prefill: Any = None
    decode: Any = None
    kv_pool: Any = None  # `model.kv_pool.KVPoolSet`: the sessions' caches as rows of shared buffers


def build_graph(cfg: RunConfig, *, model_loader=None, shared: SharedModel | None = None,
                out: IO[str] | None = None) -> tuple[Source, list[Stage]]:
    """One stream's graph. `model_loader(cfg)` returns the model to watch with (default
    `load_run_model`); a job worker passes one that loads once and keeps it for every job.
    `shared`: the model of a multi-stream run, with its worker and batching encoder;
    `out`: where the terminal view writes its lines (default stdout)."""
    from framecast.stages.change import ChangeDetector
    from framecast.stages.outputs import make_outputs
    from framecast.stages.outputs.files import check_run_outputs
    from framecast.stages.sources import make_source

    # Every output path is checked before the source opens or the model loads (here, and for
    # all streams together in `multi.build_streams`): a bad one stops the run with one line and
    # nothing created, and no output may be an input or another output.
    check_run_outputs([cfg])
    archive = None
    if cfg.session.resume:
        archive, cfg = _resume_config(cfg)
    source = make_source(cfg.source)
    stages: list[Stage] = []
    if cfg.change.enabled:
        stages.append(ChangeDetector(cfg.change))
    if not cfg.runtime.capture_only:
        stages.extend(_model_stages(cfg, recorded=not source.live, model_loader=model_loader, shared=shared))
    from framecast.stages.sources.file import FileSource

    stages.extend(_analysis_stages(cfg, stages, file_input=isinstance(source, FileSource)))
    stages.extend(make_outputs(cfg.outputs, live=source.live, out=out, source_uri=cfg.source.uri,
                               stream_id=cfg.source.stream_id))
    if cfg.mqtt.url:
        from framecast.stages.mqtt.stage import MqttStage

        stages.append(MqttStage(cfg.mqtt, stream_id=cfg.source.stream_id))
    if archive is not None:
        _resume_stages(archive, stages)
    return source, stages


def _resume_config(cfg: RunConfig):
    """`session.resume`: read the saved session, refuse another video (unless `session.force`),
    and continue a file where the saved run ended (unless `source.start` is given)."""
    from framecast.stages.session_file import check_source, read_archive
    from framecast.stages.sources import source_kind

    archive = read_archive(cfg.session.resume)
    warning = check_source(archive, cfg.source.uri, source_cfg=cfg.source, force=cfg.session.force)
    if warning:
        print(f"framecast: warning: {warning}", file=sys.stderr)
    end = archive.manifest.get("media_end")
    if source_kind(cfg.source.uri) == "file" and not cfg.source.start and end:
        duration = (archive.manifest.get("source") or {}).get("duration")
        if duration is not None and end >= duration - 1e-3:
            raise UserError(f"{archive.path}: the saved session already reaches the end of {cfg.source.uri} "
                            f"({end:g} s): nothing to continue")
        if cfg.source.end is not None and cfg.source.end <= end:
            raise UserError(f"source.end = {cfg.source.end:g}: the saved session already reaches {end:g} s")
        cfg = cfg.model_copy(update={"source": cfg.source.model_copy(update={"start": float(end)})})
    elif source_kind(cfg.source.uri) == "file" and cfg.source.start and end and not warning \
            and cfg.source.start < end - 1e-3:  # the saved video itself, from before where it ended
        raise UserError(f"source.start = {cfg.source.start:g}: the saved session {archive.path} already reaches "
                        f"{end:g} s of this video; going on from earlier would narrate that span twice and give "
                        f"chapters that run backwards (leave --start out, or give at least {end:g})")
    return archive, cfg


def _resume_stages(archive, stages: list[Stage]) -> None:
    """Load the saved cache into the stream's session (a stage right after decode does it when
    the graph starts: build_graph may run inside an event loop, e.g. a job worker's) and hand the
    saved narration log and chapters to the stages that build on them (chapter numbering,
    summary, the next save)."""
    from framecast.stages.decode import DecodeStage
    from framecast.stages.session_file import SessionResume

    at = next((i for i, st in enumerate(stages) if isinstance(st, DecodeStage)), None)
    if at is None:
        raise UserError(f"session.resume = {str(archive.path)!r}: needs a model, and this run has none (capture-only)")
    stages.insert(at + 1, SessionResume(archive, stages[at].session))
    for st in stages:
        seed = getattr(st, "resume_from", None)
        if seed is not None:
            seed(archive)


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
    session = StreamingSession.from_config(model, session_cfg, worker=worker, max_slice_nums=cfg.model.max_slice_nums,
                                           prefill=shared.prefill if shared is not None else None,
                                           decode=shared.decode if shared is not None else None,
                                           kv_pool=shared.kv_pool if shared is not None else None)
    return [
        EncodeStage(model, worker=worker, max_slice_nums=cfg.model.max_slice_nums,
                    max_batch=cfg.session.encode_batch, pack_frames=cfg.session.pack_frames,
                    encoder=shared.encoder if shared is not None else None),
        DecodeStage(session, cfg.narration, stream_id=cfg.source.stream_id, state_file=cfg.session.state_file,
                    narrate_at_end=recorded),
    ]


def _analysis_stages(cfg: RunConfig, stages: list[Stage], *, file_input: bool) -> list[Stage]:
    """Recorded-video analysis after decode: chapters, the summary, the saved session (`.fcs`).

    Chapters and the summary are on by default when a model narrates a recorded file (and
    whenever their output file is asked for); a saved session needs a model."""
    from framecast.stages.decode import DecodeStage

    decode = next((st for st in stages if isinstance(st, DecodeStage)), None)
    session = decode.session if decode is not None else None
    recorded = file_input and session is not None
    want_chapters = cfg.chapters.enabled if cfg.chapters.enabled is not None else (recorded or bool(cfg.outputs.chapters))
    want_summary = cfg.summary.enabled if cfg.summary.enabled is not None else (recorded or bool(cfg.outputs.summary))
    if cfg.outputs.chapters and not want_chapters:
        raise UserError(f"outputs.chapters = {cfg.outputs.chapters!r}: chapters.enabled is false")
    if cfg.outputs.summary and not want_summary:
        raise UserError(f"outputs.summary = {cfg.outputs.summary!r}: summary.enabled is false")
    for key, value, wanted in (("outputs.summary", cfg.outputs.summary, want_summary),
                               ("outputs.session", cfg.outputs.session, True)):
        if value and wanted and session is None:
            raise UserError(f"{key} = {value!r}: needs a model, and a capture-only run has none "
                            f"(turn it off with --set {key}= , or drop --capture-only)")
    out: list[Stage] = []
    turns = None
    if session is not None and (want_chapters or want_summary):
        from framecast.engine.text_turns import TextTurns

        # Fresh-context text turns on the same model and worker, always greedy (a title or a
        # summary should not change from run to run).
        turns = TextTurns(session.model, worker=session.worker, system_prompt=session.system_prompt)
    if want_chapters:
        from framecast.stages.chapters import ChapterStage

        out.append(ChapterStage(cfg.chapters, turns, stream_id=cfg.source.stream_id))
    if want_summary and turns is not None:
        from framecast.stages.summary import SummaryStage

        out.append(SummaryStage(cfg.summary, turns, stream_id=cfg.source.stream_id))
    if cfg.outputs.session:
        from framecast.stages.session_file import SessionArchiveStage
        from framecast.stages.sources.fingerprint import fingerprint

        settings = {k: getattr(session, k) for k in ("system_prompt", "max_cache_tokens", "max_cache_mb",
                                                     "sink_tokens", "kv_bits", "keep_generated", "max_slice_nums")}
        model = cfg.model.model_dump()
        for key in ("path", "mmproj"):  # `ask --session` may run from another directory
            if model[key] and os.path.exists(model[key]):
                model[key] = os.path.abspath(model[key])
        manifest = {"model": model, "session": settings, "narration": cfg.narration.model_dump(),
                    "source_uri": redact_url(cfg.source.uri)}
        out.append(SessionArchiveStage(cfg.outputs.session, session, manifest=manifest,
                                       fingerprint=fingerprint(cfg.source.uri, cfg.source),
                                       stream_id=cfg.source.stream_id))
    if cfg.outputs.chapters:
        from framecast.stages.outputs.chapters import ChaptersVttOutput

        out.append(ChaptersVttOutput(cfg.outputs.chapters))
    if cfg.outputs.summary:
        from framecast.stages.outputs.chapters import SummaryMarkdownOutput

        out.append(SummaryMarkdownOutput(cfg.outputs.summary, source=cfg.source.uri))
    return out


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
    import asyncio

    from framecast.runtime import noting_signals

    with noting_signals() as early:  # a Ctrl-C from here on is a stop request, however early
        result = asyncio.run(_runtime(cfg).run(early_signals=early))
    _exit_at_once_on_signal()  # the run is over (files closed): a signal now only cuts the teardown short
    if result.stopped_by == "signal":  # the shell convention: 128 + signal number
        return result.exit_code or 128 + (result.signal or 2)
    return result.exit_code


def _runtime(cfg: RunConfig) -> Runtime:
    """One stream's graph and its runtime."""
    source, stages = build_graph(cfg)
    return Runtime(
        source,
        stages,
        edge_size=cfg.runtime.edge_size,
        stop_timeout=cfg.runtime.stop_timeout_s,
        metrics_interval=cfg.outputs.metrics_interval_s if (cfg.outputs.metrics or cfg.mqtt.url) else None,
        on_metrics=_print_metrics if cfg.outputs.metrics else None,
        on_error=lambda err: _print_error(err, source_name=source.name),
        stream_id=cfg.source.stream_id,
    )


def ask_main(url: str, stream: str, question: str, *, prefix: str, timeout: float, ca_file: str | None,
             cert_file: str | None = None, key_file: str | None = None) -> int:
    from framecast.stages.mqtt.stage import ask_over_mqtt

    return ask_over_mqtt(url, stream, question, prefix=prefix, timeout=timeout, ca_file=ca_file,
                         cert_file=cert_file, key_file=key_file)


def ask_session_main(path: str, question: str, *, source: str | None = None, force: bool = False,
                     model_path: str | None = None, max_tokens: int | None = None, as_json: bool = False) -> int:
    """`framecast ask --session FILE.fcs "question"`: answer offline from a saved session (no video
    decoding) and say which time span the answer draws on."""
    import asyncio
    import tempfile

    from framecast.config import ModelConfig, NarrationConfig
    from framecast.engine.session import StreamingSession
    from framecast.engine.text_turns import TextTurns
    from framecast.engine.worker import worker_for
    from framecast.stages.ask_session import ask_archive, where
    from framecast.stages.decode import make_turn_sampler
    from framecast.stages.session_file import check_source, read_archive

    archive = read_archive(path)
    warning = check_source(archive, source, force=force)
    if warning:
        print(f"framecast: warning: {warning}", file=sys.stderr)
    saved_model = ModelConfig(**(archive.manifest.get("model") or {}))
    if model_path is not None:
        saved_model = saved_model.model_copy(update={"path": model_path, "mmproj": None})
    model = load_run_model(RunConfig(model=saved_model))
    if model is None:
        raise UserError(f"{path}: its model ({saved_model.path or 'the embedded demo model'}) is not available "
                        "(give one with --model)")
    narration = NarrationConfig(**(archive.manifest.get("narration") or {}))
    worker = worker_for(model)
    session = StreamingSession(model, worker=worker, **(archive.manifest.get("session") or {}))
    turns = TextTurns(model, worker=worker, system_prompt=session.system_prompt)

    async def go():
        with tempfile.TemporaryDirectory(prefix="framecast-ask-") as tmp:
            await session.load(archive.extract_session(tmp))  # also refuses a different model
        return await ask_archive(question, archive, session, turns, sampler=make_turn_sampler(narration),
                                 max_tokens=max_tokens or narration.max_tokens)

    answer, chapter = asyncio.run(go())
    if as_json:
        print(answer.to_json())
    else:
        print(answer.text)
        print(where(answer, archive, chapter))
    return 0
