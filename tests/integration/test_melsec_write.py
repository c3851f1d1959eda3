"""MelsecDriver.write: round trips through our simulator (3E/4E, TCP/UDP), refusals,
end codes, faults; cross-checks with aslmp's testing server and client, and with
pymcprotocol's client writing into our simulator."""

from __future__ import annotations

import asyncio
import contextlib
import math
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest

from drivers.base import DriverError, DriverUnavailable, WriteRefused
from drivers.melsec.config import MelsecDevice
from drivers.melsec.driver import MelsecDriver
from drivers.melsec.simulator import MelsecSimulator
from tests.support.readback import values

pytestmark = pytest.mark.integration


def const(value: object) -> dict[str, object]:
    return {"generator": "constant", "value": value}


def f32(value: float) -> float:
    return cast(float, struct.unpack("<f", struct.pack("<f", value))[0])


# (tag, simulated start, written)
CASES: list[tuple[dict[str, Any], Any, Any]] = [
    ({"name": "d_int16", "address": "D100"}, 1, -32768),
    ({"name": "d_uint16", "address": "D101", "type": "uint16"}, 1, 65535),
    ({"name": "d_int32", "address": "D102", "type": "int32"}, 1, -(2**31)),
    ({"name": "d_uint32", "address": "D104", "type": "uint32"}, 1, 2**32 - 1),
    ({"name": "d_float32", "address": "D106", "type": "float32"}, 1.5, f32(-1234.5678)),
    ({"name": "d_float64", "address": "D108", "type": "float64"}, 1.5, math.pi * 1e200),
    ({"name": "d_int64", "address": "D112", "type": "int64"}, 1, -(2**63)),
    ({"name": "d_uint64", "address": "D116", "type": "uint64"}, 1, 2**64 - 1),
    ({"name": "d_string", "address": "D120", "type": "string", "length": 3}, "ab", "REC-07"),
    ({"name": "d_bit_f", "address": "D130.F"}, True, False),
    ({"name": "d_bit_1", "address": "D130.1"}, False, True),
    ({"name": "w", "address": "W1A0"}, 1, 321),
    ({"name": "r", "address": "R2000"}, 1, -2),
    ({"name": "tn", "address": "TN3"}, 1, 300),
    ({"name": "cn", "address": "CN10"}, 1, 42),
    ({"name": "m0", "address": "M0"}, True, False),
    ({"name": "m1", "address": "M1"}, False, True),
    ({"name": "m15", "address": "M15"}, True, False),
    ({"name": "l", "address": "L5"}, False, True),
    ({"name": "b", "address": "B1F"}, False, True),
    ({"name": "y", "address": "Y10"}, False, True),
    ({"name": "f", "address": "F3"}, False, True),
]
WRITTEN = {tag["name"]: written for tag, _, written in CASES}


def make(
    series: str = "iq-r", tags: list[dict[str, Any]] | None = None, **keys: Any
) -> MelsecDevice:
    if tags is None:
        tags = [{**tag, "simulate": const(start)} for tag, start, _ in CASES]
    return MelsecDevice.model_validate(
        {
            "name": "plc",
            "protocol": "melsec",
            "series": series,
            "host": "127.0.0.1",
            "port": 0,
            "timeout_s": 0.5,
            "retries": 0,
            "tags": tags,
            **keys,
        }
    )


@pytest.fixture
async def simulated() -> AsyncIterator[Callable[..., Any]]:
    started: list[tuple[MelsecSimulator, MelsecDriver]] = []

    async def start(**keys: Any) -> tuple[MelsecSimulator, MelsecDriver]:
        device = make(**keys)
        sim = MelsecSimulator([device])
        await sim.start()
        host, port = sim.endpoints["plc"]
        driver = MelsecDriver(device.model_copy(update={"host": host, "port": port}))
        started.append((sim, driver))
        await driver.connect()
        return sim, driver

    try:
        yield start
    finally:
        for sim, driver in started:
            await driver.close()
            await sim.stop()


@pytest.mark.parametrize(
    ("frame", "transport"), [("3e", "tcp"), ("4e", "tcp"), ("3e", "udp"), ("4e", "udp")]
)
async def test_every_type_and_family_reads_back_exactly_what_was_written(
    simulated: Any, frame: str, transport: str
) -> None:
    sim, driver = await simulated(frame=frame, transport=transport)
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


async def test_a_word_bit_write_keeps_the_other_bits_and_reads_first(simulated: Any) -> None:
    sim, driver = await simulated()
    cpu = sim.cpu("plc")
    d130 = 0xA8  # device code of D
    cpu.words[d130][260:262] = (0x8001).to_bytes(2, "little")  # D130 = bit F and bit 0
    cpu.held.add((d130, 130))  # keep the generators off D130 for this test
    sent = driver.requests_sent
    await driver.write("d_bit_1", True)
    assert driver.requests_sent - sent == 2  # batch read of D130, then batch write
    assert int.from_bytes(cpu.words[d130][260:262], "little") == 0x8003
    await driver.write("d_bit_f", False)
    assert int.from_bytes(cpu.words[d130][260:262], "little") == 0x0003


@pytest.mark.parametrize("name", ["x", "sm", "sd", "sb", "sw", "ts", "cs"])
async def test_the_families_the_driver_does_not_write_send_nothing(name: str) -> None:
    address = {"x": "X1F", "sm": "SM400", "sd": "SD520", "sb": "SB10", "sw": "SW10",
               "ts": "TS3", "cs": "CS3"}[name]  # fmt: skip
    device = make(tags=[{"name": name, "address": address}, {"name": "d", "address": "D0"}])
    async with MelsecSimulator([device]) as sim:
        host, port = sim.endpoints["plc"]
        driver = MelsecDriver(device.model_copy(update={"host": host, "port": port}))
        await driver.connect()
        try:
            with pytest.raises(WriteRefused) as caught:
                await driver.write(name, True if name in ("x", "sm", "sb", "ts", "cs") else 1)
        finally:
            await driver.close()
        assert sim.request_count("plc") == 0
    assert caught.value.reason == "not writable"
    assert caught.value.detail.startswith(f"{name}: {address.rstrip('0123456789F')}")
    assert device.write_refusal("d") is None


@pytest.mark.parametrize(
    ("tag", "raw", "says"),
    [
        ("d_int16", 32768, "does not fit int16"),
        ("d_uint16", -1, "does not fit uint16"),
        ("d_int32", 1.5, "needs an integer"),
        ("d_uint64", 2**64, "does not fit uint64"),
        ("d_float32", 1e39, "does not fit float32"),
        ("d_float64", math.nan, "not a finite number"),
        ("d_int16", True, "needs a number"),
        ("d_string", "TOO LONG", "longer than 6 characters"),
        ("d_string", "Grüß", "not ASCII"),
        ("m0", 1, "needs true or false"),
        ("d_bit_1", 0, "needs true or false"),
        ("nope", 1, ""),
    ],
)
async def test_values_the_type_cannot_hold_send_nothing(
    simulated: Any, tag: str, raw: Any, says: str
) -> None:
    sim, driver = await simulated()
    with pytest.raises(WriteRefused) as caught:
        await driver.write(tag, raw)
    assert caught.value.reason == ("unknown tag" if tag == "nope" else "value does not fit")
    assert says in caught.value.detail
    assert sim.request_count("plc") == 0


async def test_a_write_the_cpu_refuses_is_a_driver_error_with_the_end_code() -> None:
    # An FX5U has D0-D7999: D7999 as int32 runs past the end.
    tags = [{"name": "ok", "address": "D7990", "type": "int32"},
            {"name": "past", "address": "D7999", "type": "int32"},
            {"name": "past_bit", "address": "M40000"}]  # fmt: skip
    device = make("iq-f", tags)
    async with MelsecSimulator([device]) as sim:
        host, port = sim.endpoints["plc"]
        driver = MelsecDriver(device.model_copy(update={"host": host, "port": port}))
        await driver.connect()
        try:
            for name, raw in (("past", 1), ("past_bit", True)):
                with pytest.raises(DriverError) as caught:
                    await driver.write(name, raw)
                assert not isinstance(caught.value, DriverUnavailable)
                assert caught.value.code == 0xC056
                assert caught.value.reason == (
                    "end code 0xC056 (the read runs past the device's largest address)"
                )
            await driver.write("ok", 7)  # the connection is still good
            readings = {r.tag: r for r in await driver.read("default")}
            assert (readings["ok"].quality, readings["ok"].value) == ("good", 7)
        finally:
            await driver.close()


# ------------------------------------------------------------------ faults


class ScriptedCpu:
    """A TCP peer that answers each request with `answer(request)` (None: silence,
    b"": close the connection)."""

    def __init__(self, answer: Callable[[bytes], bytes | None]) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> ScriptedCpu:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(Exception):
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readexactly(9)
                length = int.from_bytes(head[7:9], "little")
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                reply = self.answer(request)
                if reply is None:
                    continue
                if reply == b"":
                    break
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


WRONG_LENGTH = "protocol error: wrong data length"
C05B = "end code 0xC05B (the CPU cannot read this device)"


def ok_answer(request: bytes, data: bytes = b"", code: int = 0) -> bytes:
    body = struct.pack("<H", code) + data
    return b"\xd0\x00" + request[2:7] + struct.pack("<H", len(body)) + body


@pytest.mark.parametrize(
    ("answer", "exc", "reason"),
    [
        (lambda r: b"\xde\xad garbage", DriverUnavailable, "protocol error: wrong subheader"),
        (lambda r: ok_answer(r, b"\x01\x00"), DriverUnavailable, WRONG_LENGTH),
        (lambda r: ok_answer(r) + b"\x00", DriverUnavailable, "protocol error: unexpected data"),
        (lambda r: None, DriverUnavailable, "timeout"),
        (lambda r: b"", DriverUnavailable, "connection lost"),
        (lambda r: ok_answer(r)[:7], DriverUnavailable, "protocol error: incomplete frame"),
        (lambda r: ok_answer(r, r[2:7] + r[11:15], 0xC05B), DriverError, C05B),
    ],
    ids=["garbage", "data", "trailing", "silent", "closed", "cut", "end-code"],
)  # fmt: skip
async def test_a_write_answer_that_does_not_confirm_it(
    answer: Callable[[bytes], bytes | None], exc: type[Exception], reason: str
) -> None:
    async with ScriptedCpu(answer) as cpu:
        device = make(tags=[{"name": "sp", "address": "D10", "type": "float32"}], port=cpu.port)
        driver = MelsecDriver(device)
        await driver.connect()
        try:
            with pytest.raises(exc) as caught:
                await driver.write("sp", 2.5)
        finally:
            await driver.close()
    assert cast(DriverError, caught.value).reason == reason
    (request,) = cpu.requests
    # 3E batch write 1401/0000 of D10, 2 words: 2.5 as float32, low word first
    assert request[11:15] == b"\x01\x14\x00\x00"
    assert request[15:21] == bytes((10, 0, 0, 0xA8, 2, 0))
    assert request[21:] == struct.pack("<f", 2.5)


async def test_writes_and_polls_at_the_same_time_each_get_their_own_answer(
    simulated: Any,
) -> None:
    _, driver = await simulated(frame="4e")
    written = [f32(v / 4) for v in range(30)]

    async def polls() -> None:
        for _ in range(15):
            await values(driver)

    async def writes() -> None:
        for v in written:
            await driver.write("d_float32", v)

    await asyncio.gather(polls(), writes(), polls())
    assert (await values(driver))["d_float32"] == written[-1]


# ------------------------------------------------------------------ third-party peers


async def test_aslmp_reads_what_our_driver_wrote_into_aslmps_fx5u_server() -> None:
    aslmp = pytest.importorskip("aslmp", reason="aslmp not installed (dev extra)")
    from aslmp.client import Handshake
    from aslmp.testing import FX5U_32MT_DS, PlcSimulator

    tags = [tag for tag, _, _ in CASES if tag["name"] not in ("w", "r")]
    tags += [{"name": "w", "address": "W1A0"}, {"name": "r", "address": "R2000"}]
    for frame in ("3e", "4e"):
        async with PlcSimulator(target=FX5U_32MT_DS) as server:
            host, port = server.address("tcp" + ("-4e" if frame == "4e" else ""))
            device = make("iq-f", tags, host=host, port=port, frame=frame)
            server.memory.set_u16("D", 130, 0x8001)  # bits F and 0 of D130
            driver = MelsecDriver(device)
            await driver.connect()
            try:
                for name, value in WRITTEN.items():
                    await driver.write(name, value)
            finally:
                await driver.close()
            mem = server.memory
            async with aslmp.Plc(
                *server.address("tcp"), profile="melsec:iq-f/fx5u", handshake=Handshake.NONE
            ) as plc:
                assert await plc.read_i16("D100") == -32768
                assert await plc.read_u16("D101") == 65535
                assert await plc.read_i32("D102") == -(2**31)
                assert await plc.read_u32("D104") == 2**32 - 1
                assert await plc.read_f32("D106") == f32(-1234.5678)
                assert await plc.read_f64("D108") == math.pi * 1e200
                assert await plc.read_str("D120", length=6) == "REC-07"
                assert await plc.read_u16("W1A0") == 321
                assert await plc.read_i16("R2000") == -2
                assert await plc.read_u16("TN3") == 300
                assert await plc.read_u16("CN10") == 42
                assert await plc.read_bits("M0", 16) == (False, True) + (False,) * 13 + (False,)
                for address in ("L5", "B1F", "Y10", "F3"):
                    assert await plc.read_bit(address) is True, address
            # 64-bit values: aslmp has no 64-bit reader; its memory holds the words.
            assert mem.read_words("D", 112, 4) == (0, 0, 0, 0x8000)
            assert mem.read_words("D", 116, 4) == (0xFFFF,) * 4
            # D130: bit F cleared, bit 1 set, bit 0 kept (read-modify-write)
            assert mem.get_u16("D", 130) == 0x0003


async def test_our_simulator_serves_what_pymcprotocol_wrote() -> None:
    pymc = pytest.importorskip("pymcprotocol", reason="pymcprotocol not installed (dev extra)")
    device = make("q")
    async with MelsecSimulator([device]) as sim:
        host, port = sim.endpoints["plc"]

        def write() -> None:
            client = pymc.Type3E(plctype="Q")
            client.connect(host, port)
            try:
                client.batchwrite_wordunits("D100", [-32768, -1])  # D101 = 65535 as uint16
                client.batchwrite_wordunits("W1A0", [321])
                client.batchwrite_bitunits("M0", [0, 1])
                client.batchwrite_bitunits("Y10", [1])
            finally:
                client.close()

        await asyncio.to_thread(write)
        driver = MelsecDriver(device.model_copy(update={"host": host, "port": port}))
        await driver.connect()
        try:
            got = await values(driver)
        finally:
            await driver.close()
    assert (got["d_int16"], got["d_uint16"], got["w"]) == (-32768, 65535, 321)
    assert (got["m0"], got["m1"], got["y"]) == (False, True, True)
    assert sim.write_count("plc") == 4


async def test_after_an_unknown_outcome_the_connection_is_dropped() -> None:
    """A 3E answer carries no serial number: a late answer to the write must never be
    taken for the answer to the next read, so the driver drops the connection."""

    def answer(request: bytes) -> bytes | None:
        if request[11:13] == b"\x01\x14":  # batch write: no answer in time
            return None
        return ok_answer(request, b"\x07\x00")  # batch read of one word: 7

    async with ScriptedCpu(answer) as cpu:
        device = make(tags=[{"name": "d", "address": "D10"}], port=cpu.port)
        driver = MelsecDriver(device)
        await driver.connect()
        try:
            assert (await values(driver))["d"] == 7
            with pytest.raises(DriverUnavailable, match="timeout"):
                await driver.write("d", 5)
            with pytest.raises(DriverUnavailable):
                await driver.read("default")
            await driver.connect()  # what the poller does next
            assert (await values(driver))["d"] == 7
        finally:
            await driver.close()
