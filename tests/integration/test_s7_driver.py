"""S7Driver against S7Simulator, and both against python-snap7 (a peer nobody here wrote):
python-snap7's server as the PLC for our driver, python-snap7's client against our
simulator. All on loopback, ports from the OS."""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from drivers.base import RawReading
from drivers.s7.config import S7Device
from drivers.s7.driver import S7Driver
from drivers.s7.plan import plan_device
from drivers.s7.simulator import S7Simulator

snap7 = pytest.importorskip(
    "snap7", reason="python-snap7 is not installed (pip install -e '.[dev]'): no cross-check"
)
from snap7 import util as s7util  # noqa: E402
from snap7.type import Area as Snap7Area  # noqa: E402
from snap7.type import SrvArea, WordLen  # noqa: E402

pytestmark = pytest.mark.integration

REAL = struct.unpack(">f", struct.pack(">f", 123.456))[0]
# (name, address, type, extra, value): constants each type holds exactly.
TYPED: list[tuple[str, str, str, dict[str, Any], Any]] = [
    ("b0", "DB1.DBX0.0", "bool", {}, True),
    ("b1", "DB1.DBX0.1", "bool", {}, False),
    ("b7", "DB1.DBX0.7", "bool", {}, True),
    ("by", "DB1.DBB1", "byte", {}, 200),
    ("i", "DB1.DBW2", "int", {}, -1234),
    ("w", "DB1.DBW4", "word", {}, 54321),
    ("di", "DB1.DBD6", "dint", {}, -123456789),
    ("dw", "DB1.DBD10", "dword", {}, 3_000_000_000),
    ("r", "DB1.DBD14", "real", {}, REAL),
    ("lr", "DB1.DBB18", "lreal", {}, -9876.54321),
    ("s", "DB1.DBB26", "string", {"length": 10}, "PRESS-7"),
    ("dt", "DB1.DBB38", "date_and_time", {}, "2026-12-01T08:15:30.123"),
    ("m", "MW10", "int", {}, 777),
    ("mb", "M12.3", "bool", {}, True),
    ("ib", "IB0", "byte", {}, 17),
    ("ix", "I1.6", "bool", {}, True),
    ("qd", "QD4", "real", {}, -1.5),
    ("qx", "Q0.0", "bool", {}, True),
    ("d2", "DB2.DBD0", "dint", {}, 42),
]
EXPECTED = {name: value for name, _, _, _, value in TYPED}


def typed_device(port: int = 0, **extra: Any) -> S7Device:
    tags = [
        {
            "name": name,
            "address": addr,
            "type": typ,
            **more,
            "simulate": {"generator": "constant", "value": value},
        }
        for name, addr, typ, more, value in TYPED
    ]
    return S7Device.model_validate(
        {"name": "plc", "protocol": "s7", "host": "127.0.0.1", "port": port, "tags": tags, **extra}
    )


@pytest.fixture
async def sim() -> AsyncIterator[tuple[S7Simulator, S7Device]]:
    device = typed_device()
    async with S7Simulator([device]) as simulator:
        host, port = simulator.endpoints["plc"]
        yield simulator, device.model_copy(update={"port": port, "host": host})


def by_tag(readings: list[RawReading]) -> dict[str, RawReading]:
    return {r.tag: r for r in readings}


async def test_driver_reads_every_type_exactly_from_the_simulator(
    sim: tuple[S7Simulator, S7Device],
) -> None:
    simulator, device = sim
    driver = S7Driver(device)
    await driver.connect()
    try:
        before = simulator.request_count("plc")
        readings = by_tag(await driver.read("default"))
        assert simulator.request_count("plc") - before == len(
            driver.plan.groups["default"].requests
        )
    finally:
        await driver.close()
    assert {n: r.quality for n, r in readings.items()} == {n: "good" for n in EXPECTED}
    assert {n: r.value for n, r in readings.items()} == EXPECTED
    assert len(driver.plan.groups["default"].requests) == 1


def snap7_reads_simulator(host: str, port: int) -> dict[str, Any]:
    """python-snap7's client and its own decoders, against our simulator (a thread)."""
    client = snap7.Client()
    client.connect(host, 0, 1, port)
    try:
        db1 = client.db_read(1, 0, 46)
        mk = client.read_area(Snap7Area.MK, 0, 10, 3)
        pe = client.read_area(Snap7Area.PE, 0, 0, 2)
        pa = client.read_area(Snap7Area.PA, 0, 0, 8)
        db2 = client.db_read(2, 0, 4)
        # A real multi-variable read, answered in one PDU.
        _, multi = client.read_multi_vars(
            [
                {"area": Snap7Area.DB, "db_number": 1, "start": 2, "size": 2},
                {"area": Snap7Area.MK, "db_number": 0, "start": 10, "size": 2},
            ]
        )
    finally:
        client.disconnect()
    return {
        "b0": s7util.get_bool(db1, 0, 0),
        "b1": s7util.get_bool(db1, 0, 1),
        "b7": s7util.get_bool(db1, 0, 7),
        "by": s7util.get_byte(db1, 1),
        "i": s7util.get_int(db1, 2),
        "w": s7util.get_word(db1, 4),
        "di": s7util.get_dint(db1, 6),
        "dw": s7util.get_dword(db1, 10),
        "r": s7util.get_real(db1, 14),
        "lr": s7util.get_lreal(db1, 18),
        "s": s7util.get_string(db1, 26),
        "dt": s7util.get_date_time_object(db1, 38).isoformat(timespec="milliseconds"),
        "m": s7util.get_int(mk, 0),
        "mb": s7util.get_bool(mk, 2, 3),
        "ib": s7util.get_byte(pe, 0),
        "ix": s7util.get_bool(pe, 1, 6),
        "qd": s7util.get_real(pa, 4),
        "qx": s7util.get_bool(pa, 0, 0),
        "d2": s7util.get_dint(db2, 0),
        "multi": [s7util.get_int(multi[0], 0), s7util.get_int(multi[1], 0)],
    }


async def test_snap7_client_reads_the_simulator_exactly(
    sim: tuple[S7Simulator, S7Device],
) -> None:
    _, device = sim
    got = await asyncio.to_thread(snap7_reads_simulator, device.host, device.port)
    assert got.pop("multi") == [EXPECTED["i"], EXPECTED["m"]]
    assert got == EXPECTED


def snap7_bit_read(host: str, port: int) -> list[bytes]:
    """BIT transport-size reads (python-snap7 addresses them by bit number)."""
    client = snap7.Client()
    client.connect(host, 0, 1, port)
    try:
        return [
            bytes(client.read_area(Snap7Area.DB, 1, bit, 1, word_len=WordLen.Bit))
            for bit in (0, 1, 7)
        ]
    finally:
        client.disconnect()


async def test_snap7_single_bit_reads_get_the_bit_alone(
    sim: tuple[S7Simulator, S7Device],
) -> None:
    # A CPU answers a BIT read with that bit only (python-snap7's server returns the byte).
    _, device = sim
    bits = await asyncio.to_thread(snap7_bit_read, device.host, device.port)
    assert bits == [b"\x01", b"\x00", b"\x01"]  # b0, b1, b7 of DB1.DBB0 (0x81)


def snap7_connect(host: str, port: int, rack: int, slot: int) -> str:
    client = snap7.Client()
    try:
        client.connect(host, rack, slot, port)
    except Exception as exc:  # what python-snap7 raises is its business
        return type(exc).__name__
    client.disconnect()
    return "connected"


async def test_simulator_refuses_a_client_with_another_rack_and_slot(
    sim: tuple[S7Simulator, S7Device],
) -> None:
    _, device = sim
    assert await asyncio.to_thread(snap7_connect, device.host, device.port, 0, 1) == "connected"
    assert await asyncio.to_thread(snap7_connect, device.host, device.port, 0, 2) != "connected"


# ---------------------------------------------------------------- python-snap7's server


@pytest.fixture
def snap7_server() -> Iterator[tuple[Any, int, dict[str, bytearray]]]:
    """python-snap7's server with DB1 (46 bytes), DB2 (4 bytes), M, I and Q areas filled
    with python-snap7's own encoders."""
    db1 = bytearray(46)
    s7util.set_bool(db1, 0, 0, True)
    s7util.set_bool(db1, 0, 7, True)
    s7util.set_byte(db1, 1, 200)
    s7util.set_int(db1, 2, -1234)
    s7util.set_word(db1, 4, 54321)
    s7util.set_dint(db1, 6, -123456789)
    s7util.set_dword(db1, 10, 3_000_000_000)
    s7util.set_real(db1, 14, 123.456)
    s7util.set_lreal(db1, 18, -9876.54321)
    s7util.set_string(db1, 26, "PRESS-7", 10)
    db1[38:46] = bytes.fromhex("2612010815301233")  # 2026-12-01 08:15:30.123, Tuesday
    mk = bytearray(16)
    s7util.set_int(mk, 10, 777)
    s7util.set_bool(mk, 12, 3, True)
    pe = bytearray(4)
    s7util.set_byte(pe, 0, 17)
    s7util.set_bool(pe, 1, 6, True)
    pa = bytearray(8)
    s7util.set_real(pa, 4, -1.5)
    s7util.set_bool(pa, 0, 0, True)
    db2 = bytearray(4)
    s7util.set_dint(db2, 0, 42)
    areas = {"db1": db1, "mk": mk, "pe": pe, "pa": pa, "db2": db2}
    server = snap7.Server(log=False)
    server.register_area(SrvArea.DB, 1, db1)
    server.register_area(SrvArea.DB, 2, db2)
    server.register_area(SrvArea.MK, 0, mk)
    server.register_area(SrvArea.PE, 0, pe)
    server.register_area(SrvArea.PA, 0, pa)
    server.start_to("127.0.0.1", 0)
    port = int(server.server_socket.getsockname()[1])
    try:
        yield server, port, areas
    finally:
        server.stop()


async def test_driver_reads_snap7_server_exactly(
    snap7_server: tuple[Any, int, dict[str, bytearray]],
) -> None:
    _, port, _ = snap7_server
    device = typed_device(port=port)
    driver = S7Driver(device)
    await driver.connect()
    try:
        readings = by_tag(await driver.read("default"))
    finally:
        await driver.close()
    assert driver.pdu_size == 480  # python-snap7's server grants at most 480
    assert {n: (r.quality, r.reason) for n, r in readings.items()} == {
        n: ("good", None) for n in EXPECTED
    }
    assert {n: r.value for n, r in readings.items()} == EXPECTED


async def test_snap7_server_refusals_stay_with_their_tags(
    snap7_server: tuple[Any, int, dict[str, bytearray]],
) -> None:
    _, port, _ = snap7_server
    tags = [
        {"name": "ok", "address": "DB1.DBW2", "type": "int"},
        {"name": "ok2", "address": "DB1.DBW4", "type": "word"},
        {"name": "past_end", "address": "DB1.DBW46", "type": "int"},  # DB1 has 46 bytes
        {"name": "no_db", "address": "DB9.DBW0", "type": "int"},
        {"name": "m", "address": "MW10", "type": "int"},
    ]
    device = S7Device.model_validate(
        {
            "name": "plc",
            "protocol": "s7",
            "host": "127.0.0.1",
            "port": port,
            "tags": tags,
            "max_gap": 64,
        }
    )
    driver = S7Driver(device)
    await driver.connect()
    try:
        first = by_tag(await driver.read("default"))
        second = by_tag(await driver.read("default"))
    finally:
        await driver.close()
    for readings in (first, second):
        assert (readings["ok"].value, readings["ok2"].value, readings["m"].value) == (
            -1234,
            54321,
            777,
        )
        assert readings["past_end"].quality == "bad"
        assert readings["past_end"].code == 0x05
        assert "address out of range" in (readings["past_end"].reason or "")
        assert "Optimized block access" in (readings["past_end"].reason or "")
        assert readings["no_db"].code == 0x0A
        assert "object does not exist" in (readings["no_db"].reason or "")
    # After isolation the good part of DB1 is one variable again, the refused tag unread.
    active = driver.active_requests("default")
    where = [v.where() for r in active for v in r.variables]
    assert "DB1.DBB2..5" in where
    assert not any("46" in w for w in where)


async def test_isolated_variable_is_read_whole_again_after_the_retry(
    snap7_server: tuple[Any, int, dict[str, bytearray]],
) -> None:
    server, port, _ = snap7_server
    tags = [
        {"name": "ok", "address": "DB1.DBW44", "type": "int"},
        {"name": "later", "address": "DB1.DBW46", "type": "int"},
    ]
    device = S7Device.model_validate(
        {
            "name": "plc",
            "protocol": "s7",
            "host": "127.0.0.1",
            "port": port,
            "tags": tags,
            "isolation_retry_s": 0.2,
        }
    )
    driver = S7Driver(device)
    await driver.connect()
    try:
        assert by_tag(await driver.read("default"))["later"].code == 0x05
        bigger = bytearray(48)
        s7util.set_int(bigger, 46, 99)
        server.register_area(SrvArea.DB, 1, bigger)  # "download" a longer DB1
        await asyncio.sleep(0.25)
        readings = by_tag(await driver.read("default"))
    finally:
        await driver.close()
    assert (readings["later"].quality, readings["later"].value) == ("good", 99)
    assert len(driver.active_requests("default")[0].variables) == 1


async def test_plan_counts_match_requests_for_500_tags() -> None:
    tags: list[dict[str, Any]] = []
    for i in range(200):
        tags.append({"name": f"r{i}", "address": f"DB1.DBD{4 * i}", "type": "real"})
    for i in range(100):
        tags.append({"name": f"w{i}", "address": f"DB2.DBW{2 * i}", "type": "int"})
    for i in range(100):
        tags.append({"name": f"x{i}", "address": f"M{i // 8}.{i % 8}"})
    for i in range(50):
        tags.append({"name": f"i{i}", "address": f"I{i // 8}.{i % 8}"})
    for i in range(50):
        tags.append({"name": f"q{i}", "address": f"QW{2 * i}", "type": "word"})
    for tag in tags:
        tag["simulate"] = {
            "generator": "constant",
            "value": 1 if tag.get("type") != "real" else 2.5,
        }
    device = S7Device.model_validate(
        {
            "name": "big",
            "protocol": "s7",
            "host": "127.0.0.1",
            "port": 0,
            "interval_s": 0.1,
            "tags": tags,
        }
    )
    planned = len(plan_device(device).groups["default"].requests)
    assert planned == 3  # 800 + 200 + 13 + 7 + 100 bytes at PDU 480
    async with S7Simulator([device]) as simulator:
        host, port = simulator.endpoints["big"]
        driver = S7Driver(device, endpoint=(host, port))
        await driver.connect()
        try:
            before = simulator.request_count("big")
            readings = await driver.read("default")
            assert simulator.request_count("big") - before == planned
        finally:
            await driver.close()
    assert all(r.quality == "good" for r in readings)
    assert sum(1 for r in readings if r.value == 2.5) == 200
    assert all(r.value is True for r in readings if r.tag.startswith(("x", "i")))
    assert not any(isinstance(r.value, float) and math.isnan(r.value) for r in readings)


def snap7_refusals(host: str, port: int) -> dict[str, str]:
    """What python-snap7's client makes of the simulator's refusals (a thread)."""
    client = snap7.Client()
    client.connect(host, 0, 1, port)
    out: dict[str, str] = {}
    try:
        calls: list[tuple[str, Callable[[], object]]] = [
            ("unknown_db", lambda: client.db_read(9, 0, 2)),
            ("past_end", lambda: client.db_read(1, 44, 4)),
            ("write_past_end", lambda: client.db_write(1, 44, bytearray(4))),
            ("write_unknown_db", lambda: client.db_write(9, 0, bytearray(2))),
        ]
        for name, call in calls:
            try:
                call()
                out[name] = "accepted"
            except Exception as exc:  # python-snap7's exception types are its own
                out[name] = str(exc)
    finally:
        client.disconnect()
    return out


async def test_snap7_client_sees_the_simulators_refusals(
    sim: tuple[S7Simulator, S7Device],
) -> None:
    _, device = sim
    got = await asyncio.to_thread(snap7_refusals, device.host, device.port)
    assert "0x0a" in got["unknown_db"].lower()
    assert "0x05" in got["past_end"].lower()
    # Writes are accepted (tests/integration/test_s7_write.py) where the memory exists.
    assert "0x05" in got["write_past_end"].lower()
    assert "0x0a" in got["write_unknown_db"].lower()


async def test_500_tags_exact_against_snap7_server() -> None:
    db1, db2, mk, pe, pa = (
        bytearray(800),
        bytearray(200),
        bytearray(13),
        bytearray(7),
        bytearray(100),
    )
    tags: list[dict[str, Any]] = []
    expected: dict[str, Any] = {}
    for i in range(200):
        value = struct.unpack(">f", struct.pack(">f", i * 1.25 - 40))[0]
        s7util.set_real(db1, 4 * i, value)
        tags.append({"name": f"r{i}", "address": f"DB1.DBD{4 * i}", "type": "real"})
        expected[f"r{i}"] = value
    for i in range(100):
        s7util.set_int(db2, 2 * i, i * 300 - 15000)
        tags.append({"name": f"w{i}", "address": f"DB2.DBW{2 * i}", "type": "int"})
        expected[f"w{i}"] = i * 300 - 15000
    for i in range(100):
        s7util.set_bool(mk, i // 8, i % 8, i % 3 == 0)
        tags.append({"name": f"x{i}", "address": f"M{i // 8}.{i % 8}"})
        expected[f"x{i}"] = i % 3 == 0
    for i in range(50):
        s7util.set_bool(pe, i // 8, i % 8, i % 2 == 1)
        tags.append({"name": f"i{i}", "address": f"I{i // 8}.{i % 8}"})
        expected[f"i{i}"] = i % 2 == 1
    for i in range(50):
        s7util.set_word(pa, 2 * i, 60000 + i)
        tags.append({"name": f"q{i}", "address": f"QW{2 * i}", "type": "word"})
        expected[f"q{i}"] = 60000 + i
    server = snap7.Server(log=False)
    for area, index, data in (
        (SrvArea.DB, 1, db1), (SrvArea.DB, 2, db2), (SrvArea.MK, 0, mk),
        (SrvArea.PE, 0, pe), (SrvArea.PA, 0, pa),
    ):  # fmt: skip
        server.register_area(area, index, data)
    server.start_to("127.0.0.1", 0)
    try:
        port = int(server.server_socket.getsockname()[1])
        device = S7Device.model_validate(
            {"name": "big", "protocol": "s7", "host": "127.0.0.1", "port": port, "tags": tags}
        )
        driver = S7Driver(device)
        await driver.connect()
        try:
            readings = by_tag(await driver.read("default"))
        finally:
            await driver.close()
    finally:
        server.stop()
    assert len(driver.plan.groups["default"].requests) == 3
    assert {n: r.quality for n, r in readings.items()} == {n: "good" for n in expected}
    assert {n: r.value for n, r in readings.items()} == expected
