"""LS ELECTRIC XGT over FEnet: registers the protocol with the agent (see `drivers.registry`).

Only the pydantic config is imported here; the driver, simulator and planner are imported
when first used. The protocol needs no third-party library.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from drivers.base import DriverContext, served_at
from drivers.registry import Protocol
from drivers.xgt.config import XgtDevice

if TYPE_CHECKING:
    from drivers.xgt.driver import XgtDriver


def _create_driver(device: XgtDevice, context: DriverContext) -> XgtDriver:
    from drivers.xgt.driver import XgtDriver

    return XgtDriver(device)


@asynccontextmanager
async def _simulate(devices: Sequence[XgtDevice]) -> AsyncIterator[Mapping[str, XgtDevice]]:
    from drivers.xgt.simulator import XgtSimulator

    async with XgtSimulator(devices) as sim:
        yield served_at(devices, sim.endpoints)


def _plan(devices: Sequence[XgtDevice]) -> str:
    from drivers.xgt.plan import format_plan

    return format_plan(devices)


def _add_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    from drivers.xgt.cli import add_xgt_commands

    add_xgt_commands(subparsers)


PROTOCOL = Protocol(
    name="xgt",
    device_model=XgtDevice,
    create_driver=_create_driver,
    simulate=_simulate,
    plan=_plan,
    add_commands=_add_commands,
    capabilities=frozenset({"columns", "write"}),
    summary="LS ELECTRIC XGT over FEnet (XGK/XGI/XGR/XGB): continuous and individual reads, writes",
)
