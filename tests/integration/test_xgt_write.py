"""XgtDriver.write: round trips through our simulator (XGK and XGI), bit writes and
read-modify-write, refusals, NAKs, faults; cross-checks with pyXGTClient (reads what our
driver wrote; writes that our driver reads) and PyXGT's reads. PyXGT's own writes are not
used: its non-bit writes carry a wrong data size and no BCC (see the module docstring of
tests/integration/test_xgt_crosscheck.py), so the simulator, which follows LS ELECTRIC's
FEnet manual, is the reference for the write frames."""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest

from drivers.base import DriverError, DriverUnavailable, WriteRefused
from drivers.xgt.config import XgtDevice
from drivers.xgt.driver import XgtDriver
from drivers.xgt.simulator import XgtSimulator
from tests.support.readback import values

pytestmark = pytest.mark.integration


def const(value: Any) -> dict[str, Any]:
    return {"generator": "constant", "value": value}


def f32(value: float) -> float:
    return cast(float, struct.unpack("<f", struct.pack("<f", value))[0])


# (tag, simulated start, written), valid on XGK and XGI (areas M and D/ R ... see below)
CASES: list[tuple[dict[str, Any], Any, Any]] = [
    ({"name": "i8", "address": "%MB0", "type": "int8"}, 1, -128),
    ({"name": "u8", "address": "%MB1", "type": "uint8"}, 1, 255),
    ({"name": "i16", "address": "%MW1", "type": "int16"}, 1, -32768),
    ({"name": "u16", "address": "%MW2"}, 1, 65535),
    ({"name": "i32", "address": "%MD2", "type": "int32"}, 1, -(2**31)),
    ({"name": "u32", "address": "%MD3"}, 1, 2**32 - 1),
    ({"name": "f32", "address": "%MD4", "type": "float32"}, 1.5, f32(-1234.5678)),
    ({"name": "i64", "address": "%ML3", "type": "int64"}, 1, -(2**63)),
    ({"name": "u64", "address": "%ML4"}, 1, 2**64 - 1),
    ({"name": "f64", "address": "%ML5", "type": "float64"}, 1.5, math.pi * 1e200),
    ({"name": "s", "address": "%MB48", "type": "string", "length": 6}, "ab", "REC-07"),
    ({"name": "mx", "address": "%MX448"}, False, True),  # byte 56, bit 0
    ({"name": "mx7", "address": "%MX455"}, True, False),  # byte 56, bit 7
    ({"name": "mbit3", "address": "%MW29", "type": "bit", "bit": 3}, False, True),
    ({"name": "mbit12", "address": "%MW29", "type": "bit", "bit": 12}, True, False),
]
WRITTEN = {tag["name"]: written for tag, _, written in CASES}


def make(cpu: str = "XGK", tags: list[dict[str, Any]] | None = None, **keys: Any) -> XgtDevice:
    if tags is None:
        tags = [{**tag, "simulate": const(start)} for tag, start, _ in CASES]
    return XgtDevice.model_validate(
        {
            "name": "plc",
            "protocol": "xgt",
            "host": "127.0.0.1",
            "port": 0,
            "cpu": cpu,
            "timeout_s": 0.5,
            "retries": 0,
            "tags": tags,
            **keys,
        }
    )


@pytest.fixture
async def simulated() -> AsyncIterator[Callable[..., Any]]:
    started: list[tuple[XgtSimulator, XgtDriver]] = []

    async def start(*args: Any, **keys: Any) -> tuple[XgtSimulator, XgtDriver]:
        device = make(*args, **keys)
        sim = XgtSimulator([device])
        await sim.start()
        driver = XgtDriver(device, endpoint=sim.endpoints["plc"])
        started.append((sim, driver))
        await driver.connect()
        return sim, driver

    try:
        yield start
    finally:
        for sim, driver in started:
            await driver.close()
            await sim.stop()


@pytest.mark.parametrize("cpu", ["XGK", "XGI"])
async def test_every_type_reads_back_exactly_what_was_written(simulated: Any, cpu: str) -> None:
    sim, driver = await simulated(cpu)
    before = await values(driver)
    assert all(before[n] != v for n, v in WRITTEN.items())
    for name, value in WRITTEN.items():
        await driver.write(name, value)
    after = await values(driver)
    assert after == WRITTEN
    for name, value in WRITTEN.items():
        assert type(after[name]) is type(value), name
    assert sim.write_count("plc") == len(WRITTEN)
    await asyncio.sleep(2 * sim.update_interval_s)  # the generators no longer drive them
    assert await values(driver) == WRITTEN


async def test_bits_use_the_bit_write_where_the_area_has_one_else_read_modify_write(
    simulated: Any,
) -> None:
    tags = [
        {"name": "m_bit", "address": "%MW10", "type": "bit", "bit": 9, "simulate": const(False)},
        {"name": "m_other", "address": "%MW10", "type": "bit", "bit": 0, "simulate": const(True)},
        {"name": "d_bit", "address": "%DW10", "type": "bit", "bit": 9, "simulate": const(False)},
        {"name": "d_other", "address": "%DW10", "type": "bit", "bit": 0, "simulate": const(True)},
    ]
    sim, driver = await simulated("XGK", tags)
    sent = driver.requests_sent
    await driver.write("m_bit", True)  # XGK has bit access to M: one bit write
    assert driver.requests_sent - sent == 1
    sent = driver.requests_sent
    await driver.write("d_bit", True)  # ... but not to D: read, then write the word
    assert driver.requests_sent - sent == 2
    assert await values(driver) == {
        "m_bit": True,
        "m_other": True,
        "d_bit": True,
        "d_other": True,
    }
    await driver.write("d_other", False)
    await driver.write("m_other", False)
    assert await values(driver) == {
        "m_bit": True,
        "m_other": False,
        "d_bit": True,
        "d_other": False,
    }
    assert sim.write_count("plc") == 4


@pytest.mark.parametrize(
    ("cpu", "address", "says"),
    [
        ("XGK", "%FX10", "area F is not written: F holds the CPU's system flags"),
        ("XGK", "%FW3", "area F is not written"),
        ("XGI", "%IX5", "area I is not written: I is refreshed from the input modules"),
        ("XGK", "%TX3", "%TX3 is a timer/counter contact"),
        ("XGK", "%CX7", "write its current value (%CW7) instead"),
    ],
)
async def test_areas_the_driver_does_not_write_send_nothing(
    simulated: Any, cpu: str, address: str, says: str
) -> None:
    tags = [{"name": "ro", "address": address}, {"name": "ok", "address": "%MW0"}]
    sim, driver = await simulated(cpu, tags)
    with pytest.raises(WriteRefused) as caught:
        await driver.write("ro", True if "X" in address[:3] else 1)
    assert caught.value.reason == "not writable"
    assert says in caught.value.detail
    assert sim.request_count("plc") == 0
    assert driver.device.write_refusal("ok") is None
    await driver.write("ok", 3)  # a timer's current value and M are written


@pytest.mark.parametrize(
    ("tag", "raw", "says"),
    [
        ("i8", 128, "does not fit int8"),
        ("u8", -1, "does not fit uint8"),
        ("i16", 1.5, "needs an integer"),
        ("u16", True, "needs a number"),
        ("u64", 2**64, "does not fit uint64"),
        ("f32", 1e39, "does not fit float32"),
        ("f64", math.nan, "not a finite number"),
        ("s", "TOO LONG", "longer than 6 bytes"),
        ("s", "Grüß", "not ASCII"),
        ("s", 5, "needs a string"),
        ("mx", 1, "needs true or false"),
        ("mbit3", "1", "needs true or false"),
    ],
)
async def test_values_the_type_cannot_hold_send_nothing(
    simulated: Any, tag: str, raw: Any, says: str
) -> None:
    sim, driver = await simulated()
    with pytest.raises(WriteRefused) as caught:
        await driver.write(tag, raw)
    assert caught.value.reason == "value does not fit"
    assert says in caught.value.detail
    assert sim.request_count("plc") == 0


async def test_a_nak_is_a_driver_error_with_the_code() -> None:
    served = make(tags=[{"name": "ok", "address": "%MW0"}])
    configured = make(
        tags=[
            {"name": "ok", "address": "%MW0"},
            {"name": "typo", "address": "%MW500", "type": "float32"},
            {"name": "typo_bit", "address": "%MX9000"},
        ]
    )
    async with XgtSimulator([served]) as sim:
        driver = XgtDriver(configured, endpoint=sim.endpoints["plc"])
        await driver.connect()
        try:
            for name, raw in (("typo", 1.0), ("typo_bit", True)):
                with pytest.raises(DriverError) as caught:
                    await driver.write(name, raw)
                assert not isinstance(caught.value, DriverUnavailable)
                assert caught.value.code == 0x04
                assert caught.value.reason == "xgt error 0x0004 (address beyond the device area)"
            await driver.write("ok", 9)  # the connection is still good
        finally:
            await driver.close()
        assert sim.write_count("plc") == 1


def _garbage(answer: bytes) -> bytes:
    return b"\xde\xad\xbe\xef" * 8


def _wrong_blocks(answer: bytes) -> bytes:
    # An ACK claiming two blocks for a write of one (the BCC stays right: it covers the
    # header only).
    return answer[:-2] + b"\x02\x00"


def _read_ack(answer: bytes) -> bytes:
    # The command of a read answer (0x55) where a write answer (0x59) is due.
    return answer[:20] + b"\x55\x00" + answer[22:]


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (_garbage, "protocol error: wrong company id"),
        (_wrong_blocks, "protocol error: wrong block count 2, wrote 1"),
        (_read_ack, "protocol error: wrong command 0x0055"),
        (lambda a: a[:25], "protocol error: incomplete frame"),
        (lambda a: None, "timeout"),
    ],
    ids=["garbage", "blocks", "command", "cut", "silent"],
)
async def test_an_answer_that_does_not_confirm_the_write_is_an_unknown_outcome(
    simulated: Any, fault: Callable[[bytes], bytes | None], reason: str
) -> None:
    sim, driver = await simulated()
    sim.set_fault("plc", fault)
    with pytest.raises(DriverUnavailable) as caught:
        await driver.write("f32", 2.5)
    assert caught.value.reason.startswith(reason)
    sim.set_fault("plc", None)
    await driver.connect()
    await driver.write("f32", 3.5)
    assert (await values(driver))["f32"] == 3.5


async def test_the_connection_lost_mid_write_is_driver_unavailable(simulated: Any) -> None:
    sim, driver = await simulated()
    sim.drop_connections("plc")
    await asyncio.sleep(0)
    with pytest.raises(DriverUnavailable) as caught:
        await driver.write("u16", 7)
    assert caught.value.reason in ("connection lost", "protocol error: incomplete frame")


async def test_writes_and_polls_at_the_same_time_each_get_their_own_answer(
    simulated: Any,
) -> None:
    _, driver = await simulated()
    written = [f32(v / 4) for v in range(30)]

    async def polls() -> None:
        for _ in range(15):
            await values(driver)

    async def writes() -> None:
        for v in written:
            await driver.write("f32", v)

    await asyncio.gather(polls(), writes(), polls())
    assert (await values(driver))["f32"] == written[-1]


# ------------------------------------------------------------------ third-party peers


async def test_pyxgtclient_reads_what_our_driver_wrote() -> None:
    client_mod = pytest.importorskip("pyXGTClient.client", reason="pyXGTClient not installed")
    device = make()
    async with XgtSimulator([device]) as sim:
        driver = XgtDriver(device, endpoint=sim.endpoints["plc"])
        await driver.connect()
        try:
            for name, value in WRITTEN.items():
                await driver.write(name, value)
        finally:
            await driver.close()
        port = sim.endpoints["plc"][1]

        def read() -> dict[str, Any]:
            client = client_mod.XGTClient(host="127.0.0.1", port=port, timeout=5.0)
            assert client.open()
            try:
                # Only configured bytes are served: 0-5, 8-19, 24-47.
                spans = ((0, 6), (8, 12), (24, 24))
                return {
                    "spans": [bytes(client.readContinuousData(f"%MB{a}", n)) for a, n in spans],
                    "string": bytes(client.readContinuousData("%MB48", 6)),
                    "bits": client.readData(["%MX448", "%MX455"]),
                    "word29": client.readData(["%MW29"])[0],
                    "words": client.readData(["%MW1", "%MW2"]),
                    "dwords": client.readData(["%MD2", "%MD3"]),
                }
            finally:
                client.close()

        got = await asyncio.to_thread(read)
    first, second, third = got["spans"]
    assert struct.unpack("<bBhH", first) == (-128, 255, -32768, 65535)
    assert struct.unpack("<iIf", second) == (-(2**31), 2**32 - 1, f32(-1234.5678))
    assert struct.unpack("<qQd", third) == (-(2**63), 2**64 - 1, math.pi * 1e200)
    assert got["string"] == b"REC-07"
    assert got["bits"] == [1, 0]
    assert got["word29"] == 1 << 3  # bit 3 set, bit 12 cleared
    assert got["words"] == [0x8000, 0xFFFF]
    assert got["dwords"] == [0x80000000, 0xFFFFFFFF]


async def test_our_driver_reads_what_pyxgtclient_wrote() -> None:
    client_mod = pytest.importorskip("pyXGTClient.client", reason="pyXGTClient not installed")
    device = make()
    async with XgtSimulator([device]) as sim:
        port = sim.endpoints["plc"][1]

        def write() -> None:
            client = client_mod.XGTClient(host="127.0.0.1", port=port, timeout=5.0)
            assert client.open()
            try:
                assert client.writeData(["%MW1", "%MW2"], [0x8000, 0xFFFF])
                assert client.writeData(["%MX448", "%MX455"], [1, 0])
                assert client.writeContinuousData("%MB16", list(struct.pack("<f", 2.5)))
                assert client.writeContinuousData("%MB48", list(b"XGT-OK"))
            finally:
                client.close()

        await asyncio.to_thread(write)
        driver = XgtDriver(device, endpoint=sim.endpoints["plc"])
        await driver.connect()
        try:
            got = await values(driver)
        finally:
            await driver.close()
        assert sim.write_count("plc") == 4
    assert (got["i16"], got["u16"], got["f32"], got["s"]) == (-32768, 65535, 2.5, "XGT-OK")
    assert (got["mx"], got["mx7"]) == (True, False)


async def test_pyxgt_reads_what_our_driver_wrote() -> None:
    ls = pytest.importorskip("PyXGT.LS", reason="PyXGT is not installed")
    tags = [
        {"name": "w", "address": "%MW0", "simulate": const(1)},
        {"name": "d", "address": "%DW10", "simulate": const(2)},
        {"name": "bit", "address": "%MX97", "simulate": const(False)},
    ]
    device = make(tags=tags)
    async with XgtSimulator([device]) as sim:
        driver = XgtDriver(device, endpoint=sim.endpoints["plc"])
        await driver.connect()
        try:
            await driver.write("w", 0x1234)
            await driver.write("d", 4321)
            await driver.write("bit", True)
        finally:
            await driver.close()
        port = sim.endpoints["plc"][1]

        def read() -> dict[str, Any]:
            plc = ls.plc_ls("127.0.0.1", port)
            try:
                plc.conn_class.settimeout(5.0)
                return {
                    "words": plc.command("XGT", "read", "word", "M0,D10"),
                    "bits": plc.command("XGT", "read", "bit", "M97"),
                }
            finally:
                plc.conn_class.close()

        got = await asyncio.to_thread(read)
    assert got == {"words": [0x1234, 4321], "bits": [1]}
