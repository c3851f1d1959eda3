"""`edge-agent deadletter list|replay CONFIG`: look at the records set aside, send them again.

The store is the file next to the buffer (``<buffer.path>.deadletter.sqlite``). `replay`
does not talk to the broker itself: it marks the chosen entries, and the agent that owns
the buffer publishes them (with their original seqs, marked historical) within a few
seconds if it runs, or right after its next start. So there is one MQTT client per agent
and one owner of retransmission, and a replayed entry the broker still refuses simply
stays a dead letter (with one more try counted).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from agent.config import Config
from agent.publish.deadletter import DeadLetter, DeadLetters

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_CONFIG = 2


def store_path(config: Config) -> str | None:
    """Where the dead letters of this config live; None for a memory buffer."""
    if config.buffer.kind == "sqlite":
        return f"{config.buffer.path}.deadletter.sqlite"
    return None


def open_store(config: Config) -> DeadLetters:
    """The dead-letter store the agent of this config uses (memory for a memory buffer)."""
    return DeadLetters(store_path(config), max_bytes=config.mqtt.dead_letter_max_bytes)


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _row(d: DeadLetter) -> dict[str, Any]:
    return {
        "id": d.id,
        "device": d.device,
        "first_seq": d.first_seq,
        "last_seq": d.last_seq,
        "count": d.count,
        "reason": d.reason,
        "code": d.code,
        "tries": d.tries,
        "moved_at": _when(d.moved_at),
        "state": "replay queued" if d.replay else "dead",
    }


def format_table(letters: list[DeadLetter]) -> list[str]:
    """One line per dead letter, aligned, with a header."""
    header = ("ID", "DEVICE", "SEQS", "COUNT", "CODE", "TRIES", "MOVED_AT", "STATE", "REASON")
    rows = [
        (
            str(d.id),
            d.device,
            f"{d.first_seq}-{d.last_seq}",
            str(d.count),
            f"{d.code:#04x}" if d.code is not None else "-",
            str(d.tries),
            _when(d.moved_at),
            "replay queued" if d.replay else "dead",
            d.reason,
        )
        for d in letters
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    return [
        "  ".join([*(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)), r[-1]]).rstrip()
        for r in [header, *rows]
    ]


def _store_or_error(config: Config, config_path: str) -> str | None:
    path = store_path(config)
    if path is None:
        print(
            f"{config_path}: buffer.kind is memory: dead letters are kept in the running "
            "agent's memory only (see /api/status); nothing to list or replay here",
            file=sys.stderr,
        )
    return path


def cmd_list(config: Config, args: argparse.Namespace) -> int:
    path = _store_or_error(config, args.config)
    if path is None:
        return EXIT_RUNTIME
    if not Path(path).exists():
        letters: list[DeadLetter] = []
    else:
        store = open_store(config)
        try:
            letters = asyncio.run(store.all())
        finally:
            store.close()
    if args.device is not None:
        letters = [d for d in letters if d.device == args.device]
    if args.json:
        print(orjson.dumps([_row(d) for d in letters]).decode())
        return EXIT_OK
    if not letters:
        print(f"no dead letters ({path})")
        return EXIT_OK
    for line in format_table(letters):
        print(line)
    samples = sum(d.count for d in letters)
    n = len(letters)
    print(f"{n} dead letter{'s' if n != 1 else ''}, {samples} samples ({path})")
    return EXIT_OK


def cmd_replay(config: Config, args: argparse.Namespace) -> int:
    path = _store_or_error(config, args.config)
    if path is None:
        return EXIT_RUNTIME
    if not args.all and not args.ids and args.device is None:
        print(
            "give --all, --device NAME or dead-letter IDs (see `deadletter list`)", file=sys.stderr
        )
        return EXIT_CONFIG
    if args.all and args.ids:
        print("give --all or IDs, not both", file=sys.stderr)
        return EXIT_CONFIG
    if not Path(path).exists():
        print(f"no dead letters ({path})")
        return EXIT_OK
    store = open_store(config)
    try:
        queued = asyncio.run(store.request_replay(args.ids or None, args.device))
    finally:
        store.close()
    print(
        f"{queued} dead letter{'s' if queued != 1 else ''} queued for replay; the agent "
        "publishes them within a few seconds (or at its next start) and deletes each once "
        "the broker acknowledged it"
    )
    return EXIT_OK


def add_deadletter_commands(sub: Any, load: Any) -> None:
    """Register `deadletter list` and `deadletter replay`; `load(path)` loads a config
    (printing its problems and returning None when invalid)."""
    p = sub.add_parser(
        "deadletter",
        help="list or replay records set aside as undeliverable",
        description="Records the broker refused, paho rejected or the encoder could not "
        "encode are kept in the dead-letter store next to the buffer. List them, or queue "
        "them for the agent to publish again (e.g. after an ACL was fixed).",
    )
    dl = p.add_subparsers(dest="deadletter_command", required=True, metavar="ACTION")

    def run(action: Any) -> Any:
        def func(args: argparse.Namespace) -> int:
            config = load(args.config)
            if config is None:
                return EXIT_CONFIG
            result: int = action(config, args)
            return result

        return func

    q = dl.add_parser("list", help="print the dead letters", description="Print the dead letters.")
    q.add_argument("config", help="YAML config file of the agent")
    q.add_argument("--device", help="only this device's")
    q.add_argument("--json", action="store_true", help="print a JSON array")
    q.set_defaults(func=run(cmd_list))

    q = dl.add_parser(
        "replay",
        help="queue dead letters for publishing again",
        description="Queue dead letters for the agent to publish again, with their "
        "original seqs (marked historical). Those the broker still refuses stay.",
    )
    q.add_argument("config", help="YAML config file of the agent")
    q.add_argument("ids", nargs="*", type=int, metavar="ID", help="dead-letter ids")
    q.add_argument("--all", action="store_true", help="every dead letter")
    q.add_argument("--device", help="only this device's (all of them unless IDs are given)")
    q.set_defaults(func=run(cmd_replay))
