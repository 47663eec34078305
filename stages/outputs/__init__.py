"""Outputs: the live terminal view (lines + progress bar), JSONL, SRT and WebVTT.

Every output passes every event through unchanged (an MQTT stage may come after them) and
writes as it goes, flushing per event, so a crash or a kill loses nothing already produced.

Subtitle conventions follow Whisper's writers: SRT cues numbered from 1 with
`HH:MM:SS,mmm` times (hours always, comma decimals); WebVTT with a `WEBVTT` header and
`HH:MM:SS.mmm` times. `cue_text` makes any text safe (arrows, line breaks of every kind, blank
lines, control characters, edge whitespace), and times are always finite and in order. A cue
runs from its narration's start until the next narration starts (the last one until its own
`pts_end`, and at least until the end of the input when the eof status says where that is),
because a narration describes the scene until something new is said.

Output paths are checked before anything starts (`check_output_path`): a missing parent
directory, a directory, or an unwritable place is exit 2 with one line, and nothing is created.
"""

from __future__ import annotations

import sys
from typing import IO

from framecast.config import OutputsConfig
from framecast.runtime import Stage
from framecast.stages.outputs.console import ConsoleOutput, clock
from framecast.stages.outputs.files import check_output_path
from framecast.stages.outputs.jsonl import JsonlOutput
from framecast.stages.outputs.subtitles import SubtitleOutput, cue_text, subtitle_time

__all__ = ["ConsoleOutput", "JsonlOutput", "SubtitleOutput", "check_output_path", "clock", "cue_text", "make_outputs",
           "subtitle_time"]


def make_outputs(cfg: OutputsConfig, *, live: bool, out: IO[str] | None = None,
                 err: IO[str] | None = None) -> list[Stage]:
    """The output stages for a run. The progress bar defaults to on for recorded input when
    stderr is a terminal; `progress = true` forces it (e.g. when stderr is piped to a log).
    Raises UserError (exit 2) for an output path that cannot be written, before any is created."""
    for path, what in ((cfg.jsonl, "JSONL"), (cfg.srt, "SRT"), (cfg.vtt, "VTT")):
        if path:
            check_output_path(path, what)
    stages: list[Stage] = []
    if cfg.jsonl:
        stages.append(JsonlOutput(cfg.jsonl, frames=cfg.jsonl_frames, partials=cfg.jsonl_partials))
    if cfg.srt:
        stages.append(SubtitleOutput(cfg.srt, fmt="srt"))
    if cfg.vtt:
        stages.append(SubtitleOutput(cfg.vtt, fmt="vtt"))
    err_stream = err or sys.stderr
    progress = cfg.progress if cfg.progress is not None else (not live and err_stream.isatty())
    if cfg.console or progress:
        stages.append(ConsoleOutput(lines=cfg.console, progress=progress, verbose=cfg.verbose, out=out,
                                    err=err_stream))
    return stages
