"""`edge-agent write CONFIG DEVICE TAG VALUE`: one write for commissioning.

The same guards as a command from the platform (writes enabled, writable, limits, rate,
interlock, step, the audit record before the write, the read-back), on a connection of
its own to the device, while the agent is not running: the agent holds the audit log's
lock, and a second process writing to the same PLC is what the command path exists to
avoid. The broker session and signature guards do not apply: the operator is at the
gateway. `--simulate` starts the device's simulator in this process and writes to it
(a rehearsal: conversion, limits, the driver's encoding, the read-back).

Exit codes: 0 done, 1 failed (the write may have happened: see the message), 2
configuration error, 3 refused (nothing was written).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

from agent.command.access import DirectAccess
from agent.command.audit import (
    AuditLocked,
    AuditLog,
    AuditRecord,
    AuditUnavailable,
    encode_record,
)
from agent.command.handler import CommandHandler, WriteResult
from agent.command.request import Origin, WriteRequest

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_REFUSED = 3


def parse_value(text: str) -> object:
    """VALUE as JSON when it is a JSON number, true/false or a quoted string; otherwise
    the text itself (so `auto` is the string 'auto', `42` the number, `"42"` text)."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, bool | int | float | str):
        return value
    return text


def describe(result: WriteResult) -> str:
    target = f"{result.device}.{result.tag}"
    if result.result == "done":
        parts = [f"raw {result.raw!r}"]
        if result.previous is not None:
            parts.append(f"was {result.previous!r}")
        if result.verified:
            parts.append(f"holds {result.holds!r}, verified")
        elif result.verified is None:
            parts.append("not read back (verify: false)")
        return f"done: {target} = {result.value!r} ({'; '.join(parts)})"
    return f"{result.result} ({result.reason}): {target}: {result.detail}"


#: How long `edge-agent write` waits for the broker to take its audit records.
AUDIT_PUBLISH_TIMEOUT_S = 5.0


async def publish_audit(config: Any, records: list[AuditRecord]) -> str:
    """Publish the write's audit records on the audit topic, as the agent does for a
    command; the local audit log has them whatever happens here. Returns the line that
    tells the user which."""
    from agent.publish import Message
    from agent.publish.probe import probe

    if not records:
        return ""
    topic = config.commands.expand(config.commands.audit_topic, config.agent.id)
    messages = [
        Message(topic, encode_record(r).rstrip(b"\n"), qos=1, content_type="application/json")
        for r in records
    ]
    client_id = f"{config.mqtt.resolved_client_id(config.agent.id)}-write"
    result = await probe(config.mqtt, client_id, messages, timeout_s=AUDIT_PUBLISH_TIMEOUT_S)
    if result.connect_error is not None:
        return f"audit: in the local log only (broker: {result.connect_error})"
    refused = [r.reason for _, r in result.results if not r.ok]
    if refused:
        return f"audit: in the local log only (the broker refused {topic}: {refused[0]})"
    return f"audit: published on {topic}"


async def _write(config: Any, args: argparse.Namespace) -> tuple[int, WriteResult | None]:
    from agent.runtime.pipeline import make_driver
    from agent.simulate import simulators
    from drivers.base import DriverContext

    audit = AuditLog(config.commands.audit)
    records: list[AuditRecord] = []
    audit.on_record = records.append
    try:
        audit.open()
    except AuditLocked as exc:
        print(
            f"edge-agent write: refused: {exc}; while the agent runs, send the write as a "
            "command (docs/commands.md)",
            file=sys.stderr,
        )
        return EXIT_REFUSED, None
    except AuditUnavailable as exc:
        print(f"edge-agent write: refused (audit_unavailable): {exc}", file=sys.stderr)
        return EXIT_REFUSED, None
    try:
        async with AsyncExitStack() as stack:
            if args.simulate:
                wanted = [d for d in config.devices if d.name == args.device]
                only = config.model_copy(update={"devices": wanted or config.devices[:1]})
                config = await stack.enter_async_context(simulators(only))
            devices = {d.name: d for d in config.devices}
            context = DriverContext(config.links)
            stack.push_async_callback(context.aclose)
            accesses: dict[str, DirectAccess] = {}

            def access(name: str) -> DirectAccess | None:
                device = devices.get(name)
                if device is None:
                    return None
                if name not in accesses:
                    accesses[name] = DirectAccess(device, make_driver(device, context), context)
                return accesses[name]

            handler = CommandHandler(config.commands, lambda: devices, access, audit)
            req = WriteRequest(
                args.device,
                args.tag,
                parse_value(args.value),
                Origin("cli", client_id="edge-agent write", user=args.user or _user()),
            )
            result = await handler.handle(req)
    finally:
        audit.close()
    code = {"done": EXIT_DONE, "failed": EXIT_FAILED, "refused": EXIT_REFUSED}[result.result]
    # Printed first: the result is the output; the audit line follows it.
    if args.json:
        print(json.dumps(result.as_dict(), default=repr))
    else:
        print(describe(result), file=sys.stdout if code == EXIT_DONE else sys.stderr)
    if not args.no_audit_topic:
        line = await publish_audit(config, records)
        if line:
            print(line, file=sys.stderr)
    return code, result


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


def cmd_write(args: argparse.Namespace, load: Callable[..., Any]) -> int:
    from agent.logs import setup_logging

    config = load(args.config, simulate=args.simulate)
    if config is None:
        return EXIT_CONFIG
    setup_logging("warning")  # the result line is the output
    code, _ = asyncio.run(_write(config, args))
    return code


def add_write_command(sub: Any, load: Callable[..., Any]) -> None:
    p = sub.add_parser(
        "write",
        help="write one tag (commissioning), with the guards and audit of commands",
        description="Write VALUE to TAG of DEVICE over a connection of its own, with the "
        "same guards and audit record as a command (docs/commands.md). Refused while the "
        "agent runs. Exit 0 done, 1 failed, 2 config error, 3 refused.",
    )
    p.add_argument("config", help="YAML config file")
    p.add_argument("device", help="device name")
    p.add_argument("tag", help="tag name (writable: true)")
    p.add_argument(
        "value", help="engineering value: a number, true/false, or text (quote digits as text)"
    )
    p.add_argument(
        "--simulate", action="store_true", help="write to the device's simulator (a rehearsal)"
    )
    p.add_argument("--user", help="who is writing, for the audit log (default: the OS user)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--no-audit-topic",
        action="store_true",
        help="keep the audit records in the local audit log only (default: also publish "
        f"them on commands.audit_topic, waiting at most {AUDIT_PUBLISH_TIMEOUT_S:g} s "
        "for the broker)",
    )
    p.set_defaults(func=lambda args: cmd_write(args, load))
