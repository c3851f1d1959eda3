"""`edge-agent xgt probe HOST`: connect to an XGT PLC, read a few addresses once, print
what came back and the PLC's state. For commissioning: is the FEnet module reachable,
is the CPU in RUN, does it serve these addresses?

Exit codes: 0 every address read, 1 the PLC is unreachable or refused an address,
2 bad arguments (an address that is not a direct variable, an area the CPU lacks).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from pydantic import ValidationError


def add_xgt_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register `xgt probe`."""
    xgt = subparsers.add_parser("xgt", help="LS ELECTRIC XGT tools: probe")
    sub = xgt.add_subparsers(dest="xgt_command", required=True)
    p = sub.add_parser("probe", help="read addresses of an XGT PLC once and show its state")
    p.add_argument("host", help="IP address or name of the FEnet module")
    p.add_argument("--port", type=int, default=2004)
    p.add_argument("--cpu", default="XGK", choices=("XGK", "XGI", "XGR", "XGB_MK", "XGB_IEC"))
    p.add_argument(
        "--address",
        action="append",
        default=None,
        help='direct variable to read, e.g. "%%MW0" (repeatable; default %%MW0)',
    )
    p.add_argument("--timeout-s", type=float, default=2.0)
    p.set_defaults(func=_probe)


def _probe(args: argparse.Namespace) -> int:
    from drivers.xgt.config import XgtDevice

    addresses = args.address or ["%MW0"]
    try:
        device = XgtDevice.model_validate(
            {
                "name": "probe",
                "protocol": "xgt",
                "host": args.host,
                "port": args.port,
                "cpu": args.cpu,
                "timeout_s": args.timeout_s,
                "tags": [{"name": a, "address": a} for a in addresses],
            }
        )
    except ValidationError as exc:
        for error in exc.errors():
            print(f"xgt probe: {error['msg']}", file=sys.stderr)
        return 2
    return asyncio.run(_run(device))


async def _run(device: Any) -> int:
    from drivers.base import DriverError
    from drivers.xgt.driver import XgtDriver

    driver = XgtDriver(device)
    endpoint = f"{device.host}:{device.port}"
    try:
        await driver.connect()
        readings = await driver.read("default")
    except DriverError as exc:
        print(f"{endpoint}: {exc}")
        return 1
    finally:
        await driver.close()
    header = driver.last_header
    state = (
        header.system_status + (" with CPU error" if header.cpu_error else "") if header else "?"
    )
    info = f", CPU info 0x{header.cpu_info:02X}" if header else ""
    print(f"{endpoint}: connected, PLC {state}{info}")
    code = 0
    for r in readings:
        if r.quality == "good":
            print(f"{r.tag}\tgood\t{r.value}")
        else:
            print(f"{r.tag}\t{r.quality}\t{r.reason}")
            code = 1
    return code
