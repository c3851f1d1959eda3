"""Modbus: registers the protocol with the agent (see `drivers.registry`).

Only the pydantic config is imported here; the driver, simulator and planner (and so
pymodbus) are imported when first used.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import structlog

from drivers.base import DriverContext
from drivers.modbus.config import ModbusDevice
from drivers.registry import Protocol

if TYPE_CHECKING:
    from drivers.modbus.driver import ModbusDriver

log = structlog.get_logger(__name__)


def _create_driver(device: ModbusDevice, context: DriverContext) -> ModbusDriver:
    from drivers.modbus.driver import ModbusDriver

    return ModbusDriver(device)


@asynccontextmanager
async def _simulate(devices: Sequence[ModbusDevice]) -> AsyncIterator[Mapping[str, ModbusDevice]]:
    from drivers.modbus.simulator import ModbusSimulator

    async with ModbusSimulator(devices) as sim:
        served: dict[str, ModbusDevice] = {}
        for dev in devices:
            host, port = sim.endpoints[dev.name]
            if (host, port) != (dev.host, dev.port):
                log.info(
                    "simulator.endpoint",
                    device=dev.name,
                    configured=f"{dev.host}:{dev.port}",
                    serving=f"{host}:{port}",
                )
            served[dev.name] = dev.model_copy(update={"host": host, "port": port})
        yield served


def _plan(devices: Sequence[ModbusDevice]) -> str:
    from drivers.modbus.plan import format_plan

    return format_plan(devices)


PROTOCOL = Protocol(
    name="modbus",
    device_model=ModbusDevice,
    create_driver=_create_driver,
    simulate=_simulate,
    plan=_plan,
    capabilities=frozenset({"columns"}),
    summary="Modbus/TCP: holding, input, coil and discrete tables, block reads",
)
