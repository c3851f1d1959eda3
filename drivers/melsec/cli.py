"""`edge-agent melsec read`: read a few addresses from a CPU, for commissioning.

    edge-agent melsec read HOST:PORT --series iq-f D100 D102:float32 M0 X17

Builds a device config from the arguments (checked like a config file), reads once with
the driver the agent uses (same plan, frame checks and end codes) and prints one line
per address: `ADDRESS<TAB>TYPE<TAB>VALUE`, or `ADDRESS<TAB>bad<TAB>REASON`.
Exit codes: 0 every address read, 1 some bad or the CPU unreachable, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from pydantic import ValidationError

from drivers.base import DriverError
from drivers.melsec.config import MelsecDevice


def add_melsec_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register `melsec read`."""
    melsec = subparsers.add_parser("melsec", help="MELSEC tools: read addresses from a CPU")
    sub = melsec.add_subparsers(dest="melsec_command", required=True)
    r = sub.add_parser("read", help="read addresses once and print their values")
    r.add_argument("endpoint", help="HOST:PORT of the CPU's SLMP connection")
    r.add_argument("addresses", nargs="+", help="ADDRESS[:TYPE], e.g. D100 D102:float32 X17")
    r.add_argument("--series", required=True, choices=("q", "l", "iq-r", "iq-f"))
    r.add_argument("--frame", choices=("3e", "4e"), default="3e")
    r.add_argument("--network", type=int, default=0)
    r.add_argument("--station", type=int, default=255)
    r.add_argument("--timeout-s", type=float, default=2.0)
    r.set_defaults(func=_read)


def device_from_args(args: argparse.Namespace) -> MelsecDevice:
    """The device config the arguments describe. Raises ValueError with the reason."""
    host, sep, port = str(args.endpoint).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"endpoint {args.endpoint!r}: expected HOST:PORT")
    tags = []
    for i, text in enumerate(args.addresses):
        address, _, data_type = str(text).partition(":")
        tag: dict[str, Any] = {"name": f"a{i}", "address": address}
        if data_type.startswith("string"):
            tag.update(type="string", length=int(data_type[6:] or 1))
        elif data_type:
            tag["type"] = data_type
        tags.append(tag)
    try:
        return MelsecDevice.model_validate(
            {
                "name": "probe",
                "protocol": "melsec",
                "series": args.series,
                "host": host,
                "port": int(port),
                "frame": args.frame,
                "network": args.network,
                "station": args.station,
                "timeout_s": args.timeout_s,
                "retries": 0,
                "tags": tags,
            }
        )
    except ValidationError as exc:
        raise ValueError(
            "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        ) from None


async def _read_once(device: MelsecDevice) -> list[tuple[str, str, str]]:
    from drivers.melsec.driver import MelsecDriver

    driver = MelsecDriver(device)
    await driver.connect()
    try:
        readings = await driver.read("default")
    finally:
        await driver.close()
    out: list[tuple[str, str, str]] = []
    for tag, reading in zip(device.tags, readings, strict=True):
        if reading.quality == "good":
            out.append((tag.address, tag.resolved_type(), repr(reading.value)))
        else:
            out.append((tag.address, "bad", str(reading.reason)))
    return out


def _read(args: argparse.Namespace) -> int:
    try:
        device = device_from_args(args)
    except ValueError as exc:
        print(f"melsec read: {exc}", file=sys.stderr)
        return 2
    try:
        lines = asyncio.run(_read_once(device))
    except DriverError as exc:
        print(f"melsec read: {exc}", file=sys.stderr)
        return 1
    for line in lines:
        print("\t".join(line))
    return 0 if all(kind != "bad" for _, kind, _ in lines) else 1
