"""ModbusDriver against the real pymodbus server run by ModbusSimulator, on loopback."""

from __future__ import annotations

import asyncio
import re
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

from drivers.base import Driver, DriverUnavailable, RawReading
from drivers.modbus.config import ModbusDevice
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.simulator import ModbusSimulator

pytestmark = pytest.mark.integration

ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")
FLOAT32 = struct.unpack(">f", struct.pack(">f", 123.456))[0]
# Constants that a float survives exactly (the generators compute in float).
VALUES: dict[str, Any] = {
    "int16": -1234,
    "uint16": 54321,
    "int32": -123456789,
    "uint32": 3_000_000_000,
    "int64": -1_234_567_890_123,
    "uint64": 1 << 60,
    "float32": FLOAT32,
    "float64": -273.15,
}


def const(value: Any) -> dict[str, Any]:
    return {"generator": "constant", "value": value}


def make_device(name: str, tags: list[dict[str, Any]], **extra: Any) -> ModbusDevice:
    fields: dict[str, Any] = {
        "name": name,
        "protocol": "modbus",
        "host": "127.0.0.1",
        "port": 0,
        "timeout_s": 0.5,
        "retries": 0,
        "tags": tags,
    }
    fields.update(extra)
    return ModbusDevice.model_validate(fields)


def every_type_tags() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One tag of every register type x every byte order, plus bits, strings, bools."""
    tags: list[dict[str, Any]] = []
    expected: dict[str, Any] = {}
    address = 0
    for data_type, value in VALUES.items():
        for order in ORDERS:
            name = f"{data_type}_{order}"
            tags.append(
                {
                    "name": name,
                    "address": address,
                    "type": data_type,
                    "byte_order": order,
                    "simulate": const(value),
                }
            )
            expected[name] = value
            address += {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2}.get(
                data_type, 4
            )
    for order in ORDERS:
        name = f"string_{order}"
        tags.append(
            {
                "name": name,
                "address": address,
                "type": "string",
                "length": 4,
                "byte_order": order,
                "simulate": const("HELLO"),
            }
        )
        expected[name] = "HELLO"
        address += 4
    for bit, on in ((0, True), (1, False), (15, True)):
        name = f"bit{bit}"
        tags.append(
            {"name": name, "address": address, "type": "bit", "bit": bit, "simulate": const(on)}
        )
        expected[name] = on
    address += 1
    # integer with scale: the simulator inverts it, the driver returns raw values
    tags.append(
        {
            "name": "scaled",
            "address": address,
            "type": "int16",
            "scale": 0.1,
            "simulate": const(-12.3),
        }
    )
    expected["scaled"] = -123
    for table in ("coil", "discrete_input"):
        for addr, on in ((0, True), (1, False), (17, True)):
            name = f"{table}{addr}"
            tags.append(
                {
                    "name": name,
                    "address": addr,
                    "table": table,
                    "type": "bool",
                    "simulate": const(on),
                }
            )
            expected[name] = on
    tags.append(
        {
            "name": "input_f32",
            "address": 7,
            "table": "input",
            "type": "float32",
            "byte_order": "CDAB",
            "simulate": const(FLOAT32),
        }
    )
    expected["input_f32"] = FLOAT32
    return tags, expected


def by_tag(readings: list[RawReading]) -> dict[str, RawReading]:
    return {r.tag: r for r in readings}


@pytest.fixture
async def connected() -> AsyncIterator[tuple[ModbusSimulator, ModbusDriver, dict[str, Any]]]:
    tags, expected = every_type_tags()
    device = make_device("all", tags, max_gap=20)
    async with ModbusSimulator([device]) as sim:
        driver = ModbusDriver(device, endpoint=sim.endpoints["all"])
        await driver.connect()
        try:
            yield sim, driver, expected
        finally:
            await driver.close()


async def test_every_type_and_byte_order_decodes_what_the_simulator_encoded(
    connected: tuple[ModbusSimulator, ModbusDriver, dict[str, Any]],
) -> None:
    _, driver, expected = connected
    assert isinstance(driver, Driver)
    readings = await driver.read("default")
    assert [r.tag for r in readings] == list(expected)  # config order
    bad = [r for r in readings if r.quality != "good"]
    assert bad == []
    assert {r.tag: r.value for r in readings} == expected
    for r in readings:
        assert type(r.value) is type(expected[r.tag]), r.tag
        assert r.ts_source is None


async def test_unconfigured_address_is_bad_with_exception_code_and_others_stay_good() -> None:
    sim_device = make_device(
        "plc",
        [
            {"name": "ok", "address": 0, "type": "uint16", "simulate": const(42)},
            {"name": "ok_coil", "address": 3, "type": "bool", "simulate": const(True)},
        ],
    )
    # The driver's config has a typo'd extra tag the device does not serve.
    driver_device = make_device(
        "plc",
        [
            {"name": "ok", "address": 0, "type": "uint16"},
            {"name": "typo", "address": 500, "type": "float32"},
            {"name": "ok_coil", "address": 3, "type": "bool"},
            {"name": "typo_coil", "address": 4, "type": "bool", "table": "discrete_input"},
        ],
    )
    async with ModbusSimulator([sim_device]) as sim:
        driver = ModbusDriver(driver_device, endpoint=sim.endpoints["plc"])
        await driver.connect()
        try:
            readings = by_tag(await driver.read("default"))
        finally:
            await driver.close()
    assert readings["ok"] == RawReading("ok", 42)
    assert readings["ok_coil"] == RawReading("ok_coil", True)
    for name in ("typo", "typo_coil"):
        assert readings[name].quality == "bad"
        assert readings[name].value is None
        assert readings[name].code == 2
        assert readings[name].reason == "modbus exception 2 (illegal data address)"


async def test_block_touching_an_unconfigured_register_is_split_around_it() -> None:
    """A merged request spanning a refused hole is split (block isolation): both tags
    read fine on their own, so both stay good, each with its own request."""
    sim_device = make_device(
        "plc",
        [
            {"name": "a", "address": 0, "simulate": const(1)},
            {"name": "b", "address": 2, "simulate": const(2)},
        ],
    )
    gap_device = sim_device.model_copy(update={"max_gap": 1})
    async with ModbusSimulator([sim_device]) as sim:
        driver = ModbusDriver(gap_device, endpoint=sim.endpoints["plc"])
        await driver.connect()
        try:
            readings = await driver.read("default")
        finally:
            await driver.close()
    assert [(r.tag, r.quality, r.value) for r in readings] == [
        ("a", "good", 1),
        ("b", "good", 2),
    ]
    assert [(r.start, r.count) for r in driver.active_requests("default")] == [(0, 1), (2, 1)]


async def test_addressing_is_zero_based_and_classic_40001_is_address_0() -> None:
    sim_device = make_device(
        "plc", [{"name": "first", "address": "40001", "simulate": const(4242)}]
    )
    # `one`/`classic2` sit in their own group: merged with address 0 they would fail it.
    driver_device = make_device(
        "plc",
        [
            {"name": "zero", "address": 0},
            {"name": "classic", "address": "40001"},
            {"name": "one", "address": 1, "group": "probe"},
            {"name": "classic2", "address": "40002", "group": "probe"},
        ],
        poll_groups={"probe": {"interval_s": 1.0}},
    )
    async with ModbusSimulator([sim_device]) as sim:
        driver = ModbusDriver(driver_device, endpoint=sim.endpoints["plc"])
        await driver.connect()
        try:
            readings = by_tag(await driver.read("default"))
            readings.update(by_tag(await driver.read("probe")))
        finally:
            await driver.close()
    assert readings["zero"].value == 4242
    assert readings["classic"].value == 4242
    assert readings["one"].code == 2
    assert readings["classic2"].code == 2


async def test_200_consecutive_holding_registers_take_two_requests_per_read() -> None:
    device = make_device(
        "big", [{"name": f"r{i}", "address": i, "simulate": const(i)} for i in range(200)]
    )
    async with ModbusSimulator([device]) as sim:
        driver = ModbusDriver(device, endpoint=sim.endpoints["big"])
        await driver.connect()
        try:
            before = sim.request_count("big")
            first = await driver.read("default")
            after_one = sim.request_count("big")
            await driver.read("default")
            after_two = sim.request_count("big")
        finally:
            await driver.close()
    assert [r.value for r in first] == list(range(200))
    assert after_one - before == 2
    assert after_two - after_one == 2


async def test_request_pause_is_honoured_without_changing_results() -> None:
    device = make_device(
        "slow",
        [{"name": "a", "address": 0, "simulate": const(1)}, {"name": "b", "address": 9}],
        request_pause_s=0.01,
    )
    async with ModbusSimulator([device]) as sim:
        driver = ModbusDriver(device, endpoint=sim.endpoints["slow"])
        await driver.connect()
        try:
            readings = await driver.read("default")
        finally:
            await driver.close()
        assert sim.request_count("slow") == 2
    assert [r.quality for r in readings] == ["good", "good"]


async def test_stopped_simulator_raises_driver_unavailable() -> None:
    device = make_device("gone", [{"name": "a", "address": 0, "simulate": const(1)}])
    sim = ModbusSimulator([device])
    await sim.start()
    driver = ModbusDriver(device, endpoint=sim.endpoints["gone"])
    try:
        await driver.connect()
        assert (await driver.read("default"))[0].value == 1
        await sim.stop()
        with pytest.raises(DriverUnavailable) as raised:
            await driver.read("default")
        assert raised.value.reason in ("connection lost", "timeout")
        await driver.close()
        with pytest.raises(DriverUnavailable) as refused:
            await driver.connect()
        assert refused.value.reason in ("connection refused", "timeout")
    finally:
        await driver.close()
        await sim.stop()


async def test_read_before_connect_raises_driver_unavailable() -> None:
    device = make_device("idle", [{"name": "a", "address": 0}])
    driver = ModbusDriver(device)
    with pytest.raises(DriverUnavailable, match="connection lost"):
        await driver.read("default")
    with pytest.raises(ValueError, match="no poll group 'nope'"):
        await driver.read("nope")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_devices_on_one_port_with_different_unit_ids_share_a_server() -> None:
    port = free_port()
    one = make_device("u1", [{"name": "v", "address": 0, "simulate": const(11)}], port=port)
    two = make_device(
        "u2", [{"name": "v", "address": 0, "simulate": const(22)}], port=port, unit_id=2
    )
    async with ModbusSimulator([one, two]) as sim:
        assert sim.endpoints["u1"] == sim.endpoints["u2"]
        values = []
        for device in (one, two):
            driver = ModbusDriver(device, endpoint=sim.endpoints[device.name])
            await driver.connect()
            try:
                values.append((await driver.read("default"))[0].value)
            finally:
                await driver.close()
        assert values == [11, 22]
        assert (sim.request_count("u1"), sim.request_count("u2")) == (1, 1)


async def test_busy_port_falls_back_to_a_free_one() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        busy = int(blocker.getsockname()[1])
        device = make_device("b", [{"name": "v", "address": 0, "simulate": const(5)}], port=busy)
        async with ModbusSimulator([device]) as sim:
            host, port = sim.endpoints["b"]
            assert (host, port != busy) == ("127.0.0.1", True)
            driver = ModbusDriver(device, endpoint=(host, port))
            await driver.connect()
            try:
                assert (await driver.read("default"))[0].value == 5
            finally:
                await driver.close()


def test_same_endpoint_and_unit_twice_is_refused() -> None:
    one = make_device("a", [{"name": "v", "address": 0}], port=1502)
    two = make_device("b", [{"name": "v", "address": 0}], port=1502)
    with pytest.raises(ValueError, match=re.escape("both use 127.0.0.1:1502 unit 1")):
        ModbusSimulator([one, two])


async def test_groups_read_only_their_tags() -> None:
    device = make_device(
        "g",
        [
            {"name": "fast", "address": 0, "simulate": const(1)},
            {"name": "slow", "address": 50, "group": "slow", "simulate": const(2)},
        ],
        poll_groups={"slow": {"interval_s": 10.0}},
    )
    async with ModbusSimulator([device]) as sim:
        driver = ModbusDriver(device, endpoint=sim.endpoints["g"])
        await driver.connect()
        try:
            assert await driver.read("default") == [RawReading("fast", 1)]
            assert await driver.read("slow") == [RawReading("slow", 2)]
        finally:
            await driver.close()
        assert sim.request_count("g") == 2


async def test_silent_device_raises_timeout() -> None:
    """A server that accepts but never answers: the request times out."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(1024):
                pass
        finally:
            writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    device = make_device("mute", [{"name": "a", "address": 0}], timeout_s=0.2, retries=1)
    driver = ModbusDriver(device, endpoint=("127.0.0.1", port))
    try:
        await driver.connect()
        with pytest.raises(DriverUnavailable) as raised:
            await driver.read("default")
        assert raised.value.reason == "timeout"
        assert "holding 0..0" in raised.value.detail
    finally:
        await driver.close()
        server.close()
        await server.wait_closed()
