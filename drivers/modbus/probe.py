"""`edge-agent probe`: read a range from a live Modbus device and show every decoding.

An integrator commissioning a meter rarely has a trustworthy register map: the probe
reads a range once (Modbus/TCP, RTU on a serial port, or RTU over TCP) and prints, side
by side, every way of reading it — u16/i16 per register; u32/i32/f32 and u64/i64/f64
from every start address in the four byte orders (ABCD, CDAB, BADC, DCBA); the range as
ASCII with both byte orders; the bits — so the type, the order and the scale can be
found in one look. `--scan` lists which unit ids on a line answer.

The decodings use the agent's own codec (`drivers.modbus.codec`) and the requests go
through the same `Link` and driver as polling does, so what the probe shows is what a
tag with that type and byte order will publish.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections.abc import Sequence
from typing import Any

from drivers.base import DriverUnavailable
from drivers.modbus.codec import ValueSpec, decode
from drivers.modbus.config import ByteOrder, DataType, ModbusDevice, Table, parse_classic_address

__all__ = ["ORDERS", "add_probe_command", "decode_all", "format_decodings", "parse_units"]

ORDERS: tuple[ByteOrder, ...] = ("ABCD", "CDAB", "BADC", "DCBA")
_WIDE: tuple[tuple[str, tuple[DataType, ...], int], ...] = (
    ("32-bit", ("uint32", "int32", "float32"), 2),
    ("64-bit", ("uint64", "int64", "float64"), 4),
)
_SHORT = {
    "uint32": "u32",
    "int32": "i32",
    "float32": "f32",
    "uint64": "u64",
    "int64": "i64",
    "float64": "f64",
}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.7g}"
    return str(value)


def _ascii(data: bytes) -> str:
    return "".join(chr(b) if 32 <= b < 127 else "." for b in data)


def decode_all(start: int, words: Sequence[int]) -> dict[tuple[int, str, ByteOrder], Any]:
    """Every multi-register decoding of `words` read at `start`: (address, type, byte
    order) → value, for u32/i32/f32 and u64/i64/f64 from every start address."""
    out: dict[tuple[int, str, ByteOrder], Any] = {}
    for _, types, size in _WIDE:
        for i in range(len(words) - size + 1):
            regs = list(words[i : i + size])
            for t in types:
                for order in ORDERS:
                    out[(start + i, t, order)] = decode(ValueSpec(t, order), regs)
    return out


def format_decodings(start: int, words: Sequence[int], table: Table = "holding") -> str:
    """Every decoding of `words` read from `table` at 0-based address `start`."""
    if table in ("coil", "discrete_input"):
        lines = [f"{table} {start}..{start + len(words) - 1}: {len(words)} bits"]
        for i in range(0, len(words), 16):
            chunk = "".join("1" if w else "0" for w in words[i : i + 16])
            lines.append(f"  {start + i:>5}: {chunk}")
        return "\n".join(lines)
    lines = [
        f"{table} {start}..{start + len(words) - 1}: {len(words)} registers",
        "",
        f"  {'addr':>5}  {'hex':>6}  {'u16':>5}  {'i16':>6}  {'AB':>2} {'BA':>2}  bits 15..0",
    ]
    for i, w in enumerate(words):
        hi, lo = w >> 8, w & 0xFF
        i16 = decode(ValueSpec("int16"), [w])
        bits = f"{w:016b}"
        lines.append(
            f"  {start + i:>5}  0x{w:04X}  {w:>5}  {i16:>6}  "
            f"{_ascii(bytes((hi, lo))):>2} {_ascii(bytes((lo, hi))):>2}  "
            f"{bits[:4]} {bits[4:8]} {bits[8:12]} {bits[12:]}"
        )
    values = decode_all(start, words)
    for title, types, size in _WIDE:
        if len(words) < size:
            continue
        lines += ["", f"  {title} values from each start address, per byte order:"]
        header = f"  {'addr':>5}  {'type':<4}" + "".join(f"  {o:>22}" for o in ORDERS)
        lines.append(header)
        for i in range(len(words) - size + 1):
            for t in types:
                cells = [_fmt(values[(start + i, t, order)]) for order in ORDERS]
                addr = f"{start + i:>5}" if t == types[0] else " " * 5
                lines.append(f"  {addr}  {_SHORT[t]:<4}" + "".join(f"  {c:>22}" for c in cells))
    be = b"".join(w.to_bytes(2, "big") for w in words)
    le = b"".join(w.to_bytes(2, "little") for w in words)
    lines += [
        "",
        f"  ascii ABCD/CDAB (high byte first): {_ascii(be)!r}",
        f"  ascii BADC/DCBA (low byte first):  {_ascii(le)!r}",
    ]
    return "\n".join(lines)


def parse_units(text: str) -> list[int]:
    """'1-10,17,20-22' → [1..10, 17, 20, 21, 22] (each 0-255)."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        first, last = int(lo), int(hi or lo)
        if not 0 <= first <= last <= 255:
            raise ValueError(f"unit range {part!r}: units are 0-255")
        out.extend(range(first, last + 1))
    return out


# ------------------------------------------------------------------ CLI


def add_probe_command(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register `edge-agent probe`."""
    p = subparsers.add_parser(
        "probe",
        help="read a range from a Modbus device and show every decoding (or --scan units)",
        description="Read registers from a live Modbus device (TCP, RTU on a serial port, "
        "RTU over TCP) and print every decoding side by side; --scan lists the unit ids "
        "that answer. Reach the device with --host, --serial or --rtu-over-tcp, or name a "
        "device or link of a config with CONFIG and --device / --link.",
    )
    p.add_argument("config", nargs="?", help="YAML config file (with --device or --link)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--device", help="a device of CONFIG (its link or host, its unit id)")
    where.add_argument("--link", help="a link of CONFIG (give --unit)")
    where.add_argument("--host", help="Modbus/TCP device or gateway")
    where.add_argument("--serial", help="serial port, e.g. /dev/ttyUSB0 (Modbus RTU)")
    where.add_argument("--rtu-over-tcp", metavar="HOST:PORT", help="serial device server")
    p.add_argument("--port", type=int, default=502, help="TCP port with --host (502)")
    p.add_argument("--baud", type=int, default=19200, help="baud rate (19200)")
    p.add_argument("--parity", choices=("N", "E", "O"), default="E", help="parity (E)")
    p.add_argument("--stop-bits", type=int, choices=(1, 2), default=1, help="stop bits (1)")
    p.add_argument("--unit", type=int, default=None, help="unit id (default: the device's, or 1)")
    p.add_argument(
        "--table",
        choices=("holding", "input", "coil", "discrete_input"),
        default=None,
        help="table (default holding, or implied by a classic address)",
    )
    p.add_argument("--address", default="0", help="0-based address or classic '40001' (0)")
    p.add_argument("--count", type=int, default=8, help="registers (bits) to read (8)")
    p.add_argument("--timeout-s", type=float, default=None, help="answer timeout (1.0)")
    p.add_argument("--scan", action="store_true", help="list the unit ids that answer")
    p.add_argument("--units", default="1-247", help="units to --scan, e.g. 1-32,100 (1-247)")
    p.set_defaults(func=_probe_main)


def _fail(message: str, code: int = 2) -> int:
    print(f"probe: {message}", file=sys.stderr)
    return code


def _target(args: argparse.Namespace) -> tuple[Any, int, float] | str:
    """(link config, unit, timeout) from the arguments, or an error message."""
    from drivers.links import RtuOverTcpLink, SerialLink, TcpGatewayLink

    timeout = args.timeout_s
    unit = args.unit
    if args.device or args.link:
        if not args.config:
            return "--device and --link need the CONFIG file"
        from agent.config import ConfigError, load_config

        try:
            config = load_config(args.config)
        except ConfigError as exc:
            return "invalid config:\n  " + "\n  ".join(exc.problems)
        if args.device:
            found = [
                d for d in config.devices if d.name == args.device and isinstance(d, ModbusDevice)
            ]
            if not found:
                return f"no Modbus device {args.device!r} in {args.config}"
            dev = found[0]
            unit = dev.unit_id if unit is None else unit
            timeout = dev.timeout_s if timeout is None else timeout
            if dev.link is not None:
                return config.links[dev.link], unit, timeout
            assert dev.host is not None
            return TcpGatewayLink(type="tcp", host=dev.host, port=dev.port), unit, timeout
        if args.link not in config.links:
            return f"no link {args.link!r} in {args.config} (defined: {', '.join(config.links)})"
        return config.links[args.link], 1 if unit is None else unit, timeout or 1.0
    unit = 1 if unit is None else unit
    timeout = 1.0 if timeout is None else timeout
    line = {"baud": args.baud, "parity": args.parity, "stop_bits": args.stop_bits}
    if args.host:
        return TcpGatewayLink(type="tcp", host=args.host, port=args.port), unit, timeout
    if args.serial:
        return SerialLink(type="serial", port=args.serial, **line), unit, timeout
    if args.rtu_over_tcp:
        host, _, port = args.rtu_over_tcp.rpartition(":")
        if not host or not port.isdigit():
            return f"--rtu-over-tcp {args.rtu_over_tcp!r}: give HOST:PORT"
        return RtuOverTcpLink(type="rtu_over_tcp", host=host, port=int(port), **line), unit, timeout
    return "say where the device is: --host, --serial, --rtu-over-tcp, or CONFIG --device/--link"


def _address(args: argparse.Namespace) -> tuple[Table, int]:
    text = str(args.address)
    if text.isdigit() and len(text) in (5, 6) and text[0] in "0134":
        table, address = parse_classic_address(text)
        if args.table is not None and args.table != table:
            raise ValueError(f"address {text} is in table {table}, not {args.table}")
        return table, address
    try:
        address = int(text, 0)
    except ValueError:
        raise ValueError(
            f"--address {text!r}: a 0-based number, or a classic address like 40001"
        ) from None
    if not 0 <= address <= 65535:
        raise ValueError(f"address {text}: 0-65535")
    return args.table or "holding", address


def _probe_device(unit: int, table: Table, start: int, count: int, timeout: float) -> ModbusDevice:
    bits = table in ("coil", "discrete_input")
    tags = [
        {
            "name": f"r{start + i}",
            "table": table,
            "address": start + i,
            "type": "bool" if bits else "uint16",
        }
        for i in range(count)
    ]
    return ModbusDevice.model_validate(
        {
            "name": "probe",
            "protocol": "modbus",
            "link": "probe",
            "unit_id": unit,
            "timeout_s": timeout,
            "retries": 0,
            "tags": tags,
        }
    )


def _probe_main(args: argparse.Namespace) -> int:
    if args.unit is not None and not 0 <= args.unit <= 255:
        return _fail(f"--unit {args.unit}: unit ids are 0-255")
    if args.timeout_s is not None and not args.timeout_s > 0:
        return _fail(f"--timeout-s {args.timeout_s:g}: must be more than 0")
    from pydantic import ValidationError

    try:
        target = _target(args)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return _fail(f"{where}: {first['msg']}")
    if isinstance(target, str):
        return _fail(target)
    try:
        table, start = _address(args)
        units = parse_units(args.units) if args.scan else []
    except ValueError as exc:
        return _fail(str(exc))
    limit = 2000 if table in ("coil", "discrete_input") else 125
    count = 1 if args.scan else args.count
    if not count >= 1 or start + count > 65536:
        return _fail(f"--count {count}: 1.. up to address 65535")
    if count > 16 * limit:
        return _fail(f"--count {count}: at most {16 * limit} per probe")
    link_config, unit, timeout = target
    from agent.logs import setup_logging

    # The probe's output is its report; a silent unit during a scan is expected, not a
    # warning worth a log line.
    setup_logging("error")
    try:
        if args.scan:
            return asyncio.run(_scan(link_config, units, table, start, timeout))
        return asyncio.run(_read(link_config, unit, table, start, count, timeout))
    except KeyboardInterrupt:
        return 130


async def _read_once(link: Any, device: ModbusDevice) -> tuple[list[Any], list[str]]:
    from drivers.modbus.driver import ModbusDriver

    driver = ModbusDriver(device, link=link)
    await driver.connect()
    try:
        readings = await driver.read("default")
    finally:
        await driver.close()
    return [r.value for r in readings], [r.reason or "" for r in readings]


async def _read(
    link_config: Any, unit: int, table: Table, start: int, count: int, timeout_s: float
) -> int:
    from drivers.links import Link, LinkError

    link = Link("probe", link_config)
    device = _probe_device(unit, table, start, count, timeout_s)
    try:
        await link.acquire()
        values, reasons = await _read_once(link, device)
    except LinkError as exc:
        return _fail(f"{link.where}: {exc}", 1)
    except DriverUnavailable as exc:
        return _fail(f"unit {unit}: {exc}", 1)
    finally:
        await link.close()
    bad = sorted({r for r in reasons if r})
    if bad:
        return _fail(f"unit {unit}: {table} {start}..{start + count - 1}: {'; '.join(bad)}", 1)
    words = [int(v) for v in values]  # good readings are numbers / bools
    print(f"unit {unit} on {link.where}")
    print(format_decodings(start, words, table))
    return 0


async def _scan(
    link_config: Any, units: list[int], table: Table, start: int, timeout_s: float
) -> int:
    from drivers.links import Link, LinkError

    link = Link("probe", link_config)
    found: list[int] = []
    try:
        await link.acquire()  # held for the whole scan: the port is opened once
    except LinkError as exc:
        return _fail(f"{link.where}: {exc}", 1)
    print(
        f"scanning {len(units)} unit ids on {link.where} ({table} {start}, "
        f"timeout {timeout_s:g} s each)"
    )
    try:
        for unit in units:
            device = _probe_device(unit, table, start, 1, timeout_s)
            try:
                _, reasons = await _read_once(link, device)
            except DriverUnavailable as exc:
                if exc.reason == "timeout":
                    continue
                print(f"  unit {unit:>3}: {exc}")
                if exc.reason in ("port unavailable", "connection refused"):
                    return 1
                continue
            found.append(unit)
            print(
                f"  unit {unit:>3}: answers" + (f" ({reasons[0]})" if reasons[0] else ""),
                flush=True,
            )
    finally:
        await link.close()
    print(
        f"{len(found)} unit{'' if len(found) == 1 else 's'} answered: "
        + (", ".join(map(str, found)) or "none")
    )
    return 0 if found else 1
