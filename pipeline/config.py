"""Typed run configuration: groups of settings, named presets, TOML/YAML files, environment
variables, CLI overrides.

Precedence, lowest first: defaults, the config file or preset, `FRAMECAST_<GROUP>__<KEY>`
environment variables (read through pydantic-settings), CLI flags (`--set` last). Every model
forbids unknown keys. A bad file, variable, key or value raises `ConfigError` whose message is
one line naming the file (or the variable), the dotted key and the offending value; the CLI
turns it into exit status 2.
"""

from __future__ import annotations

import copy
import os
import re
import tomllib
import typing
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

from framecast.errors import UserError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict, SettingsError

# Presets ship as package data (`configs/` installs as `framecast.configs`), so a wheel has them too.
CONFIGS_DIR = Path(str(files("framecast.configs")))
# URL schemes a source may use (stages/sources picks the capture stage from them)
SOURCE_NETWORK_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_CAMERA = re.compile(r"^camera:(\d+|/.+)$")


def check_source_uri(uri: str) -> str:
    """The form of a source URI, checked without touching the file or network: not empty, a
    supported scheme (`scheme://…` with a host for network ones), `camera:N`/`camera:/path`.
    Raises ValueError (one line) otherwise. A file's existence is checked when the run starts."""
    from urllib.parse import urlsplit

    if not uri.strip():
        raise ValueError("empty source (give demo, a file, camera:N or a URL)")
    if uri == "demo" or _CAMERA.match(uri):
        return uri
    if uri.startswith("camera:"):
        raise ValueError("camera sources are camera:N (a device index) or camera:/path, e.g. camera:0")
    m = _SCHEME.match(uri)
    if not m or os.path.exists(uri):  # a plain path (even one with a colon that exists)
        return uri
    scheme = m.group(1).lower()
    if scheme not in (*SOURCE_NETWORK_SCHEMES, "file"):
        if "://" not in uri:
            return uri  # e.g. `clip:2.mp4`, a file name with a colon (reported missing at start)
        raise ValueError(f"unsupported source scheme '{scheme}://' "
                         f"(use demo, a file, camera:N or {', '.join(s + '://' for s in SOURCE_NETWORK_SCHEMES)})")
    if not uri[m.end():].startswith("//"):
        raise ValueError(f"a {scheme} URL is {scheme}://host/path")
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 -- raises for a bad port
    except ValueError as e:
        raise ValueError(f"not a valid URL: {e}") from None
    # udp://@:1234, tcp://:1234?listen and srt://:1234?mode=listener listen without a host
    if scheme in ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https") and not parts.hostname:
        raise ValueError(f"a {scheme} URL needs a host: {scheme}://host/path")
    return uri


def check_mqtt_url(url: str | None) -> str | None:
    """`mqtt://[user[:pass]@]host[:port]` or `mqtts://…`: the form only (ValueError, one line)."""
    from urllib.parse import urlsplit

    if url is None:
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises for a bad port
    except ValueError as e:
        raise ValueError(f"not a valid URL: {e}") from None
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError("scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError("no host (use mqtt://user:pass@host:port)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("unexpected path or query (use mqtt://user:pass@host:port)")
    return url


STREAM_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
ENV_PREFIX = "FRAMECAST_"  # FRAMECAST_<GROUP>__<KEY>, e.g. FRAMECAST_MQTT__URL
ENV_NESTED_DELIMITER = "__"


class ConfigError(UserError):
    """A user error in configuration: one line, exit status 2."""

    exit_code = 2


class Group(BaseModel):
    # inf (and nan) are never a setting: they only overflow later, far from the key that caused it
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

MAX_SECONDS = 10_000_000.0  # ~115 days: times in a file, a demo's length
MAX_TOKENS_BUDGET = 10_000_000  # cache tokens (a 7B model at 10M tokens is ~560 GB of fp16 cache)


class SourceConfig(Group):
    uri: str = "demo"  # demo | path | rtsp://… | http(s)://… | camera:N | /dev/videoN
    stream_id: str = "default"
    fps: float | None = Field(default=None, gt=0, le=240)  # sample rate; None = source rate
    start: float = Field(default=0.0, ge=0, le=MAX_SECONDS)  # seconds into a recorded file
    end: float | None = Field(default=None, gt=0, le=MAX_SECONDS)
    max_frames: int | None = Field(default=None, ge=1)
    realtime: bool | None = None  # pace a recorded file / demo at its own rate; None = auto
    # synthetic demo source
    width: int = Field(default=448, ge=16, le=4096)
    height: int = Field(default=448, ge=16, le=4096)
    seed: int = Field(default=0, ge=0, lt=2**63)
    duration: float | None = Field(default=None, gt=0, le=MAX_SECONDS)  # demo: seconds of video (None = endless)
    # live sources
    watchdog_s: float = Field(default=5.0, gt=0)  # no frame for this long => reconnect
    open_timeout_s: float = Field(default=10.0, gt=0)
    reconnect_max: int = Field(default=10, ge=0)  # attempts before giving up
    backoff_initial_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=10.0, gt=0)

    @field_validator("end")
    @classmethod
    def _end_after_start(cls, v: float | None, info: ValidationInfo) -> float | None:
        start = info.data.get("start", 0.0)
        if v is not None and v <= start:
            raise ValueError(f"must be after source.start ({start:g})")
        return v

    @field_validator("uri")
    @classmethod
    def _uri_form(cls, v: str) -> str:
        return check_source_uri(v)

    @field_validator("stream_id")
    @classmethod
    def _safe_stream_id(cls, v: str) -> str:
        if not v or not set(v) <= STREAM_ID_CHARS or len(v) > 64:
            raise ValueError("stream ids use 1-64 of [A-Za-z0-9_.-] (no '/', '+', '#')")
        return v


class ChangeConfig(Group):
    enabled: bool = True
    threshold: float = Field(default=0.04, ge=0, le=1)  # mean abs difference of the worst cell, 0..1
    size: int = Field(default=64, ge=8, le=512)  # downscaled side for the comparison
    grid: int = Field(default=4, ge=1, le=16)  # score = worst cell of a grid x grid split (1 = whole frame)
    colour: bool = True  # compare RGB (a red shape on grey has the grey's brightness); false = grey only


class ModelConfig(Group):
    path: str | None = None  # HF dir, converted MLX dir, repo id, or a .gguf; None = embedded demo
    mmproj: str | None = None  # vision GGUF that goes with a .gguf language model
    dtype: Literal["float32", "float16", "bfloat16"] | None = None  # None = as stored
    max_slice_nums: int = Field(default=1, ge=1, le=9)  # 1 = one view per frame (streaming)

    @field_validator("mmproj")
    @classmethod
    def _mmproj_needs_a_model(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and info.data.get("path") is None:
            raise ValueError("a vision .gguf goes with a .gguf language model: give model.path (--model) too")
        return v


class SessionConfig(Group):
    max_cache_tokens: int | None = Field(default=None, ge=256, le=MAX_TOKENS_BUDGET)  # None = unbounded
    max_cache_mb: float | None = Field(default=None, gt=0, le=2**30)
    sink_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS_BUDGET)  # None = keep the system prompt
    kv_bits: Literal[4, 8] | None = None
    keep_generated: bool = True  # keep narrations in the cache as context
    system_prompt: str | None = None
    encode_batch: int = Field(default=4, ge=1, le=64)  # frames per vision-tower call at most
    pack_frames: int | None = Field(default=None, ge=1, le=6)  # 4.5 3D groups; None = model default
    state_file: str | None = None  # restore the cache from here at start (if present), save at exit
    resume: str | None = None  # a saved session (.fcs) to continue: its cache, narration log and chapters
    force: bool = False  # resume (or ask) a saved session even for another video than its own


class NarrationConfig(Group):
    policy: Literal["interval", "change", "on_demand"] = "interval"
    interval_s: float = Field(default=2.0, gt=0)  # media seconds between narrations
    prompt: str = Field(default="Describe what happens now in one short sentence.", min_length=1,
                        pattern=r"\S")  # a blank prompt is a mistake, not a request
    max_tokens: int = Field(default=32, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0, le=10)
    top_k: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    partials: bool = True  # emit narration.partial deltas


class ChaptersConfig(Group):
    enabled: bool | None = None  # None = on for a recorded file with a model (or when outputs.chapters is set)
    min_s: float = Field(default=10.0, gt=0)  # a scene change ends a chapter only this long after it began
    max_s: float | None = Field(default=300.0, gt=0)  # a chapter this long ends even without a scene change
    cut_threshold: float = Field(default=0.03, ge=0, le=1)  # colour-histogram change a cut needs (0 = any change)
    title_max_tokens: int = Field(default=16, ge=1, le=256)
    prompt_tokens: int = Field(default=1024, ge=64)  # narrations given to a title turn at most (tokens)

    @field_validator("max_s")
    @classmethod
    def _max_after_min(cls, v: float | None, info: ValidationInfo) -> float | None:
        low = info.data.get("min_s", 0.0)
        if v is not None and v < low:
            raise ValueError(f"must be at least chapters.min_s ({low:g})")
        return v


class SummaryConfig(Group):
    enabled: bool | None = None  # None = on for a recorded file with a model (or when outputs.summary is set)
    max_tokens: int = Field(default=96, ge=1, le=4096)
    prompt_tokens: int = Field(default=1536, ge=64)  # longest prompt of one turn; more => summarised in parts


class OutputsConfig(Group):
    console: bool = True
    jsonl: str | None = None
    jsonl_frames: bool = False  # also write one envelope per frame (never pixels)
    jsonl_partials: bool = False  # also write narration.partial deltas
    srt: str | None = None
    vtt: str | None = None
    chapters: str | None = None  # WebVTT chapters file (one cue per chapter, its title)
    summary: str | None = None  # Markdown: the summary, then one section per chapter
    session: str | None = None  # .fcs archive at the end of the run (cache, narration log, chapters)
    progress: bool | None = None  # None = on for recorded files on a terminal
    verbose: bool = False  # terminal: also scene-change lines (always in JSONL and on the bus)
    metrics: bool = False
    metrics_interval_s: float = Field(default=5.0, gt=0)
    preview: bool = False  # a window with the newest frame, subtitles and a heads-up line
    annotate: str | None = None  # MP4 (H.264) with the narrations burned in, + a WebVTT beside it
    report: str | None = None  # one self-contained HTML file: video, captions, timeline, search


class MqttConfig(Group):
    url: str | None = None  # mqtt://user:pass@host:port or mqtts://…
    prefix: str = "framecast"
    client_id: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    keepalive_s: int = Field(default=30, ge=5)
    outbox_size: int = Field(default=1000, ge=1)
    # largest PUBLISH packet the broker takes (bytes); MQTT 5 brokers announce theirs (the
    # smaller wins), MQTT 3.1.1 ones cannot: bigger messages are dropped and counted
    max_packet_size: int | None = Field(default=None, ge=128)
    max_question_bytes: int = Field(default=4096, ge=16)
    partial_expiry_s: int = Field(default=10, ge=1)
    ha_discovery: bool = False
    ha_prefix: str = "homeassistant"
    reconnect_initial_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    publish_timeout_s: float = Field(default=5.0, gt=0)  # no ack this long => reconnect
    close_timeout_s: float = Field(default=3.0, gt=0)  # at exit: flush queued finals this long
    max_pending_questions: int = Field(default=32, ge=1)  # more => answered "busy"
    question_timeout_s: float = Field(default=120.0, gt=0)  # unanswered => error answer

    @field_validator("url")
    @classmethod
    def _url_form(cls, v: str | None) -> str | None:
        return check_mqtt_url(v)

    @field_validator("prefix", "ha_prefix")
    @classmethod
    def _safe_prefix(cls, v: str) -> str:
        if not v or any(c in v for c in "+#") or v.startswith("/") or v.endswith("/") or "//" in v:
            raise ValueError("topic prefixes may not contain '+', '#', empty levels or edge '/'")
        return v


class RuntimeConfig(Group):
    edge_size: int = Field(default=8, ge=1, le=10_000)
    stop_timeout_s: float = Field(default=10.0, gt=0)
    capture_only: bool = False  # capture + change detection + outputs, no model (no narration)


#: the groups a `[[streams]]` entry may set for itself (the rest is shared by every stream)
STREAM_GROUPS = ("source", "change", "session", "narration", "outputs")


class StreamConfig(Group):
    """One entry of `[[streams]]`: an id and the groups this stream sets differently. Each group
    is a partial table merged over the run's own group (checked when the run resolves them)."""

    id: str | None = None  # default: source.stream_id of the entry, else stream<N>
    source: dict[str, Any] = {}
    change: dict[str, Any] = {}
    session: dict[str, Any] = {}
    narration: dict[str, Any] = {}
    outputs: dict[str, Any] = {}


class RunConfig(Group):
    source: SourceConfig = SourceConfig()
    change: ChangeConfig = ChangeConfig()
    model: ModelConfig = ModelConfig()
    session: SessionConfig = SessionConfig()
    narration: NarrationConfig = NarrationConfig()
    chapters: ChaptersConfig = ChaptersConfig()
    summary: SummaryConfig = SummaryConfig()
    outputs: OutputsConfig = OutputsConfig()
    mqtt: MqttConfig = MqttConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    streams: list[StreamConfig] = []  # several sources in one run (one model); empty = `source` alone

    @model_validator(mode="after")
    def _budget_can_work(self) -> RunConfig:
        """A token budget that the sinks or one turn fill by themselves cannot work: refused
        here (`config check` too), not at the first narration."""
        cap, s, n = self.session.max_cache_tokens, self.session, self.narration
        if cap is None:
            return self
        if s.sink_tokens is not None and s.sink_tokens >= cap:
            raise ValueError(f"session.sink_tokens = {s.sink_tokens} leaves nothing of session.max_cache_tokens = "
                             f"{cap} for frames")
        if n.max_tokens >= cap:
            raise ValueError(f"narration.max_tokens = {n.max_tokens} does not fit in session.max_cache_tokens = {cap}")
        return self


# ---------------------------------------------------------------- loading


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _hide_password(value: Any) -> Any:
    """`scheme://user:secret@host` -> `scheme://user:***@host` (error messages only)."""
    if isinstance(value, str):
        return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@:]*:)[^/@]*@", r"\1***@", value)
    return value


def _one_line(e: ValidationError, origin: str) -> str:
    """The first problem as one line: `<file>: <dotted.key> = <value>: <why>`."""
    err = e.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    value = _hide_password(err.get("input"))
    if err["type"] == "extra_forbidden":
        return f"{origin}: unknown key '{key}' = {_short(value)}"
    msg = err["msg"].removeprefix("Value error, ")
    if key.endswith("source.uri") and isinstance(value, str) and value:  # the source first, as at run time
        return f"{value}: {msg} ({origin}: {key})"
    if not key:
        return f"{origin}: {msg}"
    return f"{origin}: {key} = {_short(value)}: {msg}"


def _read_file(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a config file (TOML or YAML)")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"{path}: unsupported config format '{path.suffix}' (use .toml, .yaml or .yml)")
    except ConfigError:
        raise
    except Exception as e:  # tomllib.TOMLDecodeError / yaml.YAMLError
        raise ConfigError(f"{path}: cannot parse: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a table/mapping of groups")
    return data


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.toml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A path, or a preset name from configs/ (e.g. `camera-narration`)."""
    p = Path(name_or_path)
    if p.exists() or p.suffix:
        return p
    preset = CONFIGS_DIR / f"{name_or_path}.toml"
    if preset.is_file():
        return preset
    raise ConfigError(f"{name_or_path}: no such config file or preset (presets: {', '.join(preset_names())})")


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------- environment


class _EnvSettings(BaseSettings, RunConfig):
    """RunConfig's keys as environment variables; only its settings source is used (to read)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_NESTED_DELIMITER,
                                      case_sensitive=False, env_parse_none_str="null", extra="forbid")


def env_var(group: str, key: str) -> str:
    """The environment variable of a config key: ('mqtt', 'url') -> FRAMECAST_MQTT__URL."""
    return f"{ENV_PREFIX}{group}{ENV_NESTED_DELIMITER}{key}".upper()


def _literal_ints(annotation: Any) -> bool:
    """Whether a field only takes integer literals (e.g. kv_bits: Literal[4, 8] | None)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Literal:
        return all(isinstance(a, int) for a in args)
    return bool(args) and all(typing.get_origin(a) is Literal and _literal_ints(a) for a in args)


def env_overrides() -> dict[str, dict[str, Any]]:
    """`{group: {key: value}}` from the FRAMECAST_<GROUP>__<KEY> variables that are set
    (`streams` is a list: files and flags only).

    Values stay strings (pydantic parses them as it parses a file's), `null` means None;
    integer-literal keys (`session.kv_bits`) get ints. A variable naming no group: ConfigError.
    """
    for name in os.environ:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX):
            continue  # (other FRAMECAST_* variables, e.g. FRAMECAST_KERNELS, are not config keys)
        if upper == "FRAMECAST_OPENBLAS" and os.environ[name].strip() not in ("0", "1"):
            # read at import time (framecast._blas), where it cannot say so: checked here instead
            raise ConfigError(f"environment: {name} = {os.environ[name]!r}: expected 0 (MLX's own BLAS) "
                              "or 1 (the default: OpenCV's OpenBLAS)")
        rest = upper[len(ENV_PREFIX):]
        if rest.lower().split(ENV_NESTED_DELIMITER.lower())[0] == "streams":
            raise ConfigError(f"environment: {name}: streams are set in a config file ([[streams]]) "
                              "or with repeated --source flags")
        if rest.lower() in RunConfig.model_fields:
            raise ConfigError(f"environment: {name}: set keys one by one, as {env_var(rest, 'KEY')}")
        if ENV_NESTED_DELIMITER in rest:
            group = rest.split(ENV_NESTED_DELIMITER, 1)[0].lower()
            if group not in RunConfig.model_fields:
                raise ConfigError(f"environment: {name}: unknown config group {group!r} "
                                  f"(groups: {', '.join(RunConfig.model_fields)})")
    try:
        raw = EnvSettingsSource(_EnvSettings)()
    except SettingsError as e:  # e.g. FRAMECAST_SOURCE='not json'
        raise ConfigError(f"environment: {str(e).splitlines()[0]}") from None
    out: dict[str, dict[str, Any]] = {}
    for group, values in raw.items():
        if group == "streams":
            continue
        fields = RunConfig.model_fields[group].annotation.model_fields
        out[group] = {}
        for key, value in values.items():
            field = fields.get(key)
            if isinstance(value, str) and field is not None and _literal_ints(field.annotation):
                value = int(value) if value.strip().lstrip("-").isdigit() else value
            out[group][key] = value
    return out


def _with_env(cfg: RunConfig, env: dict[str, dict[str, Any]]) -> RunConfig:
    try:
        return RunConfig.model_validate(deep_merge(cfg.model_dump(), env))
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(p) for p in err["loc"]]
        if len(loc) < 2 or loc[1] not in env.get(loc[0], {}):
            raise ConfigError(_one_line(e, "environment")) from None
        var = env_var(loc[0], loc[1])
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"environment: {var}: unknown key '{loc[0]}.{loc[1]}'") from None
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"environment: {var} = {_short(env[loc[0]][loc[1]])}: {msg}") from None


# ---------------------------------------------------------------- building


def build_config(data: dict[str, Any], origin: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_one_line(e, origin)) from None


# ---------------------------------------------------------------- several streams


#: config keys that name a file the run writes, each with what it is called in messages;
#: `{stream_id}` in any of them is replaced by the stream's id (every one is per stream)
OUTPUT_PATHS = ((("outputs", "jsonl"), "JSONL"), (("outputs", "srt"), "SRT"), (("outputs", "vtt"), "VTT"),
                (("outputs", "chapters"), "chapters"), (("outputs", "summary"), "summary"),
                (("outputs", "session"), "saved session"), (("outputs", "annotate"), "annotated video"),
                (("outputs", "report"), "HTML report"), (("session", "state_file"), "session state"))
PER_STREAM_PATHS = tuple(key for key, _ in OUTPUT_PATHS) + (("session", "resume"),)  # {stream_id} expands
STREAM_ID_FIELD = "{stream_id}"


def output_paths(cfg: RunConfig) -> list[tuple[str, str, str]]:
    """Every file one stream's run writes: `(dotted key, path, what)`, the annotated video's
    WebVTT beside it included (`outputs.annotate` with the suffix `.vtt`)."""
    out = []
    for (group, key), what in OUTPUT_PATHS:
        path = getattr(getattr(cfg, group), key)
        if path:
            out.append((f"{group}.{key}", path, what))
            if key == "annotate":
                out.append(("outputs.annotate (its WebVTT)", str(Path(path).with_suffix(".vtt")), "WebVTT"))
    return out


def same_path_key(path: str) -> str:
    """A path's identity for clash checks before anything exists: absolute, normalised, with
    symbolic links resolved as far as they exist."""
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def check_output_clashes(configs: list[RunConfig], origin: str = "config") -> None:
    """Refuse (ConfigError, one line) two outputs of a run on one file: two keys of one stream,
    or one key shared by several streams (their writers would interleave or clobber)."""
    owners: dict[str, tuple[str, str]] = {}
    for one in configs:
        sid = one.source.stream_id
        for key, path, _what in output_paths(one):
            ident = same_path_key(path)
            if ident not in owners:
                owners[ident] = (key, sid)
                continue
            other_key, other_sid = owners[ident]
            if other_sid != sid:
                raise ConfigError(f"{origin}: {key} = {path!r} is shared by streams {other_sid!r} and {sid!r}: "
                                  f"put {STREAM_ID_FIELD} in the path")
            raise ConfigError(f"{origin}: {key} = {path!r}: the same file as {other_key} (give each output its own)")


def local_path(uri: str) -> str:
    """The file a source URI names: `file://` URIs percent-decoded (`file:///v/take%232.mp4` ->
    `/v/take#2.mp4`), anything else as given."""
    from urllib.parse import unquote

    if uri[:7].lower() == "file://":
        rest = uri[7:]
        return unquote(rest[rest.index("/"):] if "/" in rest else rest)  # drop a `localhost` authority
    return uri


def split_stream_uri(raw: str) -> tuple[str, str | None]:
    """`URI#id` -> (URI, id). Not split when the whole of `raw` names an existing file (a file
    name may contain `#`: `take#2.mp4`), and a fragment that is not a valid stream id stays part
    of the URI."""
    uri, sep, frag = raw.rpartition("#")
    if os.path.exists(local_path(raw)):
        return raw, None
    if sep and uri and frag and set(frag) <= STREAM_ID_CHARS and len(frag) <= 64:
        return uri, frag
    return raw, None


def _expand_paths(data: dict[str, Any], stream_id: str) -> None:
    for group, key in PER_STREAM_PATHS:
        value = data.get(group, {}).get(key)
        if isinstance(value, str) and STREAM_ID_FIELD in value:
            data[group][key] = value.replace(STREAM_ID_FIELD, stream_id)


def stream_configs(cfg: RunConfig, origin: str = "config") -> list[RunConfig]:
    """One complete `RunConfig` per stream, `streams` emptied: each `[[streams]]` entry's groups
    merged over the run's own, `source.stream_id` set to the entry's id (default `stream<N>`,
    N its position from 1, or the next N that no entry names), `{stream_id}` in output / state
    paths replaced. No entries: `[cfg]` (paths
    expanded too). Raises ConfigError (one line naming the entry and key) for a bad entry, a
    duplicate id, or two streams writing one file."""
    if not cfg.streams:
        data = cfg.model_dump()
        _expand_paths(data, cfg.source.stream_id)
        out = [RunConfig.model_validate(data)]
        check_output_clashes(out, origin)
        return out
    base = cfg.model_dump(exclude={"streams"})
    out: list[RunConfig] = []
    seen: dict[str, int] = {}
    given = {e.id if e.id is not None else e.source.get("stream_id") for e in cfg.streams} - {None}
    for i, entry in enumerate(cfg.streams):
        where = f"{origin}: streams[{i}]"
        named = entry.source.get("stream_id")
        if entry.id is not None and named is not None and named != entry.id:
            raise ConfigError(f"{where}: id = {entry.id!r} but source.stream_id = {named!r} (give one)")
        sid = entry.id if entry.id is not None else named
        if sid is None:  # an automatic name never takes one that an entry gives
            n = i + 1
            while f"stream{n}" in given or f"stream{n}" in seen:
                n += 1
            sid = f"stream{n}"
        if not isinstance(sid, str) or not sid or not set(sid) <= STREAM_ID_CHARS or len(sid) > 64:
            raise ConfigError(f"{where}: id = {_short(sid)}: stream ids use 1-64 of [A-Za-z0-9_.-] "
                              "(no '/', '+', '#')")
        if sid in seen:
            raise ConfigError(f"{where}: stream id {sid!r} is already used by streams[{seen[sid]}]")
        seen[sid] = i
        data = deep_merge(copy.deepcopy(base), {g: getattr(entry, g) for g in STREAM_GROUPS if getattr(entry, g)})
        data["source"]["stream_id"] = sid
        _expand_paths(data, sid)
        try:
            out.append(RunConfig.model_validate(data))
        except ValidationError as e:
            raise ConfigError(_one_line(e, where)) from None
    resumed: dict[str, str] = {}
    for c in out:  # one saved session continues one stream
        path = c.session.resume
        if path is not None and path in resumed:
            raise ConfigError(f"{origin}: session.resume = {path!r} is given to streams {resumed[path]!r} and "
                              f"{c.source.stream_id!r}: put {STREAM_ID_FIELD} in the path (one .fcs per stream)")
        if path is not None:
            resumed[path] = c.source.stream_id
    check_output_clashes(out, origin)
    return out


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None, *,
                env: bool = True) -> RunConfig:
    """Load a file or preset (if given), then the FRAMECAST_<GROUP>__<KEY> environment variables
    (unless `env` is False), then dotted-key overrides from the CLI: each layer wins over the last."""
    data: dict[str, Any] = {}
    origin = "command line"
    if path:
        p = resolve_config_path(path)
        data = _read_file(p)
        origin = str(p)
    cfg = build_config(data, origin)
    environment = env_overrides() if env else {}
    if environment:
        cfg = _with_env(cfg, environment)
    if overrides:
        nested: dict[str, Any] = {}
        for dotted, value in overrides.items():
            cur = nested
            *parents, leaf = dotted.split(".")
            for part in parents:
                cur = cur.setdefault(part, {})
            cur[leaf] = value
        cfg = build_config(deep_merge(cfg.model_dump(), nested), "command line")
    stream_configs(cfg, origin)  # a bad entry or two outputs on one file fail here (`config check` too)
    return cfg
