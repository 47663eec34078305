"""Saved sessions (`.fcs`): a finished stream's state, to ask questions later without the video.

An `.fcs` file is a zip archive (stored, not compressed: the cache is float data) of:

    manifest.json         format, framecast version, source fingerprint, model, the session and
                          narration settings of the run, the cache window (media seconds)
    session.safetensors   the KV cache and its spans (`StreamingSession.save`)
    narrations.jsonl      the narration log: every narration of the run (also those the cache
                          evicted), one event envelope a line
    transcript.jsonl      the conversation in order: narrations, questions and answers
    chapters.jsonl        the chapters (`chapter` events)
    summary.json          the `summary` event (absent when the run produced none)

`SessionArchiveStage` writes it when the input ends (also after Ctrl-C: the state so far). It
is written to a temporary file beside the target and renamed, so a crash never leaves half an
archive under the final name. `read_archive` reads one back with one-line errors.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from framecast import __version__
from framecast.errors import FatalError, UserError
from framecast.events import (Answer, Chapter, Event, Frame, Narration, Question, QuestionRecord, Status, Summary,
                              event_from_dict, iso_utc, utc_now)
from framecast.runtime import Stage
from framecast.stages.media_end import MediaEnd

ARCHIVE_FORMAT = "framecast-fcs-1"
SESSION_ENTRY = "session.safetensors"


def cache_window(session: Any) -> tuple[float | None, float | None]:
    """(first, last) media time of the frames the session's KV cache still holds."""
    spans = getattr(getattr(session, "core", None), "spans", None) or []
    pts = [s.pts for s in spans if getattr(s, "kind", "") == "frame" and s.pts is not None]
    return (min(pts), max(pts)) if pts else (None, None)


@dataclass
class Archive:
    """What `read_archive` returns. `path` is the `.fcs` file."""

    path: Path
    manifest: dict[str, Any]
    narrations: list[Narration] = field(default_factory=list)
    transcript: list[Event] = field(default_factory=list)
    chapters: list[Chapter] = field(default_factory=list)
    summary: Summary | None = None

    def extract_session(self, directory: str | Path) -> Path:
        """Unpack the cache file into `directory`; returns its path (for `StreamingSession.load`)."""
        out = Path(directory) / SESSION_ENTRY
        with zipfile.ZipFile(self.path) as z, z.open(SESSION_ENTRY) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        return out


def _events(text: str, kind: type[Event] | tuple[type[Event], ...]) -> list:
    out = []
    for line in text.splitlines():
        if line.strip():
            ev = event_from_dict(json.loads(line))
            if isinstance(ev, kind):
                out.append(ev)
    return out


def read_archive(path: str | Path) -> Archive:
    """Read a `.fcs` file. Raises UserError (one line naming the file) if it is not one."""
    path = Path(path)
    if path.is_dir():
        fcs = sorted(path.glob("*.fcs"))
        hint = f"; it holds {fcs[0].name}{' and others' if len(fcs) > 1 else ''}" if fcs else ""
        raise UserError(f"{path}: is a directory, not a saved session (an .fcs file){hint}")
    if not path.is_file():
        raise UserError(f"{path}: saved session not found")
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            missing = [n for n in ("manifest.json", SESSION_ENTRY) if n not in names]
            if missing:
                raise UserError(f"{path}: not a framecast saved session (no {missing[0]})")
            manifest = json.loads(z.read("manifest.json"))
            if manifest.get("format") != ARCHIVE_FORMAT:
                raise UserError(f"{path}: unsupported saved-session format {manifest.get('format')!r} "
                                f"(this framecast reads {ARCHIVE_FORMAT})")

            def text(name: str) -> str:
                return z.read(name).decode("utf-8") if name in names else ""

            summary = _events(text("summary.json"), Summary)
            return Archive(path, manifest, narrations=_events(text("narrations.jsonl"), Narration),
                           transcript=_events(text("transcript.jsonl"), (Narration, Question, Answer)),
                           chapters=_events(text("chapters.jsonl"), Chapter),
                           summary=summary[0] if summary else None)
    except UserError:
        raise
    except (zipfile.BadZipFile, json.JSONDecodeError, KeyError, ValueError, UnicodeDecodeError) as e:
        if is_state_file(path):
            raise UserError(f"{path}: a session.state_file (the cache alone), not a --save-session archive: "
                            "name it in session.state_file to continue it") from None
        raise UserError(f"{path}: not a framecast saved session ({type(e).__name__}: {e})") from None


def is_state_file(path: str | Path) -> bool:
    """Whether `path` holds what `session.state_file` writes (safetensors with framecast_session
    metadata) rather than a `--save-session` archive (a zip)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            return 0 < n < 2**24 and b"framecast_session" in f.read(n)
    except OSError:
        return False


def write_archive(path: str | Path, session_file: Path, manifest: dict[str, Any], *,
                  narrations: list[Narration], transcript: list[Event], chapters: list[Chapter],
                  summary: Summary | None) -> Path:
    """Write the archive atomically (temporary file beside `path`, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
            z.writestr("manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False))
            z.write(session_file, SESSION_ENTRY)
            z.writestr("narrations.jsonl", "".join(e.to_json() + "\n" for e in narrations))
            z.writestr("transcript.jsonl", "".join(e.to_json() + "\n" for e in transcript))
            z.writestr("chapters.jsonl", "".join(e.to_json() + "\n" for e in chapters))
            if summary is not None:
                z.writestr("summary.json", summary.to_json() + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class SessionResume(Stage):
    """Loads a saved session's cache into the stream's session when the graph starts (after the
    decode stage's own start, before any frame), then passes everything through."""

    name = "resume"

    def __init__(self, archive: Archive, session: Any):
        super().__init__()
        self.archive = archive
        self.session = session

    async def start(self) -> None:
        with tempfile.TemporaryDirectory(prefix="framecast-resume-") as tmp:
            inner = self.archive.extract_session(tmp)
            try:
                await self.session.load(inner)
            except UserError as e:  # e.g. saved for another model: one line naming the .fcs, exit 2
                raise FatalError(str(e).replace(str(inner), str(self.archive.path)), exit_code=2) from None


class SessionArchiveStage(Stage):
    """Collects the narration log, transcript, chapters and summary; at the end of the input
    saves them with the stream's KV cache as one `.fcs` archive.

    `manifest` carries what the composition root knows (model, session and narration settings);
    `fingerprint` is the source's (`framecast.stages.sources.fingerprint`), taken at start."""

    name = "save_session"

    def __init__(self, path: str, session: Any, *, manifest: dict[str, Any], fingerprint: dict[str, Any],
                 stream_id: str = "default"):
        super().__init__()
        self.path = Path(path)
        self.session = session
        self.manifest = dict(manifest)
        self.fingerprint = fingerprint
        self.stream_id = stream_id
        self.narrations: list[Narration] = []
        self.transcript: list[Event] = []
        self.chapters: list[Chapter] = []
        self.summary: Summary | None = None
        self.frames = 0
        self._end = MediaEnd()
        self.saved: Path | None = None
        self.failed = False

    def resume_from(self, archive: Archive) -> None:
        """Continue a saved session: the new archive holds the old log, transcript and chapters too."""
        self.narrations = list(archive.narrations)
        self.transcript = list(archive.transcript)
        self.chapters = list(archive.chapters)

    async def start(self) -> None:
        # A bad path fails now, before any work, with one line (nothing is created).
        parent = self.path.parent
        why = ("no such directory" if not parent.is_dir() else "is a directory" if self.path.is_dir()
               else "permission denied" if not os.access(parent, os.W_OK) else None)
        if why:
            raise FatalError(f"{self.path}: cannot write the saved session: {why}", exit_code=2)

    async def process(self, item: Event) -> AsyncIterator[Event]:
        if isinstance(item, Narration) and item.text.strip():
            self.narrations.append(item)
            self.transcript.append(item)
        elif isinstance(item, (QuestionRecord, Answer)):  # the decoder records each question before its answer
            self.transcript.append(item)
        elif isinstance(item, Chapter):
            self.chapters.append(item)
        elif isinstance(item, Summary):
            self.summary = item
        elif isinstance(item, Frame):
            self.frames += 1
        if isinstance(item, (Frame, Status)):
            self._end.see(item)
        yield item

    def media_end(self) -> float | None:
        return self._end.end(getattr(self.handle, "stopped_by", "eos"))

    async def save(self) -> Path:
        first, _ = cache_window(self.session)
        manifest = {
            "format": ARCHIVE_FORMAT,
            "framecast": __version__,
            "created": iso_utc(utc_now()),
            "stream_id": self.stream_id,
            "source": self.fingerprint,
            **self.manifest,
            "frames": self.frames,
            "media_end": self.media_end(),
            "cache_window": [first, self.media_end()],
            "stopped_by": getattr(self.handle, "stopped_by", "eos"),
        }
        with tempfile.TemporaryDirectory(prefix="framecast-fcs-") as tmp:
            cache_file = await self.session.save(Path(tmp) / SESSION_ENTRY)
            self.saved = write_archive(self.path, cache_file, manifest, narrations=self.narrations,
                                       transcript=self.transcript, chapters=self.chapters, summary=self.summary)
        return self.saved

    async def on_end(self) -> AsyncIterator[Event]:
        from framecast.stages.summary import report

        from framecast.stages.outputs.files import keep_existing

        if keep_existing(self.path, self.handle):  # no frame read: an earlier session stays as it was
            return
        t0 = time.perf_counter()
        try:
            await self.save()
        except Exception as e:  # one line and exit status 1; raising here would stall the end marker
            self.failed = True
            yield report(self, f"{self.path}: cannot save the session: {type(e).__name__}: {e}", fatal=True)
            return
        self.metrics.extra["save_ms"] = round((time.perf_counter() - t0) * 1e3, 1)

    async def close(self) -> None:
        if self.saved is None and self.frames and not self.failed:  # cancelled before the end marker
            await self.save()


def check_source(archive: Archive, uri: str | None, *, source_cfg: Any = None, force: bool = False) -> str | None:
    """Refuse (UserError, one line) a saved session used with another video than its own.

    `uri` is the video given now and `source_cfg` its settings (the demo source's seed and size
    are part of what it shows; without them, as `framecast ask --source demo` gives none, the
    saved ones are taken); without a uri, a file still at the saved path is checked (a replaced
    file is another video). Returns a warning line when `force` let a mismatch through."""
    from framecast.stages.sources.fingerprint import describe, fingerprint, mismatch

    saved = archive.manifest.get("source") or {}
    if uri is None:
        if saved.get("kind") != "file" or not os.path.isfile(saved.get("path", "")):
            return None
        uri = saved["path"]
    current = fingerprint(uri, source_cfg)
    if source_cfg is None and current.get("kind") == "demo" == saved.get("kind"):
        current = {**current, **{k: saved.get(k) for k in ("seed", "width", "height")}}
    why = mismatch(saved, current)
    if why is None:
        return None
    line = f"{archive.path}: saved from {describe(saved)}, not {describe(current)}: {why}"
    if not force:
        raise UserError(line + " (--force to use it anyway)")
    return line
