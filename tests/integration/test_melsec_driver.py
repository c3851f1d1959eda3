"""The MELSEC driver against the real MELSEC simulator on loopback: exact values for every
type and device family, 3E and 4E, refused addresses isolated, routing errors, and
connection faults."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from drivers.base import DriverUnavailable, RawReading
from drivers.melsec.config import MelsecDevice
from drivers.melsec.driver import MelsecDriver
from drivers.melsec.simulator import MelsecSimulator

pytestmark = pytest.mark.integration


def const(value: object) -> dict[str, object]:
    return {"generator": "constant", "value": value}


EXACT: list[dict[str, Any]] = [
    {"name": "d_int16", "address": "D100", "simulate": const(-1234)},
    {"name": "d_uint16", "address": "D101", "type": "uint16", "simulate": const(65535)},
    {"name": "d_int32", "address": "D102", "type": "int32", "simulate": const(-123456789)},
    {"name": "d_uint32", "address": "D104", "type": "uint32", "simulate": const(4000000000)},
    {"name": "d_float32", "address": "D106", "type": "float32", "simulate": const(1.5)},
    {"name": "d_float64", "address": "D108", "type": "float64", "simulate": const(-2.25)},
    {"name": "d_int64", "address": "D112", "type": "int64", "simulate": const(-(2**40))},
    {
        "name": "d_string",
        "address": "D120",
        "type": "string",
        "length": 4,
        "simulate": const("AB12"),
    },
    {"name": "d_bit_f", "address": "D130.F", "simulate": const(True)},
    {"name": "d_bit_0", "address": "D130.0", "simulate": const(False)},
    {"name": "w", "address": "W1A0", "simulate": const(7)},
    {"name": "r", "address": "R32000", "simulate": const(8)},
    {"name": "zr", "address": "ZR1000", "type": "float32", "simulate": const(0.25)},
    {"name": "sd", "address": "SD520", "simulate": const(12)},
    {"name": "tn", "address": "TN3", "simulate": const(300)},
    {"name": "cn", "address": "CN10", "simulate": const(42)},
    {"name": "m0", "address": "M0", "simulate": const(True)},
    {"name": "m1", "address": "M1", "simulate": const(False)},
    {"name": "m15", "address": "M15", "simulate": const(True)},
    {"name": "l", "address": "L5", "simulate": const(True)},
    {"name": "b", "address": "B1F", "simulate": const(True)},
    {"name": "x", "address": "X1F", "simulate": const(True)},
    {"name": "y", "address": "Y10", "simulate": const(True)},
    {"name": "sm", "address": "SM400", "simulate": const(True)},
]
EXPECTED = {
    "d_int16": -1234, "d_uint16": 65535, "d_int32": -123456789, "d_uint32": 4000000000,
    "d_float32": 1.5, "d_float64": -2.25, "d_int64": -(2**40), "d_string": "AB12",
    "d_bit_f": True, "d_bit_0": False, "w": 7, "r": 8, "zr": 0.25, "sd": 12, "tn": 300,
    "cn": 42, "m0": True, "m1": False, "m15": True, "l": True, "b": True, "x": True,
    "y": True, "sm": True,
}  # fmt: skip


def make(tags: list[dict[str, Any]], **keys: Any) -> MelsecDevice:
    return MelsecDevice.model_validate(
        {
            "name": keys.pop("name", "plc"),
            "protocol": "melsec",
            "series": keys.pop("series", "q"),
            "host": "127.0.0.1",
            "port": 0,
            "timeout_s": 1.0,
            "retries": 0,
            "tags": tags,
            **keys,
        }
    )


@contextlib.asynccontextmanager
async def served(device: MelsecDevice, **driver_keys: Any) -> AsyncIterator[MelsecDriver]:
    async with MelsecSimulator([device]) as sim:
        host, port = sim.endpoints[device.name]
        driver = MelsecDriver(device.model_copy(update={"host": host, "port": port, **driver_keys}))
        await driver.connect()
        try:
            yield driver
        finally:
            await driver.close()


def values(readings: list[RawReading]) -> dict[str, object]:
    assert all(r.quality == "good" for r in readings), [r for r in readings if r.quality != "good"]
    return {r.tag: r.value for r in readings}


@pytest.mark.parametrize("transport", ["tcp", "udp"])
@pytest.mark.parametrize("frame", ["3e", "4e"])
@pytest.mark.parametrize("random_read", [True, False])
async def test_every_type_and_family_reads_exactly(
    transport: str, frame: str, random_read: bool
) -> None:
    device = make(EXACT, frame=frame, random_read=random_read, transport=transport)
    async with served(device) as driver:
        assert values(await driver.read("default")) == EXPECTED
        tags, columns, bad = await driver.read_columns("default")
        assert not bad
        assert dict(zip(tags, columns, strict=True)) == EXPECTED


async def test_x_and_y_are_octal_on_iq_f() -> None:
    tags = [
        {"name": "x17", "address": "X17", "simulate": const(True)},
        {"name": "x20", "address": "X20", "simulate": const(False)},
        {"name": "x16", "address": "X16", "simulate": const(False)},
    ]
    device = make(tags, series="iq-f", random_read=False)
    async with MelsecSimulator([device]) as sim:
        port = sim.endpoints["plc"][1]
        cpu = sim.cpu("plc")
        driver = MelsecDriver(device.model_copy(update={"port": port}))
        await driver.connect()
        try:
            assert values(await driver.read("default")) == {"x17": True, "x20": False, "x16": False}
        finally:
            await driver.close()
        x = cpu.bits[0x9C]
        assert (x[15], x[16], x[14]) == (1, 0, 0)  # X17 octal is the 16th input


async def test_a_500_tag_poll_makes_the_planned_requests_and_reads_exact_values() -> None:
    tags: list[dict[str, Any]] = []
    tags += [{"name": f"d{i}", "address": f"D{i}", "simulate": const(i - 150)} for i in range(300)]
    tags += [
        {
            "name": f"f{i}",
            "address": f"D{1000 + 2 * i}",
            "type": "float32",
            "simulate": const(i / 4),
        }
        for i in range(100)
    ]
    tags += [
        {"name": f"m{i}", "address": f"M{i}", "simulate": const(i % 3 == 0)} for i in range(50)
    ]
    tags += [
        {"name": f"x{i}", "address": f"X{i:X}", "simulate": const(i % 2 == 1)} for i in range(50)
    ]
    device = make(tags)
    async with served(device) as driver:
        assert len(driver.group_plan("default").requests) == 2
        got = values(await driver.read("default"))
        assert driver.requests_sent == 2
    assert got == {t["name"]: t["simulate"]["value"] for t in tags}


@pytest.mark.parametrize(("series", "requests"), [("q", 1), ("iq-f", 2)])
async def test_the_largest_bit_read_of_the_series_is_one_request(
    series: str, requests: int
) -> None:
    tags = [
        {"name": "first", "address": "M0", "simulate": const(True)},
        {"name": "last", "address": "M7167", "simulate": const(True)},
        {"name": "off", "address": "M7166", "simulate": const(False)},
    ]
    device = make(tags, series=series, random_read=False, max_gap=7167)
    async with served(device) as driver:
        assert len(driver.group_plan("default").requests) == requests
        assert values(await driver.read("default")) == {"first": True, "last": True, "off": False}


async def test_a_refused_address_is_isolated_to_its_tag() -> None:
    # An FX5U has D0-D7999: D8000 is refused with 0xC056, D7990 and D7999 still report.
    tags = [
        {"name": "a", "address": "D7990", "simulate": const(1)},
        {"name": "b", "address": "D7999", "simulate": const(2)},
        {"name": "c", "address": "D8000", "simulate": const(3)},
    ]
    for random_read in (False, True):
        device = make(tags, series="iq-f", random_read=random_read)
        async with served(device) as driver:
            assert len(driver.group_plan("default").requests) == 1
            first = await driver.read("default")
            again_before = driver.requests_sent
            second = await driver.read("default")
            for readings in (first, second):
                assert readings[:2] == [RawReading("a", 1), RawReading("b", 2)]
                assert readings[2] == RawReading(
                    "c",
                    None,
                    "bad",
                    "end code 0xC056 (the read runs past the device's largest address)",
                    0xC056,
                )
            # Later polls read only the good part, in as few requests as it allows.
            assert [r.describe() for r in driver.active_requests("default")] == [
                "D7990..D7999 (10 words, 2 tags)"
            ]
            assert driver.requests_sent - again_before == 1


async def test_the_whole_request_is_tried_again_after_isolation_retry_s() -> None:
    tags = [
        {"name": "a", "address": "D7999", "simulate": const(1)},
        {"name": "c", "address": "D8000", "simulate": const(3)},
    ]
    device = make(tags, series="iq-f", random_read=False)
    async with served(device, isolation_retry_s=1e-9) as driver:
        await driver.read("default")
        before = driver.requests_sent
        await driver.read("default")  # the retry is due: whole block again, then isolation
        assert driver.requests_sent - before > 1


async def test_a_route_nobody_serves_is_an_end_code_on_every_tag() -> None:
    device = make([{"name": "a", "address": "D0"}, {"name": "m", "address": "M0"}])
    async with served(device, network=1, station=2) as driver:
        readings = await driver.read("default")
    reason = "end code 0x4A01 (the network number is not in the routing parameters)"
    assert readings == [
        RawReading("a", None, "bad", reason, 0x4A01),
        RawReading("m", None, "bad", reason, 0x4A01),
    ]


async def test_two_cpus_behind_one_port_are_told_apart_by_their_route() -> None:
    own = make([{"name": "a", "address": "D0", "simulate": const(1)}], name="own", port=0)
    remote = make(
        [{"name": "a", "address": "D0", "simulate": const(2)}],
        name="remote",
        network=1,
        station=2,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    own, remote = (d.model_copy(update={"port": port}) for d in (own, remote))
    async with MelsecSimulator([own, remote]) as sim:
        assert sim.endpoints["own"] == sim.endpoints["remote"]
        port = sim.endpoints["own"][1]
        for dev, expected in ((own, 1), (remote, 2)):
            driver = MelsecDriver(dev.model_copy(update={"port": port}))
            await driver.connect()
            try:
                assert await driver.read("default") == [RawReading("a", expected)]
            finally:
                await driver.close()


async def test_nothing_listening_is_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    driver = MelsecDriver(make([{"name": "a", "address": "D0"}], port=port))
    with pytest.raises(DriverUnavailable) as info:
        await driver.connect()
    assert info.value.reason == "connection refused"


async def test_a_connection_closed_mid_request_is_connection_lost() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(9)
        (length,) = struct.unpack("<H", await reader.readexactly(2))
        await reader.readexactly(length)
        writer.write(b"\xd0\x00\x00")  # a piece of an answer, then the CPU goes away
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        driver = MelsecDriver(make([{"name": "a", "address": "D0"}], port=port))
        await driver.connect()
        with pytest.raises(DriverUnavailable) as info:
            await driver.read("default")
        assert info.value.reason == "connection lost"
        with pytest.raises(DriverUnavailable) as info:
            await driver.read("default")
        assert info.value.reason == "connection lost"
        await driver.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_a_silent_cpu_is_a_timeout_and_the_driver_reconnects_after() -> None:
    device = make([{"name": "a", "address": "D0", "simulate": const(5)}], timeout_s=0.2)
    silent = asyncio.Event()

    async with MelsecSimulator([device]) as sim:
        port = sim.endpoints["plc"][1]

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", port)
            try:
                while True:
                    data = await reader.read(4096)
                    if not data:
                        return
                    if silent.is_set():
                        continue
                    up_w.write(data)
                    writer.write(await up_r.read(4096))
            finally:
                up_w.close()
                writer.close()

        proxy = await asyncio.start_server(handle, "127.0.0.1", 0)
        try:
            driver = MelsecDriver(
                device.model_copy(update={"port": proxy.sockets[0].getsockname()[1]})
            )
            await driver.connect()
            assert await driver.read("default") == [RawReading("a", 5)]
            silent.set()
            with pytest.raises(DriverUnavailable) as info:
                await driver.read("default")
            assert info.value.reason == "timeout"
            silent.clear()
            await driver.close()
            await driver.connect()
            assert await driver.read("default") == [RawReading("a", 5)]
            await driver.close()
        finally:
            proxy.close()
            await proxy.wait_closed()


async def test_random_reads_of_bits_near_the_end_of_a_range_stay_inside_it() -> None:
    # An FX5U has X0-X1777 (1,024 inputs): 16 points from X1770 would run past X1777.
    tags = [
        {"name": "x1770", "address": "X1770", "simulate": const(True)},
        {"name": "x1777", "address": "X1777", "simulate": const(True)},
        {"name": "d", "address": "D0", "simulate": const(3)},
    ]
    device = make(tags, series="iq-f")
    async with served(device) as driver:
        (request,) = driver.group_plan("default").requests
        assert request.mode == "random"
        assert values(await driver.read("default")) == {"x1770": True, "x1777": True, "d": 3}
        assert driver.requests_sent == 1


async def test_an_isolated_request_recovers_when_the_cpu_accepts_it_again() -> None:
    tags = [
        {"name": "a", "address": "D7999", "simulate": const(1)},
        {"name": "c", "address": "D8000", "simulate": const(3)},
    ]
    device = make(tags, series="iq-f", random_read=False)
    async with MelsecSimulator([device]) as sim:
        port = sim.endpoints["plc"][1]
        driver = MelsecDriver(device.model_copy(update={"port": port}), isolation_retry_s=1e-9)
        await driver.connect()
        try:
            with capture_logs() as logs:
                first = await driver.read("default")
                assert first[1].quality == "bad"
                # A parameter change gives the CPU more data registers.
                sim.cpu("plc").words[0xA8].extend(bytes(2 * 192))
                sim.cpu("plc").refreshed = -math.inf
                assert await driver.read("default") == [RawReading("a", 1), RawReading("c", 3)]
            events = [e["event"] for e in logs if e["event"].startswith("melsec.block")]
            assert events == ["melsec.block.isolated", "melsec.block.recovered"]
            assert [r.describe() for r in driver.active_requests("default")] == [
                "D7999..D8000 (2 words, 2 tags)"
            ]
        finally:
            await driver.close()


async def test_udp_to_a_port_nobody_serves_is_connection_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    device = make([{"name": "a", "address": "D0"}], port=port, transport="udp", timeout_s=0.5)
    driver = MelsecDriver(device)
    await driver.connect()  # UDP has no handshake: the first request tells
    with pytest.raises(DriverUnavailable) as info:
        await driver.read("default")
    assert info.value.reason == "connection refused"
    await driver.close()
