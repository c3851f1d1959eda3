"""The poller with a fake driver: quality on failure, reconnects, transitions logged once."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from structlog.testing import capture_logs

from agent.poller import Backoff, DevicePoller
from drivers.base import DeviceCommon, DriverUnavailable, RawReading


class FakeDriver:
    def __init__(self) -> None:
        self.up = True
        self.fail_reads = 0
        self.crash_reads = 0
        self.connects = 0
        self.closes = 0
        self.connected = False
        self.reads: list[str] = []
        self.delay_s = 0.0

    async def connect(self) -> None:
        if not self.up:
            raise DriverUnavailable("connection refused", "127.0.0.1:1")
        self.connects += 1
        self.connected = True

    async def read(self, group: str) -> list[RawReading]:
        assert self.connected, "read on a closed driver"
        self.reads.append(group)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.crash_reads:
            self.crash_reads -= 1
            raise RuntimeError("bug in driver")
        if self.fail_reads:
            self.fail_reads -= 1
            raise DriverUnavailable("timeout", "no answer")
        return [RawReading(t, 1) for t in TAGS[group]]

    async def close(self) -> None:
        self.closes += 1
        self.connected = False


TAGS = {"default": ["a", "b"], "fast": ["c"]}


def device(**kw: object) -> DeviceCommon:
    args: dict[str, object] = {
        "name": "plc",
        "interval_s": 0.02,
        "poll_groups": {"fast": {"interval_s": 0.01}},
        "backoff_min_s": 0.01,
        "backoff_max_s": 0.02,
        **kw,
    }
    return DeviceCommon.model_validate(args)


class Sink:
    def __init__(self) -> None:
        self.batches: list[list[RawReading]] = []

    async def __call__(self, readings: Sequence[RawReading]) -> None:
        self.batches.append(list(readings))

    def qualities(self) -> list[str]:
        return [r.quality for b in self.batches for r in b]


async def run_until(poller: DevicePoller, cond: object, timeout_s: float = 10.0) -> None:
    task = asyncio.create_task(poller.run())
    try:
        async with asyncio.timeout(timeout_s):
            while not cond():  # type: ignore[operator]
                await asyncio.sleep(0.005)
    finally:
        task.cancel()
        await asyncio.wait({task})


async def test_groups_polled_and_good_samples() -> None:
    drv, sink = FakeDriver(), Sink()
    poller = DevicePoller(device(), "fake", drv, TAGS, sink)
    await run_until(poller, lambda: "fast" in drv.reads and "default" in drv.reads)
    assert set(sink.qualities()) == {"good"}
    assert poller.status.state == "up"
    assert drv.closes >= 1  # closed on cancel


async def test_unreachable_device_reports_its_transition_once_and_logs_once() -> None:
    drv, sink = FakeDriver(), Sink()
    drv.up = False
    poller = DevicePoller(device(), "fake", drv, TAGS, sink)  # heartbeat: the 60 s default
    with capture_logs() as logs:
        await run_until(poller, lambda: poller.status.polls >= 30)
        assert poller.status.state == "down"
        # One all-bad set per poll group, not one per poll.
        assert len(sink.batches) == 2
        assert sorted(r.tag for b in sink.batches for r in b) == ["a", "b", "c"]
        assert all(
            r.quality == "bad" and r.reason == "connection refused" for b in sink.batches for r in b
        )
        assert all(r.value is None for b in sink.batches for r in b)
        assert poller.status.failed_polls >= 30  # still counted as failed polls
        drv.up = True
        n = len(sink.batches)
        await run_until(
            poller, lambda: len(sink.batches) > n + 5 and sink.batches[-1][0].quality == "good"
        )
    events = [e["event"] for e in logs]
    assert events.count("device.down") == 1
    assert events.count("device.recovered") == 1
    assert poller.status.state == "up"  # type: ignore[comparison-overlap]


class TimedSink(Sink):
    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    async def __call__(self, readings: Sequence[RawReading]) -> None:
        self.times.append(asyncio.get_running_loop().time())
        await super().__call__(readings)


async def test_a_down_device_reports_bad_quality_at_its_heartbeat_interval() -> None:
    drv, sink = FakeDriver(), TimedSink()
    drv.up = False
    interval = 0.05
    poller = DevicePoller(
        device(poll_groups={}, down_report_interval_s=interval),
        "fake",
        drv,
        {"default": ["a", "b"]},
        sink,
    )
    await run_until(poller, lambda: len(sink.batches) >= 4)
    gaps = [b - a for a, b in zip(sink.times, sink.times[1:], strict=False)]
    assert all(g >= interval for g in gaps), gaps
    assert poller.status.polls > len(sink.batches)  # polls between the reports sent nothing


async def test_connection_bad_samples_carry_the_driver_code() -> None:
    class CodedDriver(FakeDriver):
        async def connect(self) -> None:
            raise DriverUnavailable("BadTooManySessions", "server full", code=0x80560000)

    sink = Sink()
    poller = DevicePoller(device(), "fake", CodedDriver(), TAGS, sink)
    await run_until(poller, lambda: len(sink.batches) >= 2)
    assert {(r.reason, r.code) for b in sink.batches for r in b} == {
        ("BadTooManySessions", 0x80560000)
    }
    assert poller.status.code == 0x80560000


async def test_failed_read_closes_and_reconnects() -> None:
    drv, sink = FakeDriver(), Sink()
    drv.fail_reads = 1
    poller = DevicePoller(device(), "fake", drv, TAGS, sink)
    await run_until(poller, lambda: drv.connects >= 2 and sink.batches[-1][0].quality == "good")
    bad = [r for b in sink.batches for r in b if r.quality == "bad"]
    assert bad
    assert bad[0].reason == "timeout"
    assert drv.closes >= 1


async def test_driver_bug_does_not_stop_the_poller() -> None:
    drv, sink = FakeDriver(), Sink()
    drv.crash_reads = 2
    poller = DevicePoller(device(), "fake", drv, TAGS, sink)
    with capture_logs():
        await run_until(poller, lambda: drv.connects >= 2 and sink.batches[-1][0].quality == "good")
    reasons = {r.reason for b in sink.batches for r in b if r.quality == "bad"}
    assert reasons == {"driver error"}


async def test_overrun_skips_instead_of_queueing() -> None:
    drv, sink = FakeDriver(), Sink()
    drv.delay_s = 0.05  # longer than both intervals
    poller = DevicePoller(device(), "fake", drv, {"default": ["a"]}, sink)
    await run_until(poller, lambda: len(drv.reads) >= 4)
    assert poller.status.skipped_polls >= 1


def test_backoff_grows_with_jitter_and_caps() -> None:
    values = iter([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    b = Backoff(1.0, 5.0, rng=lambda: next(values))
    assert [b.next() for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    b.reset()
    assert b.next() == pytest.approx(0.5)


async def test_connects_but_never_answers_stays_down_logged_once() -> None:
    drv, sink = FakeDriver(), Sink()
    drv.fail_reads = 10**6  # accepts connections, every read fails (a black hole)
    poller = DevicePoller(device(backoff_max_s=0.05), "fake", drv, TAGS, sink)
    with capture_logs() as logs:
        await run_until(poller, lambda: drv.connects >= 5)
    events = [e["event"] for e in logs]
    assert events.count("device.down") == 1
    assert "device.recovered" not in events
    assert "device.connected" not in events
    assert poller.status.state == "down"


class FakeSubscribingDriver(FakeDriver):
    """Pushes nothing; `lose()` ends the connection like a dead OPC UA session."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = asyncio.Event()

    async def subscribe(self, group: str, sink: object) -> None:
        self.closed = asyncio.Event()

    async def wait_closed(self) -> None:
        await self.closed.wait()
        raise DriverUnavailable("BadConnectionClosed", "session lost", code=0x80AE0000)

    def lose(self) -> None:
        self.up = False
        self.closed.set()


async def test_subscribed_groups_report_down_like_polled_ones() -> None:
    drv, sink = FakeSubscribingDriver(), TimedSink()
    interval = 0.05
    poller = DevicePoller(
        device(poll_groups={}, down_report_interval_s=interval),
        "fake",
        drv,
        {"default": ["a", "b"]},
        sink,
        subscribe_groups=frozenset({"default"}),
    )
    task = asyncio.create_task(poller.run())
    try:
        async with asyncio.timeout(10):
            while poller.status.state != "up":
                await asyncio.sleep(0.005)
            assert sink.batches == []  # the subscription is the answer; nothing polled
            drv.lose()
            while len(sink.batches) < 4:
                await asyncio.sleep(0.005)
    finally:
        task.cancel()
        await asyncio.wait({task})
    first = sink.batches[0]
    assert [(r.tag, r.quality, r.reason, r.code) for r in first] == [
        ("a", "bad", "BadConnectionClosed", 0x80AE0000),
        ("b", "bad", "BadConnectionClosed", 0x80AE0000),
    ]
    gaps = [b - a for a, b in zip(sink.times, sink.times[1:], strict=False)]
    assert all(g >= interval for g in gaps), gaps


async def test_read_soon_polls_a_group_at_once_outside_its_schedule() -> None:
    driver = FakeDriver()
    sink = Sink()
    dev = device(interval_s=3600.0, poll_groups={"fast": {"interval_s": 3600.0}})
    poller = DevicePoller(dev, "fake", driver, TAGS, sink)
    task = asyncio.create_task(poller.run())
    try:
        async with asyncio.timeout(10):
            while len(driver.reads) < 2:  # the first poll of each group
                await asyncio.sleep(0.01)
            poller.read_soon(frozenset({"fast", "unknown"}))
            while len(driver.reads) < 3:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.wait({task})
    assert driver.reads[2] == "fast"
    assert [r.tag for r in sink.batches[2]] == ["c"]
