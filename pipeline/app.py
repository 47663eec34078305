"""The composition root: the only module that knows every stage.

`build_graph(cfg)` turns a `RunConfig` into `source -> change -> [encode -> decode] -> outputs
-> [mqtt]`; `run_main(cfg)` runs it and returns the process exit code.
"""

from __future__ import annotations

import sys

from pipeline.config import RunConfig
from pipeline.events import Error
from pipeline.runtime import Runtime, Source, Stage


def build_graph(cfg: RunConfig) -> tuple[Source, list[Stage]]:
    from stages.change import ChangeDetector
    from stages.outputs import make_outputs
    from stages.sources import make_source

    source = make_source(cfg.source)
    stages: list[Stage] = []
    if cfg.change.enabled:
        stages.append(ChangeDetector(cfg.change))
    stages.extend(_model_stages(cfg))
    stages.extend(make_outputs(cfg.outputs, live=source.live))
    if cfg.mqtt.url:
        from stages.mqtt import MqttStage

        stages.append(MqttStage(cfg.mqtt, stream_id=cfg.source.stream_id))
    return source, stages


def _model_stages(cfg: RunConfig) -> list[Stage]:
    """Encode + decode stages around a streaming session (filled in by the session work)."""
    return []


def _print_metrics(snapshot: dict[str, dict[str, float]]) -> None:
    rows = [f"{'stage':<14}{'in':>7}{'out':>7}{'drops':>7}{'queue':>7}{'p50 ms':>9}{'p95 ms':>9}{'/s':>8}"]
    for name, m in snapshot.items():
        rows.append(f"{name:<14}{m['items_in']:>7.0f}{m['items_out']:>7.0f}{m['drops']:>7.0f}"
                    f"{m['queue_depth']:>7.0f}{m['latency_ms_p50']:>9.2f}{m['latency_ms_p95']:>9.2f}"
                    f"{m['throughput_per_s']:>8.2f}")
    print("\n".join(rows), file=sys.stderr, flush=True)


def _print_error(err: Error) -> None:
    where = f"{err.stage}: " if err.stage else ""
    print(f"framecast: {where}{err.text}", file=sys.stderr, flush=True)


def run_main(cfg: RunConfig) -> int:
    source, stages = build_graph(cfg)
    runtime = Runtime(
        source,
        stages,
        edge_size=cfg.runtime.edge_size,
        stop_timeout=cfg.runtime.stop_timeout_s,
        metrics_interval=cfg.outputs.metrics_interval_s if (cfg.outputs.metrics or cfg.mqtt.url) else None,
        on_metrics=_print_metrics if cfg.outputs.metrics else None,
        on_error=_print_error,
        stream_id=cfg.source.stream_id,
    )
    import asyncio

    result = asyncio.run(runtime.run())
    if result.stopped_by == "signal":
        return result.exit_code or 130
    return result.exit_code


def ask_main(url: str, stream: str, question: str, *, prefix: str, timeout: float, ca_file: str | None) -> int:
    from stages.mqtt import ask_over_mqtt

    return ask_over_mqtt(url, stream, question, prefix=prefix, timeout=timeout, ca_file=ca_file)
