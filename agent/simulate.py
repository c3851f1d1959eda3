"""Simulator mode: the simulated PLCs of a config, started in the agent's process.

`edge-agent run CONFIG --simulate` and `edge-agent simulate CONFIG` use `simulators()`:
it starts, for every protocol with enabled devices, that protocol's simulator (the
`simulate` hook of its `drivers.registry` entry, usually `drivers/<proto>/simulator.py`)
and yields the config with each device's endpoint replaced by where its simulator
actually listens (the configured loopback port, or a free one when that is 0 or taken —
said in the log as `simulator.endpoint`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import structlog

from agent.config import Config
from drivers import registry
from drivers.base import DeviceCommon

log = structlog.get_logger()


class SimulatorUnavailable(RuntimeError):
    """A configured protocol has no simulator: simulator mode cannot run this config."""


@asynccontextmanager
async def simulators(config: Config) -> AsyncIterator[Config]:
    """Start the simulated PLCs of every enabled device; yield the config with each
    device's endpoint replaced by where its simulator actually listens. Raises
    SimulatorUnavailable, before starting anything, when an enabled device's protocol
    has no simulator."""
    by_protocol: dict[str, list[DeviceCommon]] = {}
    for device in config.devices:
        if device.enabled:
            by_protocol.setdefault(str(getattr(device, "protocol", "?")), []).append(device)
    entries = {name: registry.get(name) for name in by_protocol}
    missing = sorted(name for name, entry in entries.items() if entry.simulate is None)
    if missing:
        names = [d.name for p in missing for d in by_protocol[p]]
        raise SimulatorUnavailable(
            f"protocol {', '.join(missing)} has no simulator (devices {', '.join(names)}); "
            "disable those devices (enabled: false) or run without --simulate"
        )
    async with AsyncExitStack() as stack:
        links = dict(config.links)
        for name, devices in by_protocol.items():
            simulate_links = entries[name].simulate_links
            if config.links and simulate_links is not None:
                links.update(await stack.enter_async_context(simulate_links(config.links, devices)))
        replaced: dict[str, DeviceCommon] = {}
        for name, devices in by_protocol.items():
            simulate = entries[name].simulate
            assert simulate is not None
            served = await stack.enter_async_context(simulate(devices))
            for device in devices:
                if device.name not in served:
                    raise SimulatorUnavailable(
                        f"the {name} simulator did not serve device {device.name!r}"
                    )
                replaced[device.name] = served[device.name]
        log.info("simulator.started", devices=sorted(replaced))
        devices = [replaced.get(d.name, d) for d in config.devices]
        yield config.model_copy(update={"devices": devices, "links": links})
