"""Soak test: run the real pipeline for N minutes against a local MQTT broker and report
memory, queue depths and drops.

    python scripts/soak.py --minutes 10                  # starts its own mosquitto
    python scripts/soak.py --minutes 10 --restart-every 120 --json
    python scripts/soak.py --minutes 10 --restart-every 120 --max-packet-size 330   # a strict broker
    python scripts/soak.py --mqtt mqtt://broker.lan:1883 --minutes 60

The graph is what `framecast run --source demo --mqtt …` builds (demo source, change
detector, model stages when present, outputs, bus). A subscriber in the same process counts
what arrives; a question is asked every `--ask-every` seconds; `--restart-every` restarts the
local broker to soak the reconnect path too; `--max-packet-size` gives the local broker a
packet limit (mosquitto `max_packet_size`), so messages it can never take are dropped and
counted while the rest flow. Prints a table; `--json` adds one JSON object on
the last line. Not part of CI.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path


import framecast  # noqa: E402,F401  (preloads OpenBLAS before mlx)
from framecast.stages.app import build_graph  # noqa: E402
from framecast.config import load_config  # noqa: E402
from framecast.runtime import Runtime  # noqa: E402
from framecast.stages.mqtt.topics import Topics  # noqa: E402
from framecast.stages.mqtt.client import BusClient, BusDisconnected, BusMessage, parse_mqtt_url  # noqa: E402

STREAM = "soak"
PREFIX = "soak"


def mlx_mb() -> tuple[float, float]:
    """(active, allocator cache) MB of MLX memory: tells a leak from MLX's buffer cache."""
    try:
        import mlx.core as mx

        return round(mx.get_active_memory() / 2**20, 1), round(mx.get_cache_memory() / 2**20, 1)
    except Exception:
        return float("nan"), float("nan")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class LocalBroker:
    """mosquitto on a free loopback port, config in a temporary directory."""

    def __init__(self, *, max_packet_size: int | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="framecast-soak-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        (self.dir / "mosquitto.conf").write_text(
            f"user root\nlistener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence true\npersistence_location {self.dir}/\nlog_dest none\n"
            + (f"max_packet_size {max_packet_size}\n" if max_packet_size else ""))
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([exe, "-c", str(self.dir / "mosquitto.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(5)

    def restart(self) -> None:
        self.stop()
        time.sleep(1.0)
        self.start()
        self.restarts += 1

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Watcher:
    """A subscriber that counts what the bus delivers (reconnects on its own)."""

    def __init__(self, url: str, topics: Topics):
        self.address = parse_mqtt_url(url)
        self.topics = topics
        self.counts: collections.Counter[str] = collections.Counter()
        self.narration_ids: set[str] = set()
        self.answers: dict[str, dict] = {}
        self.client_id = f"soak-watch-{uuid.uuid4().hex[:6]}"

    async def run(self) -> None:
        while True:
            # persistent session + QoS 1: narrations sent while it reconnects are queued for it
            client = BusClient(self.address, client_id=self.client_id, persistent_session=True)
            try:
                await client.connect()
                await client.subscribe(f"{self.topics.prefix}/#", qos=1)
                async for m in client.messages():
                    leaf = m.topic[len(self.topics.prefix) + 1:]
                    self.counts[leaf] += 1
                    if m.topic == self.topics.narration and not m.retain:
                        self.narration_ids.add(json.loads(m.payload)["narration_id"])
                    elif m.topic == self.topics.answer:
                        a = json.loads(m.payload)
                        self.answers[a["request_id"]] = a
            except BusDisconnected:
                pass
            finally:
                await client.disconnect(timeout_s=1.0)
            await asyncio.sleep(0.5)

    async def ask(self, text: str) -> str | None:
        """The request id, or None when the question could not be published (broker down)."""
        client = BusClient(self.address, client_id=f"soak-ask-{uuid.uuid4().hex[:6]}")
        rid = uuid.uuid4().hex[:12]
        try:
            await client.connect()
            await client.publish(BusMessage(self.topics.ask, json.dumps({"text": text, "request_id": rid}).encode(),
                                            qos=1))
        except BusDisconnected:
            return None
        finally:
            await client.disconnect(timeout_s=1.0)
        return rid


async def soak(args: argparse.Namespace, url: str, broker: LocalBroker | None) -> dict:
    overrides = {"source.uri": "demo", "source.stream_id": STREAM, "source.fps": args.fps, "outputs.console": False,
                 "mqtt.url": url, "mqtt.prefix": PREFIX, "outputs.metrics_interval_s": args.metrics_s}
    if args.model:
        overrides["model.path"] = args.model
    if args.max_cache_tokens:
        overrides["session.max_cache_tokens"] = args.max_cache_tokens
    cfg = load_config(args.config, overrides)
    source, stages = build_graph(cfg)
    runtime = Runtime(source, stages, edge_size=cfg.runtime.edge_size, stop_timeout=cfg.runtime.stop_timeout_s,
                      metrics_interval=cfg.outputs.metrics_interval_s, stream_id=STREAM)
    watcher = Watcher(url, Topics(PREFIX, STREAM))
    samples: list[dict] = []
    asked: list[str] = []
    unsent_questions = [0]  # the broker was down (restarting) when the asker tried
    t0 = time.monotonic()

    async def sampler() -> None:
        while True:
            snap = runtime.metrics_snapshot()
            active, cached = mlx_mb()
            samples.append({"t": round(time.monotonic() - t0, 1), "rss_mb": round(rss_mb(), 1),
                            "mlx_active_mb": active, "mlx_cache_mb": cached,
                            "queues": {k: v["queue_depth"] for k, v in snap.items()},
                            "edge_drops": sum(v["drops"] for v in snap.values()),
                            "outbox": snap.get("mqtt", {}).get("outbox_depth", 0),
                            "frames": snap[source.name]["items_out"]})
            if not args.quiet:
                s = samples[-1]
                print(f"[{s['t']:>7.1f}s] rss {s['rss_mb']:.1f} MB (mlx active {active} / cache {cached})  "
                      f"frames {s['frames']:.0f}  "
                      f"edge drops {s['edge_drops']:.0f}  outbox {s['outbox']:.0f}  "
                      f"narrations seen {len(watcher.narration_ids)}", file=sys.stderr, flush=True)
            await asyncio.sleep(args.sample_s)

    async def asker() -> None:
        while True:
            await asyncio.sleep(args.ask_every)
            rid = await watcher.ask("What do you see?")
            if rid is None:
                unsent_questions[0] += 1
            else:
                asked.append(rid)

    async def restarter() -> None:
        while broker is not None and args.restart_every > 0:
            await asyncio.sleep(args.restart_every)
            await asyncio.to_thread(broker.restart)

    helpers = [asyncio.create_task(c) for c in (watcher.run(), sampler(), asker(), restarter())]
    run_task = asyncio.create_task(runtime.run())
    await asyncio.sleep(0.5)
    done, _ = await asyncio.wait([run_task], timeout=args.minutes * 60)
    if not done:
        runtime.request_stop("stop")
    result = await run_task
    await asyncio.sleep(1.0)  # let the watcher see the last messages
    for h in helpers:
        h.cancel()
    await asyncio.gather(*helpers, return_exceptions=True)
    summary = summarise(result, stages, samples, watcher, asked, broker, time.monotonic() - t0)
    bus = next((st for st in stages if st.name == "mqtt"), None)
    if bus is not None:  # what the bus gave up on, by why and what (e.g. too_large/narration)
        summary["bus_discarded"] = {f"{r}/{k}": n for (r, k), n in sorted(bus.outbox.discarded.items())}
        summary["undelivered"] = result.metrics.get("mqtt", {}).get("undelivered")
    summary["questions_not_sent_broker_down"] = unsent_questions[0]
    return summary


def summarise(result, stages, samples, watcher, asked, broker, wall_s) -> dict:
    m = result.metrics
    bus = m.get("mqtt", {})
    rss = [s["rss_mb"] for s in samples]
    quarter = rss[len(rss) // 4] if rss else float("nan")
    half = rss[len(rss) // 2] if rss else float("nan")
    decode = next((st for st in stages if st.name == "decode"), None)
    narrations_made = getattr(decode, "narrations", None)
    return {
        "minutes": round(wall_s / 60, 2),
        "exit_code": result.exit_code,
        "frames": m[next(iter(m))]["items_out"],
        "fps": round(m[next(iter(m))]["items_out"] / max(wall_s, 1e-9), 2),
        "rss_mb_start": rss[0] if rss else None,
        "rss_mb_at_25pct": quarter,
        "rss_mb_end": rss[-1] if rss else None,
        "rss_mb_max": max(rss) if rss else None,
        "rss_growth_after_25pct_mb": round(rss[-1] - quarter, 1) if rss else None,
        "rss_growth_second_half_mb": round(rss[-1] - half, 1) if rss else None,
        "mlx_active_mb_25pct_end": [samples[len(samples) // 4]["mlx_active_mb"], samples[-1]["mlx_active_mb"]]
        if samples else None,
        "mlx_cache_mb_end": samples[-1]["mlx_cache_mb"] if samples else None,
        "queue_depth_max": {k: v["queue_max_depth"] for k, v in m.items()},
        "edge_drops": {k: v["drops"] for k, v in m.items() if v["drops"]},
        "outbox_max_depth": bus.get("outbox_max_depth"),
        "outbox_drops": {k[len("outbox_drops_"):]: v for k, v in bus.items() if k.startswith("outbox_drops_")},
        "published": bus.get("published"),
        "reconnects": bus.get("reconnects"),
        "broker_restarts": broker.restarts if broker else 0,
        "model_stages": [st.name for st in stages if st.name in ("encode", "decode")],
        "narrations_made": narrations_made,
        "narrations_received": len(watcher.narration_ids),
        "messages_received": dict(watcher.counts),
        "questions_asked": len(asked),
        "answers_received": sum(1 for r in asked if r in watcher.answers),
        "answer_errors": sum(1 for r in asked if r in watcher.answers and watcher.answers[r].get("error")),
        "errors": [e.text for e in result.errors][:5],
    }


def print_table(s: dict) -> None:
    rows = [("duration (min)", s["minutes"]), ("frames / fps", f"{s['frames']:.0f} / {s['fps']}"),
            ("RSS start / 25% / end / max (MB)",
             f"{s['rss_mb_start']} / {s['rss_mb_at_25pct']} / {s['rss_mb_end']} / {s['rss_mb_max']}"),
            ("RSS growth after 25% / over 2nd half (MB)",
             f"{s['rss_growth_after_25pct_mb']} / {s['rss_growth_second_half_mb']}"),
            ("MLX active MB at 25% / end; MLX cache MB", f"{s['mlx_active_mb_25pct_end']}; {s['mlx_cache_mb_end']}"),
            ("max queue depth per stage", s["queue_depth_max"]), ("edge drops", s["edge_drops"] or 0),
            ("outbox max depth", s["outbox_max_depth"]), ("outbox drops", s["outbox_drops"] or 0),
            ("published / reconnects / broker restarts", f"{s['published']} / {s['reconnects']} / {s['broker_restarts']}"),
            ("model stages", s["model_stages"] or "none (capture only)"),
            ("narrations made / received", f"{s['narrations_made']} / {s['narrations_received']}"),
            ("undelivered; discarded by the bus (why/what)", f"{s.get('undelivered')}; {s.get('bus_discarded') or 0}"),
            ("questions asked / answered / errors (+ not sent: broker down)",
             f"{s['questions_asked']} / {s['answers_received']} / {s['answer_errors']} "
             f"(+ {s['questions_not_sent_broker_down']})"),
            ("messages received by topic", s["messages_received"]), ("exit code", s["exit_code"]),
            ("errors", s["errors"] or "none")]
    width = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--mqtt", help="broker URL (default: start a local mosquitto)")
    ap.add_argument("--config", help="config file or preset to start from")
    ap.add_argument("--model", help="model path (default: the embedded demo model, if installed)")
    ap.add_argument("--max-cache-tokens", type=int, help="bound the KV cache so memory can be flat")
    ap.add_argument("--fps", type=float, default=5.0)
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--metrics-s", type=float, default=10.0, help="metrics publishing interval")
    ap.add_argument("--ask-every", type=float, default=30.0)
    ap.add_argument("--restart-every", type=float, default=0.0, help="restart the local broker every N s")
    ap.add_argument("--max-packet-size", type=int, help="the local broker's max_packet_size (bytes)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    broker = None if args.mqtt else LocalBroker(max_packet_size=args.max_packet_size)
    try:
        if broker:
            broker.start()
        summary = asyncio.run(soak(args, args.mqtt or broker.url, broker))
    finally:
        if broker:
            broker.cleanup()
    print_table(summary)
    if args.json:
        print(json.dumps(summary))
    return 0 if summary["exit_code"] in (0, 130) else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
