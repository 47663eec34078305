"""Outputs: the terminal view (rich), JSONL, SRT and WebVTT, the preview window, the annotated
video and the HTML report.

Every output passes every event through unchanged (an MQTT stage may come after them), ignores
event types it does not know, and writes as it goes, flushing per event (the report: atomically,
every few seconds), so a crash or a kill loses nothing already produced.

Subtitle conventions follow Whisper's writers: SRT cues numbered from 1 with
`HH:MM:SS,mmm` times (hours always, comma decimals); WebVTT with a `WEBVTT` header and
`HH:MM:SS.mmm` times. `cue_text` makes any text safe (arrows, line breaks of every kind, blank
lines, control characters, edge whitespace), and times are always finite and in order. A cue
runs from its narration's start until the next narration starts (the last one until its own
`pts_end`, and at least until the end of the input when the eof status says where that is),
because a narration describes the scene until something new is said.

Output paths are checked before anything starts (`files.check_run_outputs`, for every stream
together): a missing parent directory, a directory, an unwritable place, a file the run reads
(the source, a resumed session, the model) or one file for two outputs is exit 2 with one line,
and nothing is created. A file that already exists is replaced only once the source has
delivered its first frame (`files.OutputFile`, `files.keep_existing`): a run that fails at its
start leaves earlier results as they were.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO

from framecast.config import OutputsConfig, local_path
from framecast.errors import UserError
from framecast.runtime import Stage
from framecast.stages.outputs.annotate import CONTAINERS, AnnotateOutput, vtt_beside
from framecast.stages.outputs.console import ConsoleOutput, clock
from framecast.stages.outputs.files import check_output_path
from framecast.stages.outputs.jsonl import JsonlOutput
from framecast.stages.outputs.preview import PreviewOutput
from framecast.stages.outputs.report import ReportOutput
from framecast.stages.outputs.subtitles import SubtitleOutput, cue_text, subtitle_time

__all__ = ["AnnotateOutput", "ConsoleOutput", "JsonlOutput", "PreviewOutput", "ReportOutput", "SubtitleOutput",
           "check_output_path", "clock", "cue_text", "local_video_file", "make_outputs", "subtitle_time"]


def local_video_file(uri: str | None) -> str | None:
    """The file behind a source URI when it is a local recording (for the report's video)."""
    if not uri or uri == "demo" or uri.startswith(("camera:", "/dev/video")):
        return None
    if uri[:7].lower() == "file://":
        uri = local_path(uri)
    elif "://" in uri:
        return None
    return uri if Path(uri).is_file() else None


def make_outputs(cfg: OutputsConfig, *, live: bool, out: IO[str] | None = None,
                 err: IO[str] | None = None, source_uri: str | None = None,
                 stream_id: str = "default") -> list[Stage]:
    """The output stages for a run. The progress bar defaults to on for recorded input when
    stderr is a terminal; `progress = true` forces it (e.g. when stderr is piped to a log).
    Raises UserError (exit 2) for an output path that cannot be written, before any is created."""
    for path, what in ((cfg.jsonl, "JSONL"), (cfg.srt, "SRT"), (cfg.vtt, "VTT"), (cfg.annotate, "annotated video"),
                       (cfg.annotate and vtt_beside(cfg.annotate), "WebVTT"), (cfg.report, "HTML report")):
        if path:
            check_output_path(path, what)
    if cfg.annotate and Path(cfg.annotate).suffix.lower() not in CONTAINERS:
        raise UserError(f"{cfg.annotate}: the annotated video must be one of {', '.join(CONTAINERS)}")
    stages: list[Stage] = []
    if cfg.jsonl:
        stages.append(JsonlOutput(cfg.jsonl, frames=cfg.jsonl_frames, partials=cfg.jsonl_partials))
    if cfg.srt:
        stages.append(SubtitleOutput(cfg.srt, fmt="srt"))
    if cfg.vtt:
        stages.append(SubtitleOutput(cfg.vtt, fmt="vtt"))
    if cfg.annotate:
        stages.append(AnnotateOutput(cfg.annotate))
    if cfg.report:
        video = cfg.annotate or local_video_file(source_uri)
        stages.append(ReportOutput(cfg.report, video=video, video_has_captions=bool(cfg.annotate),
                                   title=f"framecast report: {stream_id}"))
    err_stream = err or sys.stderr
    if cfg.preview:
        stages.append(PreviewOutput(title=f"framecast: {stream_id}", err=err_stream))
    progress = cfg.progress if cfg.progress is not None else (not live and err_stream.isatty())
    if cfg.console or progress:
        stages.append(ConsoleOutput(lines=cfg.console, progress=progress, verbose=cfg.verbose, out=out,
                                    err=err_stream))
    return stages
