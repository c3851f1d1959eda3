"""Simulator mode: the simulated PLCs of a config, started in the agent's process.

`edge-agent run CONFIG --simulate` and `edge-agent simulate CONFIG` use `simulators()`:
it starts a simulator for every enabled device (each protocol's `drivers/<proto>/
simulator.py`) and yields the config with each device's endpoint replaced by where its
simulator actually listens (the configured loopback port, or a free one when that is 0
or taken — said in the log as `simulator.endpoint`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import structlog

from agent.config import Config
from drivers.base import DeviceCommon

log = structlog.get_logger()


@asynccontextmanager
async def simulators(config: Config) -> AsyncIterator[Config]:
    """Start the simulated PLCs of every configured device; yield the config with each
    device's endpoint replaced by where its simulator actually listens."""
    from drivers.modbus.config import ModbusDevice
    from drivers.opcua.config import OpcUaDevice

    async with AsyncExitStack() as stack:
        modbus = [d for d in config.devices if isinstance(d, ModbusDevice) and d.enabled]
        opcua = [d for d in config.devices if isinstance(d, OpcUaDevice) and d.enabled]
        replaced: dict[str, DeviceCommon] = {}
        if opcua:
            replaced.update(await _start_opcua(stack, opcua))
        if modbus:
            from drivers.modbus.simulator import ModbusSimulator

            sim = await stack.enter_async_context(ModbusSimulator(modbus))
            for dev in modbus:
                host, port = sim.endpoints[dev.name]
                if (host, port) != (dev.host, dev.port):
                    log.info(
                        "simulator.endpoint",
                        device=dev.name,
                        configured=f"{dev.host}:{dev.port}",
                        serving=f"{host}:{port}",
                    )
                replaced[dev.name] = dev.model_copy(update={"host": host, "port": port})
        log.info("simulator.started", devices=sorted(replaced))
        devices = [replaced.get(d.name, d) for d in config.devices]
        yield config.model_copy(update={"devices": devices})


async def _start_opcua(stack: AsyncExitStack, devices: list[Any]) -> dict[str, DeviceCommon]:
    """Start OPC UA simulators. The agent trusts exactly the certificate each simulator
    presents (pinned by thumbprint), as an operator would after `edge-agent opcua trust`."""
    from drivers.opcua.certs import sha256_thumbprint
    from drivers.opcua.simulator import OpcUaSimulator

    cert_dir = Path(devices[0].cert_dir) / "simulator"
    sim = await stack.enter_async_context(OpcUaSimulator(devices, cert_dir=cert_dir))
    out: dict[str, DeviceCommon] = {}
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
        out[dev.name] = dev.model_copy(update=update)
    return out
