"""`framecast` console script: argument parsing and dispatch (part of the composition root).

Subcommands: run, config check, convert, generate, ask, worker, submit. User errors print one line
(`framecast: …`) and exit non-zero (2 for bad arguments/config/input); no tracebacks for them.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from typing import Any

from framecast import __version__
from framecast.errors import UserError
from framecast.redact import redact_text


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage otherwise)
        self.exit(2, f"framecast: {message}\n")


def _run_overrides(a: argparse.Namespace) -> dict[str, Any]:
    """CLI flags as dotted config keys (only those given)."""
    pairs = {
        **_source_overrides(a.source or [], a.stream_id or []), "source.fps": a.fps,
        "source.max_frames": a.max_frames, "source.start": a.start, "source.end": a.end,
        "source.realtime": a.realtime, "source.seed": a.seed,
        "source.watchdog_s": a.watchdog, "source.open_timeout_s": a.open_timeout,
        "source.reconnect_max": a.reconnect_max, "source.backoff_initial_s": a.backoff,
        "change.threshold": a.change_threshold, "change.enabled": False if a.no_change else None,
        "runtime.capture_only": a.capture_only or None,
        "model.path": a.model, "model.mmproj": a.mmproj,
        "narration.policy": a.policy, "narration.interval_s": a.interval,
        "narration.prompt": a.prompt, "narration.max_tokens": a.max_tokens,
        "outputs.jsonl": a.jsonl, "outputs.srt": a.srt, "outputs.vtt": a.vtt,
        "outputs.chapters": a.chapters, "outputs.summary": a.summary, "outputs.session": a.save_session,
        "outputs.metrics": a.metrics or None, "outputs.metrics_interval_s": a.metrics_interval,
        "outputs.console": False if a.no_console else None, "outputs.progress": a.progress,
        "outputs.verbose": a.verbose or None, "outputs.preview": a.preview or None,
        "outputs.annotate": a.annotate, "outputs.report": a.report,
        "mqtt.url": a.mqtt, "mqtt.prefix": a.mqtt_prefix, "mqtt.ha_discovery": a.ha_discovery or None,
        "mqtt.ca_file": a.mqtt_ca, "mqtt.cert_file": a.mqtt_cert, "mqtt.key_file": a.mqtt_key,
        "session.max_cache_tokens": a.max_cache_tokens, "session.kv_bits": a.kv_bits,
        "session.resume": a.resume, "session.force": a.force or None,
    }
    out = {k: v for k, v in pairs.items() if v is not None}
    for item in a.set or []:  # generic `--set group.key=value`, applied last
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise UserError(f"--set {item!r}: expected group.key=value, e.g. source.fps=2")
        out[key.strip()] = _scalar(raw)
    return out


def _source_overrides(sources: list[str], ids: list[str]) -> dict[str, Any]:
    """Repeatable `--source URI[#id]` (or `--stream-id`, one per source, URIs taken whole): one
    source sets `source.uri`; several become the `streams` list. Either way they replace the
    config file's `[[streams]]` (flags win)."""
    from framecast.config import split_stream_uri

    if len(sources) > 1 and ids and len(ids) != len(sources):
        raise UserError(f"--stream-id given {len(ids)} times for {len(sources)} --source flags "
                        "(give one per source, or name them as URI#id)")
    if len(ids) > 1 and len(sources) <= 1:
        raise UserError(f"--stream-id given {len(ids)} times for {len(sources)} --source flag(s)")
    # with --stream-id the URI is taken whole (a URL fragment stays a fragment)
    split = [(raw, None) for raw in sources] if ids else [split_stream_uri(raw) for raw in sources]
    if len(sources) <= 1:
        uri, frag = split[0] if split else (None, None)
        out = {"source.uri": uri, "source.stream_id": frag or (ids[0] if ids else None)}
        if sources:
            out["streams"] = []
        return out
    return {"streams": [{"id": frag or (ids[i] if ids else None), "source": {"uri": uri}}
                        for i, (uri, frag) in enumerate(split)]}


def _scalar(raw: str) -> Any:
    """A command-line value as YAML reads it: 2 -> int, 0.5 -> float, true -> bool, null -> None."""
    import yaml

    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


RUN_EXAMPLES = """examples:
  framecast run                                          # the demo scene, narrated in the terminal
  framecast run --source talk.mp4 --jsonl talk.jsonl --srt talk.srt
  framecast run --source camera:0 --fps 2 --policy change
  framecast run --source rtsp://user:pass@cam.lan/stream1 --stream-id frontdoor \\
                --mqtt mqtt://user:pass@broker.lan:1883
  framecast run --config camera-narration --set narration.interval_s=5
  framecast run --source talk.mp4 --chapters talk.chapters.vtt --summary talk.md --save-session talk.fcs

Ctrl-C stops cleanly (queued events are written, files closed, exit 130); a second Ctrl-C stops
at once (files still closed); a third exits without waiting."""

ASK_EXAMPLES = """examples:
  framecast ask --mqtt mqtt://broker.lan:1883 --stream frontdoor "Is the door open?"
  framecast ask --session talk.fcs "What is on the slide?"                  # offline, no video decoding
  framecast ask --session talk.fcs --source talk.mp4 "What happened in chapter 2?"
  framecast ask --mqtt mqtts://cam:secret@broker.lan:8883 --mqtt-ca ca.crt \\
                --mqtt-cert me.crt --mqtt-key me.key --stream frontdoor "Who is there?"
  framecast ask --mqtt mqtt://localhost --prefix home/cams --timeout 10 "How many people?"
"""


def _d(key: str) -> str:
    """The built-in default of config key `group.key`, as a help text shows it."""
    from framecast.config import RunConfig

    group, name = key.split(".")
    value = getattr(getattr(RunConfig(), group), name)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="framecast", description="Streaming video understanding with MiniCPM-V on MLX.")
    p.add_argument("--version", action="version", version=f"framecast {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="watch a source and narrate it", epilog=RUN_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Watch a source and narrate it.\n\nFlags override the --config file; the "
                                   "defaults shown are the built-in ones\n(a preset or config file may change them).")
    r.add_argument("--config", help="TOML/YAML file or preset name (see `framecast config list`) (default: none)")
    r.add_argument("--source", action="append",
                   help="demo | FILE | rtsp://… | http(s)://… | camera:N; repeat for several streams on one "
                        f"model, each named URI#id or by --stream-id (default: {_d('source.uri')})")
    r.add_argument("--stream-id", action="append",
                   help="name of the stream in events and MQTT topics, 1-64 of [A-Za-z0-9_.-]; one per --source "
                        "when repeated "
                                       f"(default: {_d('source.stream_id')})")
    r.add_argument("--fps", type=float, help="sample rate in frames per second (default: the source's own rate)")
    r.add_argument("--max-frames", type=int, metavar="N", help="stop after N frames (default: no limit)")
    r.add_argument("--start", type=float, metavar="S", help=f"seconds into a recorded file (default: {_d('source.start')})")
    r.add_argument("--end", type=float, metavar="S", help="stop at this media time in seconds (default: the end)")
    r.add_argument("--seed", type=int, help=f"seed of the demo source (default: {_d('source.seed')})")
    r.add_argument("--realtime", action=argparse.BooleanOptionalAction, default=None,
                   help="pace recorded input at its own frame rate (default: on for the endless demo, off for files)")
    r.add_argument("--watchdog", type=float, metavar="S",
                   help=f"live sources: reconnect after S s without a frame (default: {_d('source.watchdog_s')})")
    r.add_argument("--open-timeout", type=float, metavar="S",
                   help=f"live sources: give up opening after S s (default: {_d('source.open_timeout_s')})")
    r.add_argument("--reconnect-max", type=int, metavar="N",
                   help=f"live sources: attempts before giving up (default: {_d('source.reconnect_max')})")
    r.add_argument("--backoff", type=float, metavar="S",
                   help=f"live sources: first reconnect delay, doubling (default: {_d('source.backoff_initial_s')})")
    r.add_argument("--change-threshold", type=float, metavar="X",
                   help=f"scene-change score threshold, 0..1 (default: {_d('change.threshold')})")
    r.add_argument("--no-change", action="store_true", help="no scene-change detection (default: detect)")
    r.add_argument("--capture-only", action="store_true",
                   help="no model: capture, scene changes and outputs only (default: off)")
    r.add_argument("--model", help="HF dir, converted MLX dir, HF repo id or .gguf (default: the embedded demo model)")
    r.add_argument("--mmproj", help="vision .gguf for a .gguf language model (default: none)")
    r.add_argument("--policy", choices=["interval", "change", "on_demand"],
                   help="when to narrate: every --interval, on a scene change, or only answer questions "
                        f"(default: {_d('narration.policy')})")
    r.add_argument("--interval", type=float, metavar="S",
                   help=f"media seconds between narrations (policy interval) (default: {_d('narration.interval_s')})")
    r.add_argument("--prompt", help=f"what to ask for each narration (default: {_d('narration.prompt')!r})")
    r.add_argument("--max-tokens", type=int, metavar="N",
                   help=f"tokens per narration or answer at most (default: {_d('narration.max_tokens')})")
    r.add_argument("--jsonl", metavar="FILE", help="write every event as one JSON line (default: none)")
    r.add_argument("--srt", metavar="FILE", help="write narrations as SRT subtitles (default: none)")
    r.add_argument("--vtt", metavar="FILE", help="write narrations as WebVTT subtitles (default: none)")
    r.add_argument("--chapters", metavar="OUT.vtt",
                   help="write the chapters (titled by the model) as a WebVTT chapters file (default: none)")
    r.add_argument("--summary", metavar="OUT.md",
                   help="write the summary of the whole video as Markdown, at the end of the input (default: none)")
    r.add_argument("--save-session", metavar="OUT.fcs",
                   help="save the stream's state at the end (KV cache, narration log, chapters) for "
                        "`framecast ask --session` and --resume (default: none)")
    r.add_argument("--resume", metavar="FILE.fcs",
                   help="continue a saved session on its own video; a file is read on from where the saved run "
                        "ended (default: none)")
    r.add_argument("--force", action="store_true",
                   help="with --resume: continue a saved session even on another video (default: refused)")
    r.add_argument("--no-console", action="store_true", help="no live terminal view (default: shown)")
    r.add_argument("-v", "--verbose", action="store_true",
                   help="terminal: also show scene changes, always in JSONL and on the bus (default: off)")
    r.add_argument("--preview", action="store_true",
                   help="a window with the newest frame and the narration as subtitles; q/Esc stops like Ctrl-C "
                        "(default: off)")
    r.add_argument("--annotate", metavar="OUT.mp4",
                   help="write the video with the narrations burned in, and OUT.vtt beside it (default: none)")
    r.add_argument("--report", metavar="OUT.html", help="write a self-contained HTML report (default: none)")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: on for recorded files when stderr is a terminal)")
    r.add_argument("--metrics", action="store_true", help="print per-stage metrics periodically and at exit "
                                                          "(default: off)")
    r.add_argument("--metrics-interval", type=float, metavar="S",
                   help=f"seconds between metrics (stderr, MQTT) (default: {_d('outputs.metrics_interval_s')})")
    r.add_argument("--mqtt", metavar="URL", help="publish to and take questions from an MQTT broker: "
                                                 "mqtt://user:pass@host:port or mqtts://… (default: none)")
    r.add_argument("--mqtt-prefix", metavar="PREFIX", help=f"MQTT topic prefix (default: {_d('mqtt.prefix')})")
    r.add_argument("--mqtt-ca", metavar="FILE", help="CA certificate for mqtts:// (default: the system's)")
    r.add_argument("--mqtt-cert", metavar="FILE", help="client certificate for mqtts:// (default: none)")
    r.add_argument("--mqtt-key", metavar="FILE", help="private key of --mqtt-cert (default: none)")
    r.add_argument("--ha-discovery", action="store_true", help="publish Home Assistant discovery (default: off)")
    r.add_argument("--max-cache-tokens", type=int, metavar="N",
                   help="bound the KV cache; older frames are evicted (default: unbounded, or the model's)")
    r.add_argument("--kv-bits", type=int, choices=[4, 8], help="quantise the KV cache (default: not quantised)")
    r.add_argument("--set", action="append", metavar="GROUP.KEY=VALUE",
                   help="override any config key (repeatable), e.g. --set source.width=320 (default: none)")

    c = sub.add_parser("config", help="inspect configuration")
    csub = c.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    cc = csub.add_parser("check", help="validate a config file")
    cc.add_argument("file")
    csub.add_parser("list", help="list the presets in configs/")
    cs = csub.add_parser("show", help="print the effective config as TOML-like JSON")
    cs.add_argument("file", nargs="?")

    cv = sub.add_parser("convert", help="write a fast-loading MLX model directory")
    cv.add_argument("src", help="HF checkpoint dir or language-model .gguf")
    cv.add_argument("out")
    cv.add_argument("--mmproj", help="vision .gguf that goes with a .gguf language model")
    cv.add_argument("--bits", type=int, choices=[4, 8], help="quantise linear layers (group 64)")
    cv.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])

    g = sub.add_parser("generate", help="text-only generation (check a model)")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temp", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the chat template")

    a = sub.add_parser("ask", help="ask a running stream (over MQTT) or a saved session (offline) a question",
                       epilog=ASK_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Ask a running stream a question over MQTT, or a saved session (.fcs) offline, "
                                   "and print the answer.\n\nExit 1 with one line on a timeout, a refused "
                                   "connection or an error answer; exit 2 for a saved session of another video.")
    a.add_argument("question", help="the question, in plain text")
    a.add_argument("--mqtt", metavar="URL",
                   help="the broker the stream publishes to: mqtt://user:pass@host:port or mqtts://… "
                        "(default: none; give --mqtt or --session)")
    a.add_argument("--session", metavar="FILE.fcs",
                   help="answer offline from a saved session (run --save-session), without the video; says which "
                        "time span the answer draws on (default: none; give --mqtt or --session)")
    a.add_argument("--source", metavar="VIDEO",
                   help="with --session: the video it must belong to, checked by fingerprint (default: the saved "
                        "path, if the file is still there)")
    a.add_argument("--force", action="store_true",
                   help="with --session: use it even for another video (default: refused)")
    a.add_argument("--model", help="with --session: the model to load (default: the one the run used)")
    a.add_argument("--max-tokens", type=int, metavar="N",
                   help="with --session: tokens of the answer at most (default: the run's narration.max_tokens)")
    a.add_argument("--json", action="store_true",
                   help="with --session: print the answer event as JSON, with pts_start, pts_end, basis "
                        "(default: the answer, then a line naming its span)")
    a.add_argument("--stream", default="default", help="the stream's id (its --stream-id; several streams may run on one model) (default: %(default)s)")
    a.add_argument("--prefix", default="framecast", help="the stream's MQTT topic prefix (default: %(default)s)")
    a.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="give up after S seconds without an answer (default: %(default)g)")
    a.add_argument("--mqtt-ca", metavar="FILE", help="CA certificate for mqtts:// (default: the system's)")
    a.add_argument("--mqtt-cert", metavar="FILE", help="client certificate for mqtts:// (default: none)")
    a.add_argument("--mqtt-key", metavar="FILE", help="private key of --mqtt-cert (default: none)")

    w = sub.add_parser("worker", help="take jobs (or live streams) from an MQTT broker, with other workers")
    w.add_argument("--mqtt", required=True, help="mqtt://user:pass@host:port or mqtts://… (MQTT 5) (required)")
    w.add_argument("--group", default="framecast",
                   help="shared-subscription group: the workers of one prefix share its jobs (one group per prefix) "
                        "(default: %(default)s)")
    w.add_argument("--worker-id", help="stable name of this worker (its persistent session) (default: the host name)")
    w.add_argument("--prefix", default="framecast", help="MQTT topic prefix (default: %(default)s)")
    w.add_argument("--streams", action="store_true",
                   help="run live streams from <prefix>/streams instead of jobs (default: off, jobs)")
    w.add_argument("--config", help="TOML/YAML file or preset: the base of every job / stream run (default: none)")
    w.add_argument("--set", action="append", metavar="GROUP.KEY=VALUE",
                   help="override a config key (repeatable) (default: none)")
    w.add_argument("--capture-only", action="store_true",
                   help="no model (capture, scene changes, outputs) (default: off)")
    w.add_argument("--model", help="the model every job uses (loaded once) (default: the embedded demo model)")
    w.add_argument("--mmproj", help="vision .gguf for a .gguf language model (default: none)")
    w.add_argument("--max-attempts", type=int, default=3,
                   help="give a job up after this many lost workers (default: %(default)s)")
    w.add_argument("--output-dir", metavar="DIR",
                   help="job output files go under DIR (default: none, the paths as the job gives them)")
    w.add_argument("--reap-after", type=float, default=60.0, metavar="S",
                   help="move the queued jobs of a worker gone this long back to the queue (0: never) "
                        "(default: %(default)g)")
    w.add_argument("--session-expiry", type=int, default=3600, metavar="S",
                   help="the broker keeps this worker's queued jobs this long while it is away (default: %(default)s)")
    w.add_argument("--keepalive", type=int, default=10, metavar="S",
                   help="MQTT keepalive (loss noticed after 1.5x) (default: %(default)s)")
    w.add_argument("--mqtt-ca", metavar="FILE", help="CA certificate for mqtts:// (default: the system's)")
    w.add_argument("--mqtt-cert", metavar="FILE", help="client certificate for mqtts:// (default: none)")
    w.add_argument("--mqtt-key", metavar="FILE", help="private key of --mqtt-cert (default: none)")

    sb = sub.add_parser("submit", help="queue recorded videos for the workers (or publish the live stream list)")
    sb.add_argument("files", nargs="*", metavar="FILE", help="video files, URLs or `demo`")
    sb.add_argument("--mqtt", required=True, metavar="URL",
                    help="the broker the workers use: mqtt://user:pass@host:port or mqtts://… (required)")
    sb.add_argument("--prefix", default="framecast", help="MQTT topic prefix of the workers (default: %(default)s)")
    sb.add_argument("--wait", action="store_true",
                    help="print results and wait until every job is done (default: off, return once queued)")
    sb.add_argument("--timeout", type=float, default=3600.0, metavar="S",
                    help="--wait gives up after S s (default: %(default)g)")
    sb.add_argument("--set", action="append", metavar="GROUP.KEY=VALUE",
                    help="a job setting (source.*, change.*, narration.*, outputs.*, session.*) (default: none)")
    sb.add_argument("--as-is", action="store_true",
                    help="send paths unchanged (they exist only on the workers) (default: off, made absolute)")
    sb.add_argument("--force", action="store_true",
                    help="submit even if no job worker has joined the prefix (default: refused)")
    sb.add_argument("--stream", action="append", metavar="ID=SOURCE",
                    help="publish the retained live-stream list instead (repeatable; replaces the list) "
                         "(default: none)")
    sb.add_argument("--mqtt-ca", metavar="FILE", help="CA certificate for mqtts:// (default: the system's)")
    sb.add_argument("--mqtt-cert", metavar="FILE", help="client certificate for mqtts:// (default: none)")
    sb.add_argument("--mqtt-key", metavar="FILE", help="private key of --mqtt-cert (default: none)")
    return p


def _cmd_config(a: argparse.Namespace) -> int:
    from framecast.config import load_config, preset_names

    if a.config_command == "list":
        print("\n".join(preset_names()))
        return 0
    cfg = load_config(a.file)
    if a.config_command == "check":
        from framecast.config import stream_configs
        from framecast.stages.outputs.files import check_run_outputs

        # the run's own up-front check of its files (writable, no output on an input or another output)
        check_run_outputs(stream_configs(cfg, a.file))
        print(f"{a.file}: ok")
    else:
        print(cfg.model_dump_json(indent=2))
    return 0


def _cmd_run(a: argparse.Namespace) -> int:
    from framecast.config import load_config
    from framecast.stages.app import run_main

    return run_main(load_config(a.config, _run_overrides(a)))


def _cmd_convert(a: argparse.Namespace) -> int:
    from framecast.stages.model_commands import convert_main

    return convert_main(a.src, a.out, mmproj=a.mmproj, bits=a.bits, dtype=a.dtype)


def _cmd_generate(a: argparse.Namespace) -> int:
    from framecast.stages.model_commands import generate_main

    return generate_main(a.model, a.prompt, max_tokens=a.max_tokens, temperature=a.temp,
                         seed=a.seed, chat=not a.no_chat)


def _cmd_ask(a: argparse.Namespace) -> int:
    if (a.mqtt is None) == (a.session is None):
        raise UserError("ask: give either --mqtt URL (a running stream) or --session FILE.fcs (a saved one)")
    if a.max_tokens is not None and a.max_tokens < 1:
        raise UserError(f"--max-tokens {a.max_tokens}: must be at least 1")
    if a.session is not None:
        from framecast.stages.app import ask_session_main

        return ask_session_main(a.session, a.question, source=a.source, force=a.force, model_path=a.model,
                                max_tokens=a.max_tokens, as_json=a.json)
    from framecast.stages.app import ask_main

    return ask_main(a.mqtt, a.stream, a.question, prefix=a.prefix, timeout=a.timeout, ca_file=a.mqtt_ca,
                    cert_file=a.mqtt_cert, key_file=a.mqtt_key)


def _sets(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise UserError(f"--set {item!r}: expected group.key=value, e.g. narration.interval_s=2")
        out[key.strip()] = _scalar(raw)
    return out


def _cmd_worker(a: argparse.Namespace) -> int:
    from framecast.config import load_config
    from framecast.stages.mqtt.client import TlsFiles
    from framecast.stages.mqtt.worker import worker_main

    overrides = {k: v for k, v in {"runtime.capture_only": a.capture_only or None, "model.path": a.model,
                                   "model.mmproj": a.mmproj}.items() if v is not None}
    base = load_config(a.config, {**overrides, **_sets(a.set)})  # bad keys fail here, once
    run_args = [*(["--config", a.config] if a.config else []), *(["--capture-only"] if a.capture_only else []),
                *(["--model", a.model] if a.model else []), *(["--mmproj", a.mmproj] if a.mmproj else []),
                *[f"--set={item}" for item in a.set or []],
                *[x for flag, v in (("--mqtt-ca", a.mqtt_ca), ("--mqtt-cert", a.mqtt_cert), ("--mqtt-key", a.mqtt_key))
                  if v for x in (flag, v)]]
    if a.max_attempts < 1 or a.session_expiry < 0 or a.keepalive < 5 or a.reap_after < 0:
        raise UserError("--max-attempts must be >= 1, --session-expiry >= 0, --keepalive >= 5, --reap-after >= 0")
    return worker_main(base, url=a.mqtt, group=a.group, worker_id=a.worker_id, prefix=a.prefix, streams=a.streams,
                       tls=TlsFiles(a.mqtt_ca, a.mqtt_cert, a.mqtt_key), max_attempts=a.max_attempts,
                       session_expiry_s=a.session_expiry, keepalive_s=a.keepalive, run_args=run_args,
                       output_dir=a.output_dir, reap_after_s=a.reap_after)


def _cmd_submit(a: argparse.Namespace) -> int:
    from framecast.config import load_config
    from framecast.stages.mqtt.client import TlsFiles
    from framecast.stages.mqtt.submit import submit_main

    settings = _sets(a.set)
    load_config(None, settings, env=False)  # a job setting the workers would refuse fails here, before it is queued
    return submit_main(a.mqtt, a.files, prefix=a.prefix, wait=a.wait, timeout=a.timeout,
                       settings=settings, tls=TlsFiles(a.mqtt_ca, a.mqtt_cert, a.mqtt_key), as_is=a.as_is,
                       streams=a.stream, require_worker=not a.force)


COMMANDS = {"run": _cmd_run, "config": _cmd_config, "convert": _cmd_convert,
            "generate": _cmd_generate, "ask": _cmd_ask, "worker": _cmd_worker, "submit": _cmd_submit}


class _SafeStream(io.TextIOBase):
    """stdout/stderr as this process may find them: a pipe whose reader left (`| head`), a full
    disk (`2>/dev/full`), or closed (`>&-`). A failed write points the descriptor at /dev/null
    (so the interpreter's final flush cannot fail either) and every later write is dropped: a
    message that cannot be shown must never change how a run ends, or hang it."""

    def __init__(self, stream: Any):
        self._stream = stream
        self.gone = stream is None

    def _drop(self) -> None:
        self.gone = True
        try:
            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, self._stream.fileno())
            os.close(fd)
        except (OSError, ValueError, AttributeError):
            pass

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return self._stream.write(text)
            except (OSError, ValueError):
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._drop()

    def isatty(self) -> bool:
        try:
            return not self.gone and bool(self._stream.isatty())
        except (OSError, ValueError, AttributeError):
            return False

    def fileno(self) -> int:
        if self._stream is None:
            raise OSError("stream closed")
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._stream, "encoding", None) or "utf-8"

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self._stream, "errors", None)

    @property
    def closed(self) -> bool:  # type: ignore[override]
        return False

    def writable(self) -> bool:
        return True

    def close(self) -> None:  # the process's own stream is not ours to close
        pass

    def __getattr__(self, name: str) -> Any:  # buffer, ...
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _SafeStream(sys.stdout), _SafeStream(sys.stderr)
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UserError as e:
        print(redact_text(f"framecast: {e}"), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # also during start-up (imports, parsing)
        return 130
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = saved


if __name__ == "__main__":
    sys.exit(main())
