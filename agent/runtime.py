"""The supervisor: builds the pipeline from a valid Config and runs it until a signal.

Start order (outputs first, Telegraf's rule): buffer, publisher, forwarder, then the
simulators (simulator mode) and one poller per device. Stop order (inputs first):
pollers stop, the forwarder gets `grace_s` to flush what is buffered, then the
publisher disconnects and the buffer closes. Nothing buffered is lost by stopping:
what did not go out stays on disk for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from agent import __version__
from agent.buffer import Buffer
from agent.buffer.common import open_buffer
from agent.config import Config
from agent.forwarder import Forwarder
from agent.normalize import Normalizer, SeqCounter
from agent.payload import PayloadEncoder
from agent.poller import DevicePoller
from agent.publish import Publisher
from drivers.base import DeviceCommon, Driver, RawReading, TagCommon

log = structlog.get_logger()


def device_tags(device: DeviceCommon) -> list[TagCommon]:
    tags: list[TagCommon] = list(getattr(device, "tags", []))
    return tags


def make_driver(device: DeviceCommon) -> Driver:
    """The driver of a device, importing its protocol library only when needed."""
    protocol = getattr(device, "protocol", None)
    if protocol == "modbus":
        from drivers.modbus.config import ModbusDevice
        from drivers.modbus.driver import ModbusDriver

        assert isinstance(device, ModbusDevice)
        return ModbusDriver(device)
    if protocol == "opcua":
        from drivers.opcua.config import OpcUaDevice
        from drivers.opcua.driver import OpcUaDriver

        assert isinstance(device, OpcUaDevice)
        return OpcUaDriver(device)
    raise ValueError(f"no driver for protocol {protocol!r}")


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


@dataclass
class AgentStatus:
    started: float = field(default_factory=time.time)
    samples_produced: int = 0
    samples_dropped_on_error: int = 0


class Agent:
    """The running pipeline. `run()` returns when stopped; it never raises for device or
    broker trouble (those are states, logged and counted)."""

    def __init__(
        self,
        config: Config,
        *,
        publisher: Publisher | None = None,
        buffer: Buffer | None = None,
        grace_s: float = 10.0,
        status_interval_s: float = 60.0,
    ) -> None:
        self.config = config
        self.buffer = buffer or open_buffer(config.buffer)
        self._publisher = publisher
        self.grace_s = grace_s
        self.status_interval_s = status_interval_s
        self.status = AgentStatus()
        self.pollers: list[DevicePoller] = []
        self.forwarder: Forwarder | None = None
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    @property
    def publisher(self) -> Publisher:
        assert self._publisher is not None
        return self._publisher

    async def run(self) -> None:
        config = self.config
        await self.buffer.open()
        seq = SeqCounter(self.buffer.last_seq())
        log.info(
            "agent.starting",
            version=__version__,
            agent=config.agent.id,
            devices=len(config.devices),
            buffered_records=self.buffer.stats().records,
            last_seq=seq.last,
        )
        if self._publisher is None:
            from agent.publish.mqtt import MqttPublisher

            self._publisher = MqttPublisher(
                config.mqtt, config.mqtt.resolved_client_id(config.agent.id)
            )
        publisher = self.publisher
        forwarder = self.forwarder = Forwarder(
            self.buffer, publisher, PayloadEncoder(config.agent, config.mqtt)
        )
        try:
            await publisher.start()
            forward_task = asyncio.create_task(forwarder.run(), name="forwarder")
            try:
                await self._run_inputs(seq)
            finally:
                forward_task.cancel()
                await asyncio.wait({forward_task})
                left = await forwarder.drain(self.grace_s)
                if left:
                    log.info("agent.stopping.buffer_kept", records=left)
        finally:
            await publisher.close()
            await self.buffer.close()
            log.info(
                "agent.stopped",
                last_seq=seq.last,
                produced=self.status.samples_produced,
                delivered=forwarder.stats.samples_delivered,
            )

    async def _run_inputs(self, seq: SeqCounter) -> None:
        config = self.config
        devices = [d for d in config.devices if d.enabled]
        for device in devices:
            tags = device_tags(device)
            groups: dict[str, list[str]] = {}
            for tag in tags:
                groups.setdefault(tag.group, []).append(tag.name)
            normalizer = Normalizer(device.name, tags)
            poller = DevicePoller(
                device,
                str(getattr(device, "protocol", "?")),
                make_driver(device),
                groups,
                self._sink(device.name, normalizer, seq),
                subscribe_groups=device.subscribe_groups(),
            )
            self.pollers.append(poller)
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(p.run(), name=f"poll:{p.device.name}") for p in self.pollers]
            reporter = tg.create_task(self._report(), name="status")
            log.info("agent.started", devices=[d.name for d in devices])
            await self._stop.wait()
            log.info("agent.stopping")
            for t in [*tasks, reporter]:
                t.cancel()

    def _sink(self, device: str, normalizer: Normalizer, seq: SeqCounter) -> Any:
        buffer = self.buffer
        status = self.status

        async def sink(readings: Sequence[RawReading]) -> None:
            if not readings:
                return
            samples = normalizer.samples(readings, datetime.now(UTC), seq)
            try:
                await buffer.append(device, samples)
            except Exception as exc:
                status.samples_dropped_on_error += len(samples)
                log.error(
                    "buffer.append.failed", device=device, error=str(exc), samples=len(samples)
                )
                return
            status.samples_produced += len(samples)

        return sink

    async def _report(self) -> None:
        """A periodic status line, so an operator sees progress without metrics."""
        while True:
            await asyncio.sleep(self.status_interval_s)
            b = self.buffer.stats()
            f = self.forwarder.stats if self.forwarder else None
            log.info(
                "agent.status",
                produced=self.status.samples_produced,
                delivered=f.samples_delivered if f else 0,
                buffered_records=b.records,
                buffered_samples=b.samples,
                dropped=b.dropped_samples + self.status.samples_dropped_on_error,
                mqtt="connected" if self.publisher.connected else "disconnected",
                devices_down=[p.device.name for p in self.pollers if p.status.state == "down"],
            )


async def run_until_signal(agent: Agent) -> None:
    """Run the agent; SIGINT/SIGTERM stop it (a second signal stops at once)."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("agent.signal", signal=signal.Signals(signum).name)
            agent.stop()
        elif main is not None:
            main.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await agent.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


async def wait_for_signal() -> None:
    """Return on SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
