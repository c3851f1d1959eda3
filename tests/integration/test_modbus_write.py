"""ModbusDriver.write: round trips through our simulator, function codes and frames
against a scripted server, cross-checks with pymodbus' own client and server, shared
links, faults."""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import AsyncIterator
from typing import Any, Literal, cast

import pytest

from drivers.base import DriverError, DriverUnavailable, WriteRefused, WritingDriver
from drivers.links import Link, RtuOverTcpLink, SerialLink, TcpGatewayLink
from drivers.modbus.config import ModbusDevice
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.simulator import LinkSimulator, ModbusSimulator
from tests.support.bad_modbus import BadModbusServer, register_value

pytestmark = pytest.mark.integration

ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")


def f32(value: float) -> float:
    return cast(float, struct.unpack(">f", struct.pack(">f", value))[0])


# What the simulator starts with, and what is written: every value differs from the
# simulated one, so a write that does not land cannot pass.
START: dict[str, Any] = {
    "int16": 11,
    "uint16": 12,
    "int32": 13,
    "uint32": 14,
    "int64": 15,
    "uint64": 16,
    "float32": 1.5,
    "float64": 2.5,
}
WRITTEN: dict[str, Any] = {
    "int16": -32768,
    "uint16": 65535,
    "int32": -2_000_000_001,
    "uint32": 4_000_000_001,
    "int64": -(1 << 62) - 12345,
    "uint64": (1 << 64) - 2,
    "float32": f32(-1234.5678),
    "float64": math.pi * 1e200,
}
SIZE = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2}


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


def writable_tags() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every holding type x byte order, strings, bits in one register, coils; and the
    value each one is written with."""
    tags: list[dict[str, Any]] = []
    written: dict[str, Any] = {}
    address = 0
    for data_type, start in START.items():
        for order in ORDERS:
            name = f"{data_type}_{order}"
            tags.append(
                {
                    "name": name,
                    "address": address,
                    "type": data_type,
                    "byte_order": order,
                    "simulate": const(start),
                }
            )
            written[name] = WRITTEN[data_type]
            address += SIZE.get(data_type, 4)
    for order in ORDERS:
        name = f"string_{order}"
        tags.append(
            {
                "name": name,
                "address": address,
                "type": "string",
                "length": 3,
                "byte_order": order,
                "simulate": const("ab"),
            }
        )
        written[name] = "SETPT"
        address += 3
    for bit, start in ((0, True), (1, False), (15, True)):
        tags.append(
            {
                "name": f"bit{bit}",
                "address": address,
                "type": "bit",
                "bit": bit,
                "simulate": const(start),
            }
        )
        written[f"bit{bit}"] = not start
    for addr, start in ((0, True), (1, False), (17, True)):
        tags.append(
            {"name": f"coil{addr}", "address": addr, "type": "bool", "simulate": const(start)}
        )
        written[f"coil{addr}"] = not start
    return tags, written


def is_writing(driver: object) -> bool:
    return isinstance(driver, WritingDriver)


async def read_values(driver: ModbusDriver) -> dict[str, Any]:
    readings = await driver.read("default")
    assert [r for r in readings if r.quality != "good"] == []
    return {r.tag: r.value for r in readings}


@pytest.fixture
async def simulated() -> AsyncIterator[
    Any
]:  # (device kwargs) -> (simulator, driver, written values)
    started: list[tuple[ModbusSimulator, ModbusDriver]] = []

    async def make(**extra: Any) -> tuple[ModbusSimulator, ModbusDriver, dict[str, Any]]:
        tags, written = writable_tags()
        device = make_device("plc", tags, max_gap=20, **extra)
        sim = ModbusSimulator([device])
        await sim.start()
        driver = ModbusDriver(device, endpoint=sim.endpoints["plc"])
        started.append((sim, driver))
        await driver.connect()
        return sim, driver, written

    try:
        yield make
    finally:
        for sim, driver in started:
            await driver.close()
            await sim.stop()


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"write_functions": "multiple"},
        {"bit_write": "read_modify_write"},
        {"write_functions": "multiple", "bit_write": "read_modify_write"},
    ],
    ids=["single+mask", "multiple+mask", "single+rmw", "multiple+rmw"],
)
async def test_every_type_and_byte_order_reads_back_exactly_what_was_written(
    simulated: Any, options: dict[str, str]
) -> None:
    sim, driver, written = await simulated(**options)
    assert is_writing(driver)
    before = await read_values(driver)
    assert all(before[name] != value for name, value in written.items())
    for name, value in written.items():
        await driver.write(name, value)
    after = await read_values(driver)
    assert after == written
    for name, value in written.items():
        assert type(after[name]) is type(value), name
    assert after["float32_CDAB"] == f32(-1234.5678)
    assert sim.write_count("plc") == len(written)
    # Written values stay: the simulator's generators no longer drive those tags.
    await asyncio.sleep(sim.update_interval_s * 2)
    assert await read_values(driver) == written


async def test_a_bit_write_keeps_the_other_bits_of_its_register(simulated: Any) -> None:
    for options in ({}, {"bit_write": "read_modify_write"}):
        _, driver, _ = await simulated(**options)
        await driver.write("bit1", True)
        values = await read_values(driver)
        assert (values["bit0"], values["bit1"], values["bit15"]) == (True, True, True)
        await driver.write("bit15", False)
        await driver.write("bit0", False)
        values = await read_values(driver)
        assert (values["bit0"], values["bit1"], values["bit15"]) == (False, True, False)


async def test_a_write_to_an_address_the_device_does_not_serve_is_exception_2() -> None:
    served = make_device("plc", [{"name": "sp", "address": 0, "type": "uint16"}])
    configured = make_device(
        "plc",
        [
            {"name": "sp", "address": 0, "type": "uint16"},
            {"name": "typo", "address": 300, "type": "float32"},
            {"name": "typo_coil", "address": 9, "type": "bool"},
        ],
    )
    async with ModbusSimulator([served]) as sim:
        driver = ModbusDriver(configured, endpoint=sim.endpoints["plc"])
        await driver.connect()
        try:
            for name, value in (("typo", 1.0), ("typo_coil", True)):
                with pytest.raises(DriverError) as caught:
                    await driver.write(name, value)
                assert not isinstance(caught.value, DriverUnavailable)
                assert caught.value.reason == "modbus exception 2 (illegal data address)"
                assert caught.value.code == 2
            await driver.write("sp", 7)  # the connection is still good
            assert sim.write_count("plc") == 1
        finally:
            await driver.close()


async def test_writes_and_polls_at_the_same_time_each_get_their_own_answer(
    simulated: Any,
) -> None:
    _, driver, _ = await simulated()
    values = [f32(v / 8) for v in range(40)]

    async def poll() -> None:
        for _ in range(20):
            await read_values(driver)

    async def write() -> None:
        for v in values:
            await driver.write("float32_CDAB", v)

    await asyncio.gather(poll(), write(), poll())
    assert (await read_values(driver))["float32_CDAB"] == values[-1]


# ------------------------------------------------------------------ what is refused


REFUSED: list[tuple[str, Any, str]] = [
    ("ir", 5, "not writable"),
    ("di", True, "not writable"),
    ("nope", 1, "unknown tag"),
    ("u16", 65536, "value does not fit"),
    ("u16", -1, "value does not fit"),
    ("u16", 1.5, "value does not fit"),
    ("u16", True, "value does not fit"),
    ("u16", "7", "value does not fit"),
    ("i32", 1 << 31, "value does not fit"),
    ("f32", 1e39, "value does not fit"),
    ("f32", math.nan, "value does not fit"),
    ("f64", math.inf, "value does not fit"),
    ("f32", False, "value does not fit"),
    ("s", "TOO LONG", "value does not fit"),
    ("s", "Grüß", "value does not fit"),
    ("s", 12, "value does not fit"),
    ("coil", 1, "value does not fit"),
    ("b3", 0, "value does not fit"),
]


@pytest.mark.parametrize(("tag", "value", "reason"), REFUSED)
async def test_refused_writes_send_nothing(tag: str, value: Any, reason: str) -> None:
    device = make_device(
        "plc",
        [
            {"name": "ir", "address": 0, "table": "input", "type": "uint16"},
            {"name": "di", "address": 0, "table": "discrete_input", "type": "bool"},
            {"name": "u16", "address": 0, "type": "uint16"},
            {"name": "i32", "address": 1, "type": "int32"},
            {"name": "f32", "address": 3, "type": "float32"},
            {"name": "f64", "address": 5, "type": "float64"},
            {"name": "s", "address": 9, "type": "string", "length": 2},
            {"name": "coil", "address": 0, "type": "bool"},
            {"name": "b3", "address": 11, "type": "bit", "bit": 3},
        ],
    )
    with BadModbusServer() as server:
        driver = ModbusDriver(device, endpoint=("127.0.0.1", server.port))
        await driver.connect()
        try:
            with pytest.raises(WriteRefused) as caught:
                await driver.write(tag, value)
            while server.connections < 1:  # the server saw the connection: no request
                await asyncio.sleep(0.01)
        finally:
            await driver.close()
        assert server.request_count() == 0
    assert caught.value.reason == reason
    assert tag in caught.value.detail


def test_write_refusal_names_the_read_only_tables() -> None:
    device = make_device(
        "plc",
        [
            {"name": "ir", "address": "30001", "type": "uint16"},
            {"name": "di", "address": "10001", "type": "bool"},
            {"name": "hr", "address": "40001", "type": "uint16"},
            {"name": "co", "address": "00001", "type": "bool"},
            {"name": "bt", "address": "40002", "type": "bit", "bit": 2},
        ],
    )
    assert device.write_refusal("ir") == (
        "an input register is read-only in Modbus (only coils and holding registers are written)"
    )
    assert device.write_refusal("di") == (
        "a discrete input is read-only in Modbus (only coils and holding registers are written)"
    )
    assert [device.write_refusal(t) for t in ("hr", "co", "bt")] == [None, None, None]
    assert device.write_refusal("missing") == "no tag 'missing' on device 'plc'"


# ------------------------------------------------------------------ on the wire


def wire_device(**extra: Any) -> ModbusDevice:
    return make_device(
        "plc",
        [
            {"name": "coil", "address": 4, "type": "bool"},
            {"name": "u16", "address": 10, "type": "uint16"},
            {"name": "f32", "address": 20, "type": "float32", "byte_order": "CDAB"},
            {"name": "b0", "address": 30, "type": "bit", "bit": 0},
            {"name": "b9", "address": 30, "type": "bit", "bit": 9},
        ],
        **extra,
    )


F32_CDAB = struct.pack(">f", 1234.5)[2:] + struct.pack(">f", 1234.5)[:2]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            {},
            [
                bytes.fromhex("05 0004 ff00"),
                bytes.fromhex("06 000a 1234"),
                bytes.fromhex("10 0014 0002 04") + F32_CDAB,
                bytes.fromhex("16 001e fffe 0001"),  # set bit 0: AND ~1, OR 1
                bytes.fromhex("16 001e fdff 0000"),  # clear bit 9
            ],
        ),
        (
            {"write_functions": "multiple", "bit_write": "read_modify_write"},
            [
                bytes.fromhex("0f 0004 0001 01 01"),
                bytes.fromhex("10 000a 0001 02 1234"),
                bytes.fromhex("10 0014 0002 04") + F32_CDAB,
                # register 30 holds 1030 = 0x0406: bit 0 set, then bit 9 (0x0200) clear
                bytes.fromhex("10 001e 0001 02 0407"),
                bytes.fromhex("10 001e 0001 02 0406"),
            ],
        ),
    ],
    ids=["single+mask", "multiple+rmw"],
)
async def test_function_codes_and_frames(options: dict[str, str], expected: list[bytes]) -> None:
    assert register_value(30) == 0x0406
    with BadModbusServer() as server:
        driver = ModbusDriver(wire_device(**options), endpoint=("127.0.0.1", server.port))
        await driver.connect()
        try:
            await driver.write("coil", True)
            await driver.write("u16", 0x1234)
            await driver.write("f32", 1234.5)
            await driver.write("b0", True)
            await driver.write("b9", False)
        finally:
            await driver.close()
        assert server.writes == expected
        reads = [(s.function_code, s.start, s.count) for s in server.seen() if s.function_code == 3]
    rmw = options.get("bit_write") == "read_modify_write"
    assert reads == ([(3, 30, 1), (3, 30, 1)] if rmw else [])


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("wrong_echo", "protocol error: wrong echo"),
        ("wrong_function", "protocol error: wrong function code"),
        ("garbage", "protocol error: wrong protocol id"),
        ("wrong_tid", "protocol error: wrong transaction id"),
        ("extra", "protocol error: unexpected data"),
        ("silent", "timeout"),
    ],
)
async def test_an_answer_that_does_not_confirm_the_write_is_an_unknown_outcome(
    mode: Any, reason: str
) -> None:
    with BadModbusServer() as server:
        driver = ModbusDriver(wire_device(timeout_s=0.3), endpoint=("127.0.0.1", server.port))
        await driver.connect()
        try:
            server.set_mode(mode)
            with pytest.raises(DriverUnavailable) as caught:
                await driver.write("f32", 1.0)
            assert caught.value.reason == reason
            # The poller's way back: close, reconnect; the next write is confirmed.
            server.set_mode("ok")
            await driver.close()
            await driver.connect()
            await driver.write("f32", 2.0)
        finally:
            await driver.close()
        assert len(server.writes) == 2


async def test_exception_answers_to_writes_are_driver_errors_with_the_code() -> None:
    with BadModbusServer(illegal={20}) as server:
        driver = ModbusDriver(wire_device(), endpoint=("127.0.0.1", server.port))
        await driver.connect()
        try:
            with pytest.raises(DriverError) as illegal:
                await driver.write("f32", 1.0)
            server.set_mode("busy")
            with pytest.raises(DriverError) as busy:
                await driver.write("u16", 1)
        finally:
            await driver.close()
        rmw = ModbusDriver(
            wire_device(bit_write="read_modify_write"), endpoint=("127.0.0.1", server.port)
        )
        await rmw.connect()
        try:
            writes = len(server.writes)
            with pytest.raises(DriverError) as busy_rmw:  # the read of the read-modify-write
                await rmw.write("b0", True)
            assert len(server.writes) == writes  # refused read: nothing written
        finally:
            await rmw.close()
    assert (illegal.value.code, illegal.value.reason) == (
        2,
        "modbus exception 2 (illegal data address)",
    )
    assert (busy.value.code, busy.value.reason) == (6, "modbus exception 6 (server device busy)")
    assert busy_rmw.value.code == 6
    assert not isinstance(illegal.value, DriverUnavailable)


async def test_the_connection_lost_mid_write_is_driver_unavailable() -> None:
    with BadModbusServer() as server:
        driver = ModbusDriver(wire_device(timeout_s=2.0), endpoint=("127.0.0.1", server.port))
        await driver.connect()
        try:
            server.set_mode("close_after", close_after_bytes=5)
            with pytest.raises(DriverUnavailable) as caught:
                await driver.write("f32", 1.0)
            assert caught.value.reason in ("connection lost", "protocol error: incomplete frame")
            with pytest.raises(DriverUnavailable, match="connection lost"):
                await driver.write("u16", 1)  # nothing is sent on a dead connection
        finally:
            await driver.close()
        assert len(server.writes) == 1


async def test_a_write_before_connect_is_driver_unavailable() -> None:
    driver = ModbusDriver(wire_device(), endpoint=("127.0.0.1", 1))
    with pytest.raises(DriverUnavailable, match="not connected"):
        await driver.write("u16", 1)


# ------------------------------------------------------------------ third-party peers


async def test_pymodbus_client_reads_what_our_driver_wrote_into_pymodbus_server() -> None:
    """Our encoding against pymodbus' decoding (`convert_from_registers` knows the word
    order; for BADC/DCBA the bytes of each register are swapped first)."""
    from pymodbus.client import AsyncModbusTcpClient
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    regs = [SimData(0, values=[0] * 200, datatype=DataType.REGISTERS)]
    bits = [SimData(0, values=[False] * 32, datatype=DataType.BITS)]
    server = ModbusTcpServer(
        [SimDevice(1, simdata=(bits, bits, regs, regs))], address=("127.0.0.1", 0)
    )
    await server.serve_forever(background=True)
    try:
        port = cast(asyncio.Server, server.transport).sockets[0].getsockname()[1]
        tags, written = writable_tags()
        device = make_device(
            "peer", [{k: v for k, v in t.items() if k != "simulate"} for t in tags]
        )
        driver = ModbusDriver(device, endpoint=("127.0.0.1", port))
        await driver.connect()
        client = AsyncModbusTcpClient("127.0.0.1", port=port)
        await client.connect()
        try:
            for name, value in written.items():
                await driver.write(name, value)
            types = client.DATATYPE
            for tag in device.tags:
                if tag.type in ("bit", "bool"):
                    continue
                rr = await client.read_holding_registers(
                    tag.resolved_address(), count=tag.register_count()
                )
                assert not rr.isError()
                registers = list(rr.registers)
                order = tag.byte_order or "ABCD"
                if order in ("BADC", "DCBA"):
                    registers = [((r & 0xFF) << 8) | (r >> 8) for r in registers]
                if tag.type == "string":
                    got = client.convert_from_registers(registers, types.STRING)
                    assert got == written[tag.name], tag.name
                    continue
                word: Literal["big", "little"] = "little" if order in ("CDAB", "DCBA") else "big"
                got = client.convert_from_registers(
                    registers, getattr(types, tag.type.upper()), word_order=word
                )
                assert got == written[tag.name], tag.name
            coils = await client.read_coils(0, count=18)
            assert [coils.bits[a] for a in (0, 1, 17)] == [
                written["coil0"],
                written["coil1"],
                written["coil17"],
            ]
            bit_reg = next(t for t in device.tags if t.type == "bit").resolved_address()
            rr = await client.read_holding_registers(bit_reg, count=1)
            assert rr.registers[0] == sum(
                1 << b for b in (0, 1, 15) if written[f"bit{b}"]
            )  # 0b10 … with function 22 applied by pymodbus' server
        finally:
            client.close()
            await driver.close()
    finally:
        await server.shutdown()  # type: ignore[no-untyped-call]


async def test_our_simulator_serves_what_pymodbus_client_wrote() -> None:
    """The reverse: pymodbus' client encodes and writes, our simulator stores, our
    driver decodes (word orders pymodbus knows: ABCD and CDAB)."""
    from pymodbus.client import AsyncModbusTcpClient

    tags = [t for t in writable_tags()[0] if t.get("byte_order") in (None, "ABCD", "CDAB")]
    tags = [t for t in tags if t["type"] not in ("string",)]
    device = make_device("plc", tags, max_gap=20)
    async with ModbusSimulator([device]) as sim:
        host, port = sim.endpoints["plc"]
        client = AsyncModbusTcpClient(host, port=port)
        await client.connect()
        driver = ModbusDriver(device, endpoint=(host, port))
        await driver.connect()
        try:
            expected: dict[str, Any] = {}
            for tag in device.tags:
                address = tag.resolved_address()
                if tag.type == "bool":
                    rr = await client.write_coil(address, True)
                    expected[tag.name] = True
                elif tag.type == "bit":
                    continue
                else:
                    value = WRITTEN[tag.type]
                    word: Literal["big", "little"] = "little" if tag.byte_order == "CDAB" else "big"
                    registers = client.convert_to_registers(
                        value, getattr(client.DATATYPE, tag.type.upper()), word_order=word
                    )
                    rr = await client.write_registers(address, registers)
                    expected[tag.name] = value
                assert not rr.isError(), tag.name
            bits = next(t for t in device.tags if t.type == "bit")
            rr = await client.write_register(bits.resolved_address(), 0b10)
            assert not rr.isError()
            expected.update(bit0=False, bit1=True, bit15=False)
            rr = await client.write_register(1000, 1)  # not configured: refused
            assert rr.isError()
            assert rr.exception_code == 2
            assert await read_values(driver) == expected
        finally:
            client.close()
            await driver.close()


# ------------------------------------------------------------------ shared links


def link_unit(link: str, unit_id: int, **extra: Any) -> ModbusDevice:
    return ModbusDevice.model_validate(
        {
            "name": f"{link}-{unit_id}",
            "protocol": "modbus",
            "link": link,
            "unit_id": unit_id,
            "timeout_s": 0.5,
            "retries": 0,
            "max_gap": 20,
            "tags": writable_tags()[0],
            **extra,
        }
    )


@pytest.mark.parametrize("link_type", ["serial", "rtu_over_tcp", "tcp"])
@pytest.mark.parametrize(
    "options", [{}, {"write_functions": "multiple", "bit_write": "read_modify_write"}]
)
async def test_writes_on_a_shared_link_read_back_exactly(
    link_type: str, options: dict[str, str]
) -> None:
    configs: dict[str, dict[str, Any]] = {
        "serial": {"line": SerialLink(type="serial", port="/dev/ttyUSB0", baud=115200, parity="N")},
        "rtu_over_tcp": {
            "line": RtuOverTcpLink(type="rtu_over_tcp", host="127.0.0.1", port=0, baud=115200)
        },
        "tcp": {"line": TcpGatewayLink(type="tcp", host="127.0.0.1", port=0)},
    }
    links = configs[link_type]
    units = [link_unit("line", u, **options) for u in (1, 2)]
    written = writable_tags()[1]
    async with LinkSimulator(links, units) as sim:
        link = Link("line", sim.links["line"])
        drivers = [ModbusDriver(d, link=link) for d in units]
        try:
            for driver in drivers:
                await driver.connect()
            # Writes to unit 1 only, interleaved with polls of both: one line, one at a time.
            other_before = await read_values(drivers[1])

            async def writes() -> None:
                for name, value in written.items():
                    await drivers[0].write(name, value)

            async def polls() -> None:
                for _ in range(5):
                    await read_values(drivers[1])

            await asyncio.gather(writes(), polls())
            assert await read_values(drivers[0]) == written
            assert await read_values(drivers[1]) == other_before
        finally:
            for driver in drivers:
                await driver.close()
            await link.close()


async def test_a_silent_unit_on_a_link_makes_the_write_an_unknown_outcome() -> None:
    links: dict[str, Any] = {
        "line": RtuOverTcpLink(type="rtu_over_tcp", host="127.0.0.1", port=0, baud=115200)
    }
    units = [link_unit("line", 3, timeout_s=0.2)]
    async with LinkSimulator(links, units, silent_units={"line": {3}}) as sim:
        link = Link("line", sim.links["line"])
        driver = ModbusDriver(units[0], link=link)
        await driver.connect()
        try:
            with pytest.raises(DriverUnavailable) as caught:
                await driver.write("uint16_ABCD", 5)
            assert caught.value.reason == "timeout"
        finally:
            await driver.close()
            await link.close()


async def test_a_garbled_answer_on_a_serial_line_is_retried_then_an_unknown_outcome() -> None:
    links: dict[str, Any] = {
        "line": SerialLink(type="serial", port="/dev/ttyUSB0", baud=115200, parity="N")
    }
    units = [link_unit("line", 1, retries=0)]
    async with LinkSimulator(links, units, noise_every=1) as sim:
        link = Link("line", sim.links["line"])
        driver = ModbusDriver(units[0], link=link)
        await driver.connect()
        try:
            with pytest.raises(DriverUnavailable) as caught:
                await driver.write("uint16_ABCD", 5)
            assert caught.value.reason in (
                "crc error",
                "protocol error: wrong unit id",
                "protocol error: incomplete frame",
            )
            sim.noise_every = 0
            await driver.write("uint16_ABCD", 6)
            assert (await read_values(driver))["uint16_ABCD"] == 6
        finally:
            await driver.close()
            await link.close()


async def test_after_an_unknown_outcome_the_connection_is_dropped() -> None:
    with BadModbusServer() as server:
        driver = ModbusDriver(wire_device(timeout_s=0.3), endpoint=("127.0.0.1", server.port))
        await driver.connect()
        try:
            server.set_mode("silent")
            with pytest.raises(DriverUnavailable, match="timeout"):
                await driver.write("u16", 1)
            server.set_mode("ok")
            with pytest.raises(DriverUnavailable, match="connection lost"):
                await driver.read("default")
            await driver.connect()  # what the poller does next
            readings = await driver.read("default")
            assert {r.quality for r in readings} == {"good"}
        finally:
            await driver.close()
        assert server.connections == 2
