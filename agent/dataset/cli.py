"""`edge-agent collect` and `edge-agent export` (docs/datasets.md).

Exit codes: 0 done / stopped, 1 runtime failure (broker, disk, no data in that shape),
2 bad arguments or config.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog

from agent.config import Config, MqttConfig

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_CONFIG = 2

log = structlog.get_logger(__name__)

Loader = Callable[[str], Config | None]


def topic_filter(config: Config) -> str:
    """The filter that matches every data message of the config's agent."""
    fields = {
        "agent": config.agent.id,
        "site": config.agent.site,
        "area": config.agent.area,
        "line": config.agent.line,
        "device": "+",
    }
    if config.mqtt.layout == "tag":
        return config.mqtt.topic_tag.format(**fields, tag="+")
    return config.mqtt.topic.format(**fields)


def _broker(args: argparse.Namespace, load: Loader) -> tuple[MqttConfig, list[str]] | int:
    """The broker settings and topic filters of a `collect`/`export` command line."""
    topics: list[str] = list(args.topic or [])
    if args.config is not None:
        config = load(args.config)
        if config is None:
            return EXIT_CONFIG
        if config.mqtt.layout == "sparkplug":
            print(
                f"{args.config}: mqtt.layout sparkplug carries no (epoch, seq) per sample; "
                "the dataset tools read layouts device and tag",
                file=sys.stderr,
            )
            return EXIT_CONFIG
        mqtt = config.mqtt
        topics = topics or [topic_filter(config)]
    else:
        host, _, port = str(args.broker).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            print(f"--broker must be HOST:PORT (got {args.broker!r})", file=sys.stderr)
            return EXIT_CONFIG
        mqtt = MqttConfig(host=host.strip("[]"), port=int(port))
        topics = topics or ["edge/#"]
    if args.share:
        topics = [t if t.startswith("$share/") else f"$share/{args.share}/{t}" for t in topics]
    return mqtt, topics


# ---------------------------------------------------------------------- collect


def cmd_collect(args: argparse.Namespace, load: Loader) -> int:
    from agent.dataset.collector import Collector, CollectorError
    from agent.publish.subscribe import SubscribeError, Subscription

    got = _broker(args, load)
    if isinstance(got, int):
        return got
    mqtt, topics = got
    client_id = args.client_id or f"edge-agent-collect-{socket.gethostname()}"
    collector = Collector(Path(args.out))
    try:
        collector.open()
    except CollectorError as exc:
        print(f"collect: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    sub = Subscription(mqtt, topics, client_id=client_id, session_expiry_s=args.session_expiry_s)
    try:
        sub.start()
    except SubscribeError as exc:
        collector.close()
        print(f"collect: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    log.info("collect.started", topics=topics, client_id=client_id, out=args.out)
    stop: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        stop.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    deadline = time.monotonic() + args.seconds if args.seconds > 0 else None
    code = EXIT_OK
    connected = True
    try:
        while not stop and (deadline is None or time.monotonic() < deadline):
            batch = []
            first = sub.get(timeout_s=args.flush_s)
            while first is not None:
                collector.offer(first.topic, first.payload)
                batch.append(first)
                if len(batch) >= 1000:
                    break
                first = sub.get(timeout_s=0)
            if batch:
                collector.flush()  # on disk before the broker may forget them
                for m in batch:
                    sub.ack(m)
            collector.rotate()
            if sub.connected.is_set() != connected:
                connected = not connected
                if connected:
                    log.info("collect.broker.connected", broker=f"{mqtt.host}:{mqtt.port}")
                else:
                    log.warning("collect.broker.lost", broker=f"{mqtt.host}:{mqtt.port}")
    except CollectorError as exc:
        print(f"collect: {exc}", file=sys.stderr)
        code = EXIT_RUNTIME
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        sub.close()
        try:
            collector.close()
        except CollectorError as exc:
            print(f"collect: {exc}", file=sys.stderr)
            code = EXIT_RUNTIME
        log.info("collect.stopped", **dict(collector.counts))
    return code


# ---------------------------------------------------------------------- export


def _from_files(folders: list[str], include_open: bool) -> Iterator[dict[str, Any]]:
    from agent.dataset.collector import data_files, read_samples

    for folder in folders:
        for path in data_files(Path(folder), include_open=include_open):
            yield from read_samples(path)


def _from_broker(
    mqtt: MqttConfig, topics: list[str], args: argparse.Namespace
) -> list[dict[str, Any]] | int:
    from agent.dataset.decode import decode
    from agent.publish.subscribe import SubscribeError, Subscription

    sub = Subscription(
        mqtt,
        topics,
        client_id=args.client_id or f"edge-agent-export-{os.getpid()}",
        manual_ack=False,
    )
    try:
        sub.start()
    except SubscribeError as exc:
        print(f"export: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    print(f"export: subscribed to {', '.join(topics)}", file=sys.stderr, flush=True)
    samples: list[dict[str, Any]] = []
    skipped = 0
    messages = 0
    deadline = time.monotonic() + args.seconds if args.seconds > 0 else None
    try:
        while args.count <= 0 or messages < args.count:
            left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if left <= 0:
                break
            m = sub.get(timeout_s=left)
            if m is None:
                continue
            messages += 1
            try:
                samples += decode(m.topic, m.payload)
            except Exception as exc:  # DecodeError, or a decoder breaking its contract
                if not skipped:
                    print(f"export: skipped a message on {m.topic}: {exc}", file=sys.stderr)
                skipped += 1
    except KeyboardInterrupt:
        pass
    finally:
        sub.close()
    if skipped:
        print(f"export: {skipped} message(s) skipped in all", file=sys.stderr)
    return samples


def cmd_export(args: argparse.Namespace, load: Loader) -> int:
    from agent.dataset.shapes import ShapeError, build
    from agent.dataset.writers import Format, ParquetUnavailable, WriteError, write

    out = Path(args.out)
    fmt: Format = args.format or ("parquet" if out.suffix.lower() == ".parquet" else "csv")
    samples: Any
    if args.from_dir:
        missing = [d for d in args.from_dir if not Path(d).is_dir()]
        if missing:
            print(f"export: no such folder: {', '.join(missing)}", file=sys.stderr)
            return EXIT_CONFIG
        samples = _from_files(args.from_dir, args.include_open)
    else:
        if args.seconds <= 0 and args.count <= 0:
            print("export from a broker needs --seconds or --count", file=sys.stderr)
            return EXIT_CONFIG
        got = _broker(args, load)
        if isinstance(got, int):
            return got
        received = _from_broker(*got, args)
        if isinstance(received, int):
            return received
        samples = received
    tags = [t for t in (args.tags or "").split(",") if t]
    try:
        table = build(
            samples,
            args.shape,
            devices=args.device or (),
            tags=tags,
            cycle=args.cycle,
            counter=args.counter,
        )
    except ShapeError as exc:
        print(f"export: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    try:
        written = write(table, out, fmt)
    except (WriteError, ParquetUnavailable) as exc:
        print(f"export: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    gaps = len(table.seq_gaps) + len(table.cycle_gaps)
    print(
        f"{written[0]}: {len(table.rows)} rows, {len(table.columns)} columns "
        f"({table.shape}, {fmt}); {table.samples} samples, {table.duplicates} duplicates "
        f"dropped, {gaps} gaps; metadata in {written[1]}"
    )
    return EXIT_OK


# ---------------------------------------------------------------------- parser


def _broker_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--topic",
        action="append",
        help="topic filter (repeatable; default: "
        "the config's data topics, or edge/# with --broker)",
    )
    p.add_argument(
        "--share",
        metavar="GROUP",
        help="subscribe as a member of shared "
        "subscription GROUP ($share/GROUP/...): members split the messages",
    )
    p.add_argument("--client-id", help="MQTT client id (unique per collector/exporter)")


def add_dataset_commands(sub: Any, load: Loader) -> None:
    p = sub.add_parser(
        "collect",
        help="subscribe and write the samples to hourly files (a small service)",
        description="Subscribe to the agent's data topics and write every sample exactly "
        "once into hourly files in OUT (samples-YYYYMMDDTHHZ.jsonl; the current hour is a "
        "hidden .part until it is complete). Messages are acknowledged only once on disk; "
        "a restart continues where it stopped. Stop with SIGTERM/SIGINT.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("config", nargs="?", help="the agent's YAML config (its mqtt section)")
    where.add_argument("--broker", metavar="HOST:PORT", help="broker without a config")
    p.add_argument("--out", required=True, help="folder of the hourly files and state")
    _broker_options(p)
    p.add_argument(
        "--session-expiry-s",
        type=int,
        default=86400,
        help="broker keeps our session and queues messages this long while we "
        "are away (MQTT 5; default 86400)",
    )
    p.add_argument(
        "--flush-s",
        type=float,
        default=0.5,
        help="longest wait before what arrived is written and acknowledged",
    )
    p.add_argument("--seconds", type=float, default=0, help="stop after S seconds (tests)")
    p.set_defaults(func=lambda a: cmd_collect(a, load))

    p = sub.add_parser(
        "export",
        help="write a dataset (CSV or Parquet) from collector files or a subscription",
        description="Write the samples as a dataset shaped like the platform's: one row "
        "per timestamp (--shape time), per machine cycle (cycle) or per window (window), "
        "a column per tag with a quality column each, units and gaps in OUT.meta.json; "
        "deduplicated by (agent, epoch, seq).",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--from",
        dest="from_dir",
        action="append",
        metavar="DIR",
        help="a collector's folder (repeatable: members of a shared group)",
    )
    source.add_argument("--config", help="subscribe to this agent config's broker")
    source.add_argument("--broker", metavar="HOST:PORT", help="subscribe to this broker")
    p.add_argument("--out", required=True, help="output file (.csv or .parquet)")
    p.add_argument(
        "--format",
        choices=["csv", "parquet"],
        help="default: from the --out suffix (csv unless .parquet)",
    )
    p.add_argument("--shape", choices=["time", "cycle", "window"], default="time")
    p.add_argument("--cycle", metavar="NAME", help="cycle shape: the cycle snapshot's name")
    p.add_argument(
        "--counter",
        metavar="TAG",
        help="cycle shape from raw polls: one row per new value of this counter",
    )
    p.add_argument("--device", action="append", help="only this device (repeatable)")
    p.add_argument("--tags", help="only these columns (comma-separated tag names)")
    p.add_argument(
        "--include-open",
        action="store_true",
        help="also read the hour the collector is still writing",
    )
    _broker_options(p)
    p.add_argument("--seconds", type=float, default=0, help="broker: listen this long")
    p.add_argument("--count", type=int, default=0, help="broker: stop after N messages")
    p.set_defaults(func=lambda a: cmd_export(a, load))
