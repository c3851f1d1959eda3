"""OPC UA: registers the protocol with the agent (see `drivers.registry`).

Only the pydantic config is imported here; asyncua (~0.4 s and ~30 MB to import) is
imported by the driver, the simulator and the commands when they are used.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from drivers.base import DriverContext
from drivers.opcua.config import OpcUaDevice
from drivers.registry import Protocol

if TYPE_CHECKING:
    from drivers.opcua.driver import OpcUaDriver

log = structlog.get_logger(__name__)


def _create_driver(device: OpcUaDevice, context: DriverContext) -> OpcUaDriver:
    from drivers.opcua.driver import OpcUaDriver

    return OpcUaDriver(device)


@asynccontextmanager
async def _simulate(devices: Sequence[OpcUaDevice]) -> AsyncIterator[Mapping[str, OpcUaDevice]]:
    """The agent trusts exactly the certificate each simulator presents (pinned by
    thumbprint), as an operator would after `edge-agent opcua trust`."""
    from drivers.opcua.certs import sha256_thumbprint
    from drivers.opcua.simulator import OpcUaSimulator

    cert_dir = Path(devices[0].cert_dir) / "simulator"
    async with OpcUaSimulator(devices, cert_dir=cert_dir) as sim:
        served: dict[str, OpcUaDevice] = {}
        for dev in devices:
            endpoint = sim.endpoints[dev.name]
            update: dict[str, Any] = {"endpoint": endpoint}
            der = sim.certificate(dev.name)
            if der is not None:
                update["server_certificate_thumbprint"] = sha256_thumbprint(der)
            if endpoint != dev.endpoint:
                log.info(
                    "simulator.endpoint", device=dev.name, configured=dev.endpoint, serving=endpoint
                )
            served[dev.name] = dev.model_copy(update=update)
        yield served


def _add_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    from drivers.opcua.cli import add_opcua_commands

    add_opcua_commands(subparsers)


PROTOCOL = Protocol(
    name="opcua",
    device_model=OpcUaDevice,
    create_driver=_create_driver,
    simulate=_simulate,
    add_commands=_add_commands,
    capabilities=frozenset({"subscribe", "write"}),
    summary="OPC UA: polled reads, subscriptions and writes, security policies, certificate trust",
)
