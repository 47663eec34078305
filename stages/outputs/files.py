"""What every file output shares: checking its path up front, opening it with a one-line error."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

from framecast.config import check_output_clashes, local_path, output_paths, same_path_key
from framecast.errors import FatalError, UserError


def check_output_path(path: str, what: str) -> None:
    """Refuse, before anything is written, an output path that cannot be created: its parent
    directory is missing (never created silently: a typo would scatter files) or is not a
    directory, the path is a directory, or it is not writable. Raises UserError (exit 2) with
    one line naming the path."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise UserError(f"{path}: cannot write {what} output: is a directory")
    if not parent.exists():
        raise UserError(f"{path}: cannot write {what} output: no such directory '{parent}'")
    if not parent.is_dir():
        raise UserError(f"{path}: cannot write {what} output: '{parent}' is not a directory")
    if not os.access(p if p.exists() else parent, os.W_OK):
        raise UserError(f"{path}: cannot write {what} output: permission denied")


def _input_files(cfg) -> list[tuple[str, str]]:
    """The local files a run reads: `(dotted key, path)` (a URL, a camera or the demo has none)."""
    out = []
    uri = cfg.source.uri
    if uri.lower().startswith("file://"):
        out.append(("source.uri", local_path(uri)))
    elif uri != "demo" and "://" not in uri and not uri.startswith(("camera:", "/dev/video")):
        out.append(("source.uri", uri))
    # a model directory (the HF layout; none given = the embedded demo model) is read file by file:
    # an output must not replace its config, tokenizer or weights
    from framecast.model.load import DEMO_MODEL_DIR

    model_dir = cfg.model.path or str(DEMO_MODEL_DIR)
    if os.path.isdir(model_dir):
        out += [("model.path", str(f)) for f in sorted(Path(model_dir).iterdir()) if f.is_file()]
    for key, path in (("session.resume", cfg.session.resume), ("model.path", cfg.model.path),
                      ("model.mmproj", cfg.model.mmproj)):
        if path and os.path.isfile(path):
            out.append((key, path))
    return out


def _same_file(a: str, b: str) -> bool:
    if same_path_key(a) == same_path_key(b):
        return True
    try:  # hard links (and anything else the file system knows is one file)
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def check_run_outputs(configs: list) -> None:
    """The one up-front check of every file a run (all its streams) will write, before the
    model loads or any source opens: each path must be writable (`check_output_path`), no output
    may be a file the run reads (the source video, the session it resumes, the model), and no
    two outputs may be one file (same path, a symbolic or a hard link). `session.state_file` is
    read and written by design, and `outputs.session` may replace the session it resumes (it is
    read first and written by a rename). Raises UserError (exit 2) with one line; nothing is
    created or truncated then."""
    check_output_clashes(configs)
    written: list[tuple[str, str, str]] = []
    for cfg in configs:
        sid = cfg.source.stream_id
        for key, path, what in output_paths(cfg):
            check_output_path(path, what if len(configs) == 1 else f"{what} (stream {sid})")
            for in_key, in_path in _input_files(cfg):
                if key in ("session.state_file", "outputs.session") and in_key == "session.resume":
                    continue
                if _same_file(path, in_path):
                    raise UserError(f"{path}: {key} is the file {in_key} reads: writing it would destroy the "
                                    "input (give the output another name)")
            for other_key, other_path, other_sid in written:
                if _same_file(path, other_path):
                    whose = f" of stream {other_sid!r}" if other_sid != sid else ""
                    raise UserError(f"{path}: {key} is the same file as {other_key}{whose} "
                                    "(give each output its own file)")
            written.append((key, path, sid))
    for cfg in configs:  # several streams: one stream's output must not be another's input
        for other in configs:
            if other is cfg:
                continue
            for key, path, _what in output_paths(cfg):
                for in_key, in_path in _input_files(other):
                    if _same_file(path, in_path):
                        raise UserError(f"{path}: {key} of stream {cfg.source.stream_id!r} is the file {in_key} of "
                                        f"stream {other.source.stream_id!r} reads (give the output another name)")


def frames_read(handle: object) -> int:
    """Frames the run's source has delivered (outside a runtime: taken as started)."""
    return getattr(handle, "frames_read", 1) if handle is not None else 1


def keep_existing(path: str | Path, handle: object) -> bool:
    """Whether a whole-file output must leave `path` alone: it exists and the run has not read
    its first frame (it failed or was stopped at its start), so there is nothing to replace it with."""
    return frames_read(handle) == 0 and os.path.lexists(path)


class OutputFile:
    """A text output file that destroys nothing until the run has something to put in it, and
    reports a failure to write once.

    A new path is created at once (line buffered). A file that already exists is not
    truncated until the run's source delivers its first frame: what is written before that
    (a `running` status, a header) waits in memory and goes out then. A run that ends before
    its first frame leaves an existing file exactly as it was, and its buffered lines are
    dropped. The first failed write (disk full, I/O error, a device that refuses data) raises
    one `FatalError` naming the file (an output that can no longer write ends the run) and
    makes every later write, flush and close a quiet no-op, so closing the other outputs goes
    on. `flush` and `close` are safe to call at any time."""

    def __init__(self, path: str, stage: str, handle: object = None):
        self.path, self.stage, self.handle = path, stage, handle
        self._buf: list[str] = []
        self._f: IO[str] | None = None
        self.kept = False  # an existing file was left alone (the run read no frame)
        self.failed = False
        if not os.path.lexists(path):
            self._open()

    def _open(self) -> None:
        try:
            self._f = open(Path(self.path), "w", encoding="utf-8", buffering=1, newline="\n")
        except OSError as e:
            raise FatalError(f"{self.path}: cannot write {self.stage} output: {e.strerror or e}", exit_code=2) from None
        if self._buf:
            pending, self._buf = "".join(self._buf), []
            self._write(pending)

    def _fail(self, e: OSError) -> FatalError:
        self.failed = True
        try:
            if self._f is not None:
                self._f.close()
        except OSError:
            pass  # the buffered rest cannot be written either; the failure is already reported
        return FatalError(f"{self.path}: cannot write {self.stage} output: {e.strerror or e}")

    def _write(self, text: str) -> int:
        assert self._f is not None
        try:
            return self._f.write(text)
        except OSError as e:
            raise self._fail(e) from None

    def write(self, text: str) -> int:
        if self.failed:
            return 0
        if self._f is None and frames_read(self.handle) > 0:
            self._open()
        if self._f is None:
            self._buf.append(text)
            return len(text)
        return self._write(text)

    def flush(self) -> None:
        if self.failed or self._f is None:
            return
        try:
            self._f.flush()
        except OSError as e:
            raise self._fail(e) from None

    def close(self) -> None:
        if self.failed:
            return
        if self._f is None and frames_read(self.handle) > 0:
            self._open()  # what was buffered (e.g. a WebVTT header) replaces the earlier file
        if self._f is None:
            self.kept = bool(self._buf) or os.path.lexists(self.path)
            self._buf.clear()
            return
        try:
            self._f.close()
        except OSError as e:
            raise self._fail(e) from None

    @property
    def closed(self) -> bool:
        return self.failed or (self._f is not None and self._f.closed)


def open_for_writing(path: str, stage: str, handle: object = None) -> OutputFile:
    """Open an output file for writing, line buffered; a missing directory is not created. With
    the stage's `handle`, an existing file is truncated only once the run has read a frame
    (`OutputFile`). Raises FatalError (exit 2, one line) when the file cannot be opened, and
    once (exit 1) when a write fails."""
    return OutputFile(path, stage, handle)
