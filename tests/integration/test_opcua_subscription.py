"""OPC UA subscriptions against the real asyncua simulator: the staleness watchdog, the
bounded outbox, and no notification lost across a close or a reconnect."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from asyncua.ua.status_codes import StatusCodes

from agent.poller import DevicePoller
from drivers.base import DriverUnavailable, RawReading
from drivers.opcua.config import OpcUaDevice
from drivers.opcua.driver import OpcUaDriver
from drivers.opcua.simulator import OpcUaSimulator

pytestmark = pytest.mark.integration

FAST_COUNTER = {"generator": "counter", "value": 0, "step": 1.0, "period_s": 0.02}


def device(tmp_path: Path, **extra: Any) -> OpcUaDevice:
    data: dict[str, Any] = {
        "name": "oven",
        "protocol": "opcua",
        "endpoint": "opc.tcp://127.0.0.1:0/sim",
        "cert_dir": str(tmp_path / "client"),
        "watchdog_interval_s": 0.5,
        "timeout_s": 1.0,
        "interval_s": 0.05,
        "mode": "subscribe",
        "backoff_min_s": 0.1,
        "backoff_max_s": 0.5,
        "tags": [{"name": "count", "node_id": "ns=2;s=Count", "simulate": FAST_COUNTER}],
    }
    data.update(extra)
    return OpcUaDevice.model_validate(data)


def at(dev: OpcUaDevice, endpoint: str) -> OpcUaDevice:
    return OpcUaDevice.model_validate({**dev.model_dump(), "endpoint": endpoint})


class Collector:
    """A sink remembering every reading; `gate` cleared makes it block (a slow writer)."""

    def __init__(self) -> None:
        self.readings: list[RawReading] = []
        self.changed = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, batch: Sequence[RawReading]) -> None:
        await self.gate.wait()
        self.readings.extend(batch)
        self.changed.set()

    async def wait_for(self, pred: Any, start: int = 0) -> RawReading:
        while True:
            for r in self.readings[start:]:
                if pred(r):
                    return r
            self.changed.clear()
            await self.changed.wait()


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[OpcUaSimulator]:
    async with OpcUaSimulator([device(tmp_path)], cert_dir=tmp_path / "sim") as s:
        yield s


async def test_a_subscription_the_server_dropped_is_reported_stale(
    tmp_path: Path, sim: OpcUaSimulator
) -> None:
    drv = OpcUaDriver(at(device(tmp_path), sim.endpoints["oven"]))
    try:
        await drv.connect()
        sink = Collector()
        await drv.subscribe("default", sink)
        await sink.wait_for(lambda r: r.quality == "good")
        assert 0 < drv.stale_after_s < 10
        assert await sim.drop_subscriptions("oven") == 1
        # asyncua reports nothing (its publish loop just ends); our watchdog does.
        async with asyncio.timeout(drv.stale_after_s + 5):
            with pytest.raises(DriverUnavailable) as err:
                await drv.wait_closed()
        assert err.value.reason == "subscription stale"
        assert err.value.code == StatusCodes.BadTimeout
        assert drv.stats.stale == 1
        with pytest.raises(DriverUnavailable):
            await drv.read("default")
        # The same driver, reconnected: one session, one subscription, values again.
        await drv.connect()
        sink2 = Collector()
        await drv.subscribe("default", sink2)
        await sink2.wait_for(lambda r: r.quality == "good")
        assert sim.session_count("oven") == 1
        assert sim.subscription_count("oven") == 1
    finally:
        await drv.close()


async def test_an_idle_subscription_is_kept_alive_not_stale(tmp_path: Path) -> None:
    constant = {"generator": "constant", "value": 1.0}
    dev = device(tmp_path, tags=[{"name": "t", "node_id": "ns=2;s=T", "simulate": constant}])
    async with OpcUaSimulator([dev], cert_dir=tmp_path / "sim") as s:
        drv = OpcUaDriver(at(dev, s.endpoints["oven"]))
        try:
            await drv.connect()
            sink = Collector()
            await drv.subscribe("default", sink)
            await sink.wait_for(lambda r: r.quality == "good")
            # Nothing changes: only keep-alives arrive, for 1.5 times the stale deadline.
            waiter = asyncio.ensure_future(drv.wait_closed())
            done, _ = await asyncio.wait([waiter], timeout=1.5 * drv.stale_after_s)
            assert not done, "an idle but healthy subscription was declared stale"
            waiter.cancel()
            await asyncio.wait([waiter])
            assert drv.stats.stale == 0
            assert len(sink.readings) == 1
        finally:
            await drv.close()


async def test_poller_reconnects_a_stale_subscription_exactly_once(
    tmp_path: Path, sim: OpcUaSimulator
) -> None:
    """The poller owns reconnection: after the server lost the subscription, exactly one
    new session and one new subscription exist and values flow again."""
    dev = at(device(tmp_path), sim.endpoints["oven"])
    drv = OpcUaDriver(dev)
    sink = Collector()

    async def poller_sink(readings: Sequence[RawReading]) -> None:
        await sink(readings)

    poller = DevicePoller(
        dev,
        "opcua",
        drv,
        {"default": ["count"]},
        poller_sink,
        subscribe_groups=dev.subscribe_groups(),
    )
    task = asyncio.create_task(poller.run())
    try:
        async with asyncio.timeout(30):
            await sink.wait_for(lambda r: r.quality == "good")
            await sim.drop_subscriptions("oven")
            bad = await sink.wait_for(lambda r: r.quality == "bad")
            assert bad.reason == "subscription stale"
            mark = len(sink.readings)
            await sink.wait_for(lambda r: r.quality == "good", start=mark)
        assert poller.status.connects == 2
        await asyncio.sleep(drv.stale_after_s)  # nothing else reconnects behind us
        assert poller.status.connects == 2
        assert sim.session_count("oven") == 1
        assert sim.subscription_count("oven") == 1
    finally:
        task.cancel()
        await asyncio.wait([task])


async def test_outbox_is_bounded_and_close_hands_over_every_notification(
    tmp_path: Path, sim: OpcUaSimulator
) -> None:
    drv = OpcUaDriver(at(device(tmp_path), sim.endpoints["oven"]), outbox_batches=2)
    sink = Collector()
    try:
        await drv.connect()
        await drv.subscribe("default", sink)
        await sink.wait_for(lambda r: r.quality == "good")
        sink.gate.clear()  # the writer stalls
        async with asyncio.timeout(20):
            while drv.stats.full_waits == 0:
                await asyncio.sleep(0.05)
        assert drv.outbox_size <= 2  # bounded: the Publish callback waits instead
        # Waiting for our own sink is backpressure, not a stale subscription.
        await asyncio.sleep(drv.stale_after_s + 0.5)
        assert drv.stats.stale == 0
        closing = asyncio.create_task(drv.close())
        await asyncio.sleep(0.2)
        assert not closing.done()  # close waits for the sink to take what was received
        sink.gate.set()
        async with asyncio.timeout(15):
            await closing
    finally:
        sink.gate.set()
        await drv.close()
    assert drv.stats.received > 0
    assert drv.stats.dropped == 0
    assert drv.stats.delivered == drv.stats.received == len(sink.readings)
    values = [float(r.value) for r in sink.readings if isinstance(r.value, int | float)]
    assert len(values) == len(sink.readings)
    assert values == sorted(values)  # in order, none twice
    assert len(set(values)) == len(values)


async def test_notifications_survive_a_reconnect_in_order(
    tmp_path: Path, sim: OpcUaSimulator
) -> None:
    """Across close and connect: every reading the driver received reaches the sink,
    in order (the counter only goes up), before the readings of the next session."""
    drv = OpcUaDriver(at(device(tmp_path), sim.endpoints["oven"]), outbox_batches=1)
    sink = Collector()
    try:
        for _ in range(3):
            await drv.connect()
            await drv.subscribe("default", sink)
            mark = len(sink.readings)
            await sink.wait_for(lambda r: r.quality == "good", start=mark)
            sink.gate.clear()
            await asyncio.sleep(0.3)  # notifications pile up behind the slow sink
            closing = asyncio.create_task(drv.close())
            await asyncio.sleep(0.1)
            sink.gate.set()
            await closing
    finally:
        sink.gate.set()
        await drv.close()
    assert drv.stats.dropped == 0
    assert drv.stats.delivered == drv.stats.received == len(sink.readings)
    values = [float(r.value) for r in sink.readings if isinstance(r.value, int | float)]
    assert len(values) == len(sink.readings)
    assert values == sorted(values)


async def test_a_sink_that_raises_loses_only_its_batch_counted(
    tmp_path: Path, sim: OpcUaSimulator
) -> None:
    drv = OpcUaDriver(at(device(tmp_path), sim.endpoints["oven"]))
    sink = Collector()
    calls = 0

    async def flaky(batch: Sequence[RawReading]) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("writer bug")
        await sink(batch)

    try:
        await drv.connect()
        await drv.subscribe("default", flaky)
        async with asyncio.timeout(20):
            while calls < 4:
                await asyncio.sleep(0.05)
        assert drv.stats.dropped >= 1
        await drv.close()
        assert drv.stats.delivered + drv.stats.dropped == drv.stats.received
        assert drv.stats.delivered == len(sink.readings)
    finally:
        await drv.close()
