"""Modbus: registers the protocol with the agent (see `drivers.registry`).

Only the pydantic config is imported here; the driver, simulator and planner (and so
pymodbus) are imported when first used.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import structlog

from drivers.base import DriverContext, served_at
from drivers.modbus.config import ModbusDevice
from drivers.registry import Protocol

if TYPE_CHECKING:
    from drivers.modbus.driver import ModbusDriver

log = structlog.get_logger(__name__)


def _create_driver(device: ModbusDevice, context: DriverContext) -> ModbusDriver:
    from drivers.modbus.driver import ModbusDriver

    if device.link is None:
        return ModbusDriver(device)
    from drivers.links import Link

    name = device.link
    config = context.links.get(name)
    if config is None:
        raise ValueError(f"device {device.name!r}: no link {name!r} in the config's links")
    # One Link per configured link: every unit on it shares the port and its timing.
    link = context.shared(("modbus-link", name), lambda: Link(name, config))
    return ModbusDriver(device, link=link)


@asynccontextmanager
async def _simulate(devices: Sequence[ModbusDevice]) -> AsyncIterator[Mapping[str, ModbusDevice]]:
    from drivers.modbus.simulator import ModbusSimulator

    # Units on shared links are served by _simulate_links (their link config changes,
    # the device config does not).
    linked = {d.name: d for d in devices if d.link is not None}
    tcp = [d for d in devices if d.link is None]
    async with ModbusSimulator(tcp) as sim:
        yield {**linked, **served_at(tcp, sim.endpoints)}


def _plan(devices: Sequence[ModbusDevice]) -> str:
    from drivers.modbus.plan import format_plan

    return format_plan(devices)


def _plan_links(links: Mapping[str, Any], devices: Sequence[ModbusDevice]) -> tuple[str, list[str]]:
    from drivers.modbus.plan import format_link_plans

    linked = [d for d in devices if d.link is not None]
    if not linked:
        return "", []
    return format_link_plans(dict(links), linked)


@asynccontextmanager
async def _simulate_links(
    links: Mapping[str, Any], devices: Sequence[ModbusDevice]
) -> AsyncIterator[Mapping[str, Any]]:
    from drivers.links import link_address
    from drivers.modbus.simulator import LinkSimulator

    used = {d.link for d in devices if d.link is not None}
    async with LinkSimulator({n: c for n, c in links.items() if n in used}, devices) as sim:
        for name in sorted(used):
            log.info("simulator.link", link=name, serving=link_address(sim.links[name]))
        yield dict(sim.links)


def _add_commands(sub: Any) -> None:
    from drivers.modbus.probe import add_probe_command

    add_probe_command(sub)


PROTOCOL = Protocol(
    name="modbus",
    device_model=ModbusDevice,
    create_driver=_create_driver,
    simulate=_simulate,
    plan=_plan,
    plan_links=_plan_links,
    simulate_links=_simulate_links,
    add_commands=_add_commands,
    capabilities=frozenset({"columns", "shared_links", "write"}),
    summary="Modbus TCP, RTU on serial lines, RTU over TCP, gateways: block reads, writes",
)
