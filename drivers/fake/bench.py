"""`FakeBench`: a fake plant for tests — the fake protocol's registry entry, its
in-process network, one script per device, and every call the fake drivers received.

    bench = FakeBench()
    with drivers.registry.registered(bench.protocol()):
        bench.script("oven").read(error=DriverUnavailable("timeout"))
        ...                      # load a config with protocol: fake, run the agent
    bench.calls                  # [Call(device="oven", op="connect", ...), ...]
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager

from drivers.base import DriverContext
from drivers.fake.config import FakeDevice
from drivers.fake.driver import Call, FakeDriver, FakeScript
from drivers.fake.simulator import FakeNetwork, FakeSimulator
from drivers.registry import Protocol


class FakeBench:
    """A fake plant: see the module docstring."""

    def __init__(self) -> None:
        self.network = FakeNetwork()
        self.scripts: dict[str, FakeScript] = {}
        self.calls: list[Call] = []
        self.drivers: list[FakeDriver] = []
        self.simulators: list[FakeSimulator] = []

    def script(self, device: str) -> FakeScript:
        """The script of a device (made empty on first use)."""
        return self.scripts.setdefault(device, FakeScript())

    def create_driver(self, device: FakeDevice, context: DriverContext) -> FakeDriver:
        driver = FakeDriver(
            device,
            context,
            network=self.network,
            script=self.script(device.name),
            calls=self.calls,
        )
        self.drivers.append(driver)
        return driver

    @asynccontextmanager
    async def simulate(
        self, devices: Sequence[FakeDevice]
    ) -> AsyncIterator[Mapping[str, FakeDevice]]:
        async with FakeSimulator(devices, self.network) as sim:
            self.simulators.append(sim)
            yield {
                d.name: d.model_copy(update={"endpoint": sim.endpoints[d.name]}) for d in devices
            }

    def calls_of(self, device: str, op: str | None = None) -> list[Call]:
        return [c for c in self.calls if c.device == device and (op is None or c.op == op)]

    def protocol(self) -> Protocol:
        """The registry entry of the fake protocol, bound to this bench."""
        return Protocol(
            name="fake",
            device_model=FakeDevice,
            create_driver=self.create_driver,
            simulate=self.simulate,
            plan=format_plan,
            capabilities=frozenset({"shared_links"}),
            summary="in-process fake devices, scripted per call (tests)",
        )


def format_plan(devices: Sequence[FakeDevice]) -> str:
    """`edge-agent plan` for fake devices: per device, per group, one request per poll."""
    lines = []
    for device in devices:
        lines.append(f"device {device.name} (fake {device.endpoint}, {len(device.tags)} tags)")
        intervals = device.group_intervals()
        groups: dict[str, int] = {}
        for tag in device.tags:
            groups[tag.group] = groups.get(tag.group, 0) + 1
        for group, count in groups.items():
            lines.append(
                f"  group {group} every {intervals[group]:g} s: "
                f"{count} tag{'' if count == 1 else 's'}, 1 request per poll"
            )
    return "\n".join(lines)
