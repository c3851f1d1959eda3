"""The fake protocol's simulator: in-process servers that the fake driver reads.

`FakeNetwork` is the in-process "wire": endpoint → `FakeServer`. `FakeSimulator(devices,
network)` starts one server per configured endpoint (devices sharing an endpoint share
a server, as units share a gateway), at a fresh endpoint `fake://simN`, and serves every
tag's value from its `simulate` generator (or the default for its type).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from types import TracebackType

from drivers.base import Scalar
from drivers.fake.config import FakeDevice
from drivers.generators import Generator, default_spec, make_generator


class FakeServer:
    """Serves the tags of the devices given to it; counts the reads it answered."""

    def __init__(self, endpoint: str, devices: Sequence[FakeDevice]) -> None:
        self.endpoint = endpoint
        self.reads = 0
        self._t0 = time.monotonic()
        self._values: dict[str, dict[str, Generator]] = {}
        # (device, tag) → the value last written: served instead of the generator's
        self.written: dict[tuple[str, str], Scalar] = {}
        self.writes = 0
        for n, device in enumerate(devices):
            gens: dict[str, Generator] = {}
            for i, tag in enumerate(device.tags):
                spec = tag.simulate or default_spec(tag.type)
                gens[tag.name] = make_generator(spec, tag.type, seed=n * 1000 + i)
            self._values[device.name] = gens

    def serves(self, device: str) -> bool:
        return device in self._values

    def value(self, device: str, tag: str) -> Scalar:
        if (device, tag) in self.written:
            return self.written[(device, tag)]
        return self._values[device][tag](time.monotonic() - self._t0)

    def write(self, device: str, tag: str, value: Scalar) -> None:
        """Store a written value; reads return it from now on."""
        self.writes += 1
        self.written[(device, tag)] = value


class FakeNetwork:
    """endpoint → server, for the fake driver to connect to."""

    def __init__(self) -> None:
        self.servers: dict[str, FakeServer] = {}
        self._ids = itertools.count(1)

    def new_endpoint(self) -> str:
        return f"fake://sim{next(self._ids)}"


class FakeSimulator:
    """Async context manager serving `devices` on `network` until exit.

    `endpoints[device.name]` is where each device is served."""

    def __init__(self, devices: Sequence[FakeDevice], network: FakeNetwork) -> None:
        self.network = network
        self.endpoints: dict[str, str] = {}
        self._servers: list[FakeServer] = []
        by_endpoint: dict[str, list[FakeDevice]] = {}
        for device in devices:
            by_endpoint.setdefault(device.endpoint, []).append(device)
        self._groups = list(by_endpoint.values())

    async def __aenter__(self) -> FakeSimulator:
        for group in self._groups:
            server = FakeServer(self.network.new_endpoint(), group)
            self.network.servers[server.endpoint] = server
            self._servers.append(server)
            for device in group:
                self.endpoints[device.name] = server.endpoint
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for server in self._servers:
            self.network.servers.pop(server.endpoint, None)
        self._servers.clear()

    def server(self, device: str) -> FakeServer:
        return self.network.servers[self.endpoints[device]]
