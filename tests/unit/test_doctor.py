"""`agent.doctor.check_device` at its boundary with the driver, with drivers that misbehave
(fault injection): a hang, an exception no driver should raise, readings with timestamps
from a clock that is ahead or from before 2024. Each ends as findings, never a traceback."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.config import load_config
from agent.doctor import Finding, check_device
from drivers.base import DeviceCommon, DriverConfigError, RawReading


class FakeDriver:
    def __init__(
        self,
        *,
        readings: list[RawReading] | None = None,
        connect_error: BaseException | None = None,
        hang: bool = False,
    ) -> None:
        self.readings = readings or []
        self.connect_error = connect_error
        self.hang = hang
        self.closed = False
        self.groups: list[str] = []

    async def connect(self) -> None:
        if self.connect_error is not None:
            raise self.connect_error

    async def read(self, group: str) -> list[RawReading]:
        self.groups.append(group)
        if self.hang:
            await asyncio.Event().wait()
        return self.readings

    async def close(self) -> None:
        self.closed = True


@pytest.fixture
def device(tmp_path: Path) -> DeviceCommon:
    path = tmp_path / "c.yaml"
    path.write_text(
        "agent: {id: gw}\ndevices:\n"
        "  - name: press-1\n    protocol: modbus\n    host: 127.0.0.1\n    port: 502\n"
        "    poll_groups: {slow: {interval_s: 10}}\n"
        "    tags:\n"
        "      - {name: a, address: 0, type: uint16, group: slow}\n"
        "      - {name: b, address: 1, type: uint16}\n",
        encoding="utf-8",
    )
    return load_config(path).devices[0]


def _use(monkeypatch: pytest.MonkeyPatch, driver: FakeDriver) -> None:
    monkeypatch.setattr("agent.runtime.make_driver", lambda _device, _context=None: driver)


async def test_reads_the_first_group_that_has_tags_and_closes(
    monkeypatch: pytest.MonkeyPatch, device: DeviceCommon
) -> None:
    driver = FakeDriver(readings=[RawReading("a", 1)])
    _use(monkeypatch, driver)
    assert await check_device(device, 5) == [
        Finding("ok", "device press-1", "127.0.0.1:502 answered; 1 tags of group slow read")
    ]
    assert driver.groups == ["slow"]
    assert driver.closed


async def test_a_hanging_read_is_one_fail_line_and_the_driver_is_closed(
    monkeypatch: pytest.MonkeyPatch, device: DeviceCommon
) -> None:
    driver = FakeDriver(hang=True)
    _use(monkeypatch, driver)
    (finding,) = await check_device(device, 0.05)
    assert finding.level == "FAIL"
    assert finding.text == "no answer within 0.05 s (127.0.0.1:502)"
    assert driver.closed


async def test_an_unexpected_exception_is_one_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, device: DeviceCommon
) -> None:
    driver = FakeDriver(connect_error=KeyError("boom"))
    _use(monkeypatch, driver)
    (finding,) = await check_device(device, 5)
    assert finding.line() == (
        "FAIL  device press-1: unexpected KeyError: 'boom' (127.0.0.1:502) — report this with "
        "the config (a driver should map every error)"
    )
    assert driver.closed


async def test_a_driver_error_keeps_its_reason_and_detail(
    monkeypatch: pytest.MonkeyPatch, device: DeviceCommon
) -> None:
    error = DriverConfigError("security policy not offered", "opc.tcp://x offers None/None")
    _use(monkeypatch, FakeDriver(connect_error=error))
    (finding,) = await check_device(device, 5)
    assert finding.text == "security policy not offered (opc.tcp://x offers None/None)"
    assert finding.fix == "set security_policy/security_mode to one the server offers"


async def test_many_bad_tags_are_summarised_on_one_line(
    monkeypatch: pytest.MonkeyPatch, device: DeviceCommon
) -> None:
    bad = [RawReading(f"t{i}", None, "bad", "timeout") for i in range(7)]
    _use(monkeypatch, FakeDriver(readings=[RawReading("ok", 1), *bad]))
    (finding,) = await check_device(device, 5)
    assert finding.text == (
        "7 of 8 tags of group slow read bad: t0 (timeout), t1 (timeout), t2 (timeout), "
        "t3 (timeout), t4 (timeout) and 2 more"
    )


async def test_device_timestamps_ahead_of_our_clock_fail(
    monkeypatch: pytest.MonkeyPatch, device: DeviceCommon
) -> None:
    ahead = datetime.now(UTC) + timedelta(minutes=5)
    _use(monkeypatch, FakeDriver(readings=[RawReading("a", 1, ts_source=ahead)]))
    ok, clock = await check_device(device, 5)
    assert ok.level == "ok"
    assert clock.level == "FAIL"
    assert clock.subject == "clock press-1"
    prefix, suffix = "the device's timestamps are ", " s ahead of this machine's clock"
    assert clock.text.startswith(prefix)
    assert clock.text.endswith(suffix)
    assert 200 < float(clock.text[len(prefix) : -len(suffix)]) <= 300


async def test_device_timestamps_before_2024_warn(
    monkeypatch: pytest.MonkeyPatch, device: DeviceCommon
) -> None:
    old = datetime(1601, 1, 1, tzinfo=UTC)  # what a DateTime of 0 decodes to
    _use(monkeypatch, FakeDriver(readings=[RawReading("a", 1, ts_source=old)]))
    _ok, clock = await check_device(device, 5)
    assert clock.level == "warn"
    assert clock.text == "the device sends timestamps before 2024 (1601-01-01T00:00:00+00:00)"


async def test_recent_device_timestamps_are_fine(
    monkeypatch: pytest.MonkeyPatch, device: DeviceCommon
) -> None:
    now = datetime.now(UTC) - timedelta(seconds=30)  # an unchanged value: an old source ts
    _use(monkeypatch, FakeDriver(readings=[RawReading("a", 1, ts_source=now)]))
    assert [f.level for f in await check_device(device, 5)] == ["ok"]
