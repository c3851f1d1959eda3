"""S7Driver.write: round trips through our simulator, bit writes, refusals, item and header
errors, faults; cross-checks with python-snap7's server (its own decoders read what our
driver wrote; its quirks noted) and python-snap7's client writing into our simulator."""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, cast

import pytest

from drivers.base import DriverError, DriverUnavailable, WriteRefused
from drivers.s7.config import S7Device
from drivers.s7.driver import S7Driver
from drivers.s7.simulator import S7Simulator
from tests.support.readback import values

pytestmark = pytest.mark.integration


def const(value: Any) -> dict[str, Any]:
    return {"generator": "constant", "value": value}


def f32(value: float) -> float:
    return cast(float, struct.unpack(">f", struct.pack(">f", value))[0])


# (name, address, type, extra, simulated start, written)
CASES: list[tuple[str, str, str, dict[str, Any], Any, Any]] = [
    ("b0", "DB1.DBX0.0", "bool", {}, False, True),
    ("b1", "DB1.DBX0.1", "bool", {}, True, False),
    ("b7", "DB1.DBX0.7", "bool", {}, False, True),
    ("by", "DB1.DBB1", "byte", {}, 1, 255),
    ("i", "DB1.DBW2", "int", {}, 1, -32768),
    ("w", "DB1.DBW4", "word", {}, 1, 65535),
    ("di", "DB1.DBD6", "dint", {}, 1, -(2**31)),
    ("dw", "DB1.DBD10", "dword", {}, 1, 2**32 - 1),
    ("r", "DB1.DBD14", "real", {}, 1.5, f32(-1234.5678)),
    ("lr", "DB1.DBB18", "lreal", {}, 1.5, math.pi * 1e200),
    ("s", "DB1.DBB26", "string", {"length": 10}, "ab", "REZEPT-ÄÖ"),
    ("dt", "DB1.DBB38", "date_and_time", {}, None, "2027-03-04T05:06:07.890"),
    ("m", "MW10", "int", {}, 1, -2),
    ("mb", "M12.3", "bool", {}, False, True),
    ("qd", "QD4", "real", {}, 1.5, -0.25),
    ("qx", "Q0.0", "bool", {}, False, True),
]
WRITTEN = {name: written for name, *_, written in CASES}


def make(tags: list[dict[str, Any]] | None = None, **extra: Any) -> S7Device:
    if tags is None:
        tags = [
            {
                "name": name,
                "address": addr,
                "type": typ,
                **more,
                **({"simulate": const(start)} if start is not None else {}),
            }
            for name, addr, typ, more, start, _ in CASES
        ]
    return S7Device.model_validate(
        {
            "name": "plc",
            "protocol": "s7",
            "host": "127.0.0.1",
            "port": 0,
            "timeout_s": 0.5,
            "tags": tags,
            **extra,
        }
    )


@pytest.fixture
async def simulated() -> AsyncIterator[Callable[..., Any]]:
    started: list[tuple[S7Simulator, S7Driver]] = []

    async def start(
        tags: list[dict[str, Any]] | None = None, **knobs: Any
    ) -> tuple[S7Simulator, S7Driver]:
        device = make(tags)
        sim = S7Simulator([device], **knobs)
        await sim.start()
        driver = S7Driver(device, endpoint=sim.endpoints["plc"])
        started.append((sim, driver))
        await driver.connect()
        return sim, driver

    try:
        yield start
    finally:
        for sim, driver in started:
            await driver.close()
            await sim.stop()


async def test_every_type_reads_back_exactly_what_was_written(simulated: Any) -> None:
    sim, driver = await simulated()
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


async def test_a_bit_write_changes_that_bit_only(simulated: Any) -> None:
    _, driver = await simulated()
    await driver.write("b1", True)  # b0 False, b1 True, b7 False
    assert (await values(driver))["b0"] is False
    await driver.write("b7", True)
    got = await values(driver)
    assert (got["b0"], got["b1"], got["b7"]) == (False, True, True)
    await driver.write("b1", False)
    got = await values(driver)
    assert (got["b0"], got["b1"], got["b7"]) == (False, False, True)


@pytest.mark.parametrize(
    ("tag", "raw", "says"),
    [
        ("by", 256, "out of range for byte"),
        ("i", -32769, "out of range for int"),
        ("dw", -1, "out of range for dword"),
        ("di", 1.5, "needs an integer"),
        ("w", True, "needs a number"),
        ("r", 1e39, "does not fit real"),
        ("lr", math.inf, "not a finite number"),
        ("s", "ELEVEN CHAR", "longer than STRING[10]"),
        ("s", "€uro", "outside Latin-1"),
        ("s", 5, "needs a string"),
        ("dt", "yesterday", "Invalid isoformat"),
        ("dt", "1989-12-31T00:00:00", "years 1990-2089"),
        ("mb", 1, "needs true or false"),
        ("nope", 1, "no tag 'nope'"),
    ],
)
async def test_values_the_type_cannot_hold_send_nothing(
    simulated: Any, tag: str, raw: Any, says: str
) -> None:
    sim, driver = await simulated()
    jobs = sim.request_count("plc")
    with pytest.raises(WriteRefused) as caught:
        await driver.write(tag, raw)
    assert caught.value.reason == ("unknown tag" if tag == "nope" else "value does not fit")
    assert says in caught.value.detail
    assert sim.request_count("plc") == jobs


async def test_inputs_are_not_written(simulated: Any) -> None:
    tags = [{"name": "ib", "address": "IB0"}, {"name": "ix", "address": "E1.6"}]
    sim, driver = await simulated(tags)
    jobs = sim.request_count("plc")
    for name, raw in (("ib", 1), ("ix", True)):
        with pytest.raises(WriteRefused) as caught:
            await driver.write(name, raw)
        assert caught.value.reason == "not writable"
        assert "inputs (I) are not written" in caught.value.detail
    assert sim.request_count("plc") == jobs


async def test_a_write_larger_than_the_pdu_is_refused() -> None:
    device = make(
        [{"name": "s", "address": "DB1.DBB0", "type": "string", "length": 220}], pdu_size=240
    )
    async with S7Simulator([device]) as sim:
        driver = S7Driver(device, endpoint=sim.endpoints["plc"])
        await driver.connect()
        try:
            with pytest.raises(WriteRefused, match="do not fit one write at PDU size 240"):
                await driver.write("s", "x")
        finally:
            await driver.close()


async def test_item_and_header_errors_are_driver_errors_with_the_code(simulated: Any) -> None:
    tags = [
        {"name": "ok", "address": "DB1.DBW0", "type": "int"},
        {"name": "locked", "address": "DB3.DBW0", "type": "int"},
    ]
    served = make(tags)
    configured = make([*tags, {"name": "past", "address": "DB1.DBD2", "type": "dint"},
                       {"name": "no_db", "address": "DB9.DBW0", "type": "int"}])  # fmt: skip
    async with S7Simulator([served], write_protected_dbs={3}) as sim:
        driver = S7Driver(configured, endpoint=sim.endpoints["plc"])
        await driver.connect()
        try:
            expected = {
                "past": (0x05, "s7 item 0x05 (address out of range)"),
                "no_db": (0x0A, "s7 item 0x0A (object does not exist)"),
                "locked": (0x03, "s7 item 0x03 (accessing the object not allowed)"),
            }
            for name, (code, reason) in expected.items():
                with pytest.raises(DriverError) as caught:
                    await driver.write(name, 1)
                assert not isinstance(caught.value, DriverUnavailable)
                assert (caught.value.code, caught.value.reason) == (code, reason), name
            await driver.write("ok", 5)  # the connection is still good
        finally:
            await driver.close()
    _, no_put_get = await simulated(tags, put_get=False)
    with pytest.raises(DriverError) as caught:
        await no_put_get.write("ok", 1)
    assert caught.value.code == 0x8104
    assert caught.value.reason.startswith("s7 error 0x8104 (function refused by the CPU")


async def test_the_connection_lost_mid_write_is_driver_unavailable(simulated: Any) -> None:
    sim, driver = await simulated()
    sim.drop_connections("plc")
    await asyncio.sleep(0)
    with pytest.raises(DriverUnavailable) as caught:
        await driver.write("i", 7)
    assert caught.value.reason == "connection lost"


class ScriptedCpu:
    """Accepts the COTP connect and setup like a CPU, then answers every write job with
    `answer(job)` (None: silence)."""

    def __init__(self, answer: Callable[[bytes], bytes | None]) -> None:
        self.answer = answer
        self.jobs: list[bytes] = []
        self.port = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> ScriptedCpu:
        from drivers.s7 import codec

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                tpdu = await self._tpdu(reader)
                writer.write(codec.cotp_connect_confirm(tpdu))
                setup = (await self._tpdu(reader))[3:]
                ref = int.from_bytes(setup[4:6], "big")
                params = struct.pack(">BBHHH", codec.FUNC_SETUP, 0, 1, 1, 480)
                writer.write(codec.cotp_data(codec.ack_data(ref, params)))
                while True:
                    job = (await self._tpdu(reader))[3:]
                    self.jobs.append(job)
                    reply = self.answer(job)
                    if reply is not None:
                        writer.write(reply)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    @staticmethod
    async def _tpdu(reader: asyncio.StreamReader) -> bytes:
        head = await reader.readexactly(4)
        return await reader.readexactly(int.from_bytes(head[2:4], "big") - 4)

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def _ack(job: bytes, params: bytes, data: bytes) -> bytes:
    from drivers.s7 import codec

    return codec.cotp_data(codec.ack_data(int.from_bytes(job[4:6], "big"), params, data))


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (lambda j: _ack(j, b"\x04\x01", b"\xff"), "protocol error: not a write-variable answer"),
        (lambda j: _ack(j, b"\x05\x02", b"\xff\xff"), "protocol error: wrong item count"),
        (lambda j: _ack(j, b"\x05\x01", b"\xff\x00"), "protocol error: wrong write answer length"),
        (lambda j: b"\x03\x00\x00\x09\x02\xf0\x80garbage"[:9], "protocol error: not an S7 PDU"),
        (lambda j: None, "timeout"),
    ],
    ids=["function", "items", "length", "garbage", "silent"],
)
async def test_an_answer_that_does_not_confirm_the_write_is_an_unknown_outcome(
    answer: Callable[[bytes], bytes | None], reason: str
) -> None:
    async with ScriptedCpu(answer) as cpu:
        device = make([{"name": "r", "address": "DB1.DBD0", "type": "real"}], port=cpu.port)
        driver = S7Driver(device)
        await driver.connect()
        try:
            with pytest.raises(DriverUnavailable) as caught:
                await driver.write("r", 2.5)
        finally:
            await driver.close()
    assert caught.value.reason == reason
    (job,) = cpu.jobs
    # write variable, 1 item: BYTE x 4 of DB1 from byte 0; data 00 04 0020 + 2.5 big-endian
    assert job[10:24] == bytes.fromhex("0501 120a10 02 0004 0001 84 000000")
    assert job[24:] == bytes.fromhex("00 04 0020") + struct.pack(">f", 2.5)


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
            await driver.write("r", v)

    await asyncio.gather(polls(), writes(), polls())
    assert (await values(driver))["r"] == written[-1]


# ------------------------------------------------------------------ python-snap7

snap7 = pytest.importorskip("snap7", reason="python-snap7 is not installed (dev extra)")
from snap7 import util as s7util  # noqa: E402
from snap7.type import SrvArea  # noqa: E402


@pytest.fixture
def snap7_server() -> Iterator[tuple[int, dict[str, bytearray]]]:
    db1 = bytearray(46)
    s7util.set_string(db1, 26, "", 10)  # a CPU keeps the STRING's maximum length
    db1[0] = 0b0100_0010  # bits 1 and 6
    mk = bytearray(16)
    pa = bytearray(8)
    server = snap7.Server(log=False)
    server.register_area(SrvArea.DB, 1, db1)
    server.register_area(SrvArea.MK, 0, mk)
    server.register_area(SrvArea.PA, 0, pa)
    server.start_to("127.0.0.1", 0)
    port = int(server.server_socket.getsockname()[1])
    try:
        yield port, {"db1": db1, "mk": mk, "pa": pa}
    finally:
        server.stop()


async def test_snap7_decoders_read_what_our_driver_wrote_into_snap7_server(
    snap7_server: tuple[int, dict[str, bytearray]],
) -> None:
    port, areas = snap7_server
    driver = S7Driver(make(port=port))
    await driver.connect()
    try:
        for name, value in WRITTEN.items():
            if name not in ("b0", "b1", "b7", "mb", "qx"):  # bits: see the next test
                await driver.write(name, value)
    finally:
        await driver.close()
    db1, mk, pa = areas["db1"], areas["mk"], areas["pa"]
    assert s7util.get_byte(db1, 1) == 255
    assert s7util.get_int(db1, 2) == -32768
    assert s7util.get_word(db1, 4) == 65535
    assert s7util.get_dint(db1, 6) == -(2**31)
    assert s7util.get_dword(db1, 10) == 2**32 - 1
    assert s7util.get_real(db1, 14) == f32(-1234.5678)
    assert s7util.get_lreal(db1, 18) == math.pi * 1e200
    assert s7util.get_string(db1, 26) == "REZEPT-ÄÖ"
    assert db1[26] == 10  # the maximum length byte was left alone
    assert s7util.get_dt(db1, 38) == "2027-03-04T05:06:07.890000"
    assert s7util.get_int(mk, 10) == -2
    assert s7util.get_real(pa, 4) == -0.25


async def test_snap7_server_bit_writes_overwrite_the_byte(
    snap7_server: tuple[int, dict[str, bytearray]],
) -> None:
    """Our bit write is the protocol's bit access (transport size BIT). python-snap7's
    server stores it over the whole byte (docs/library-notes.md: a CPU changes only that bit,
    as our simulator does in test_a_bit_write_changes_that_bit_only)."""
    port, areas = snap7_server
    driver = S7Driver(make(port=port))
    await driver.connect()
    try:
        await driver.write("b0", True)
    finally:
        await driver.close()
    db1 = areas["db1"]
    assert s7util.get_bool(db1, 0, 0) is True  # the bit arrived ...
    assert db1[0] != 0b0100_0011  # ... but bits 1 and 6 were not kept by python-snap7


async def test_our_simulator_serves_what_snap7_client_wrote(simulated: Any) -> None:
    sim, driver = await simulated()
    host, port = sim.endpoints["plc"]

    def write() -> None:
        client = snap7.Client()
        client.connect(host, 0, 1, port)
        try:
            data = bytearray(4)
            s7util.set_real(data, 0, 2.5)
            client.db_write(1, 14, data)
            word = bytearray(2)
            s7util.set_int(word, 0, -7)
            client.mb_write(10, 2, word)
            text = bytearray(12)
            s7util.set_string(text, 0, "SNAP7", 10)
            client.db_write(1, 26, text)
        finally:
            client.disconnect()

    await asyncio.to_thread(write)
    got = await values(driver)
    assert (got["r"], got["m"], got["s"]) == (2.5, -7, "SNAP7")
    assert sim.write_count("plc") == 3


async def test_after_an_unknown_outcome_the_connection_is_dropped() -> None:
    async with ScriptedCpu(lambda job: None) as cpu:
        device = make([{"name": "r", "address": "DB1.DBD0", "type": "real"}], port=cpu.port)
        driver = S7Driver(device)
        await driver.connect()
        try:
            with pytest.raises(DriverUnavailable, match="timeout"):
                await driver.write("r", 2.5)
            with pytest.raises(DriverUnavailable, match="connection lost"):
                await driver.read("default")
        finally:
            await driver.close()
    assert len(cpu.jobs) == 1  # the read was not sent on the abandoned connection
