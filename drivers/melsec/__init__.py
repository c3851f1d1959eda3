"""MELSEC over SLMP: registers the protocol with the agent (see `drivers.registry`).

Only the pydantic config is imported here; the driver, simulator and planner are
imported when first used.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from drivers.base import DriverContext, served_at
from drivers.melsec.config import MelsecDevice
from drivers.registry import Protocol

if TYPE_CHECKING:
    from drivers.melsec.driver import MelsecDriver


def _create_driver(device: MelsecDevice, context: DriverContext) -> MelsecDriver:
    from drivers.melsec.driver import MelsecDriver

    return MelsecDriver(device)


@asynccontextmanager
async def _simulate(devices: Sequence[MelsecDevice]) -> AsyncIterator[Mapping[str, MelsecDevice]]:
    from drivers.melsec.simulator import MelsecSimulator

    async with MelsecSimulator(devices) as sim:
        yield served_at(devices, sim.endpoints)


def _plan(devices: Sequence[MelsecDevice]) -> str:
    from drivers.melsec.plan import format_plan

    return format_plan(devices)


def _add_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    from drivers.melsec.cli import add_melsec_commands

    add_melsec_commands(subparsers)


PROTOCOL = Protocol(
    name="melsec",
    device_model=MelsecDevice,
    create_driver=_create_driver,
    simulate=_simulate,
    plan=_plan,
    add_commands=_add_commands,
    capabilities=frozenset({"columns", "write"}),
    summary="MELSEC SLMP (MC protocol 3E/4E binary): D, W, R, ZR, M, L, B, X, Y, SM, SD, TN, CN",
)
