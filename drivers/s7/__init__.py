"""Siemens S7: registers the protocol with the agent (see `drivers.registry`).

Only the pydantic config is imported here; the driver, simulator and planner are
imported when first used.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from drivers.base import DriverContext, served_at
from drivers.registry import Protocol
from drivers.s7.config import S7Device

if TYPE_CHECKING:
    from drivers.s7.driver import S7Driver


def _create_driver(device: S7Device, context: DriverContext) -> S7Driver:
    from drivers.s7.driver import S7Driver

    return S7Driver(device)


@asynccontextmanager
async def _simulate(devices: Sequence[S7Device]) -> AsyncIterator[Mapping[str, S7Device]]:
    from drivers.s7.simulator import S7Simulator

    async with S7Simulator(devices) as sim:
        yield served_at(devices, sim.endpoints)


def _plan(devices: Sequence[S7Device]) -> str:
    from drivers.s7.plan import format_plan

    return format_plan(devices)


PROTOCOL = Protocol(
    name="s7",
    device_model=S7Device,
    create_driver=_create_driver,
    simulate=_simulate,
    plan=_plan,
    capabilities=frozenset({"columns", "write"}),
    summary="Siemens S7-300/400/1200/1500 (ISO-on-TCP): DB, M, I, Q; multi-variable reads, writes",
)
