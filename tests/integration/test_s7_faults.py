"""S7Driver fault behaviour: timeouts, malformed answers, connection loss, refused
TSAPs, PLC-side settings (PUT/GET, optimised DBs), a smaller PDU. Each case ends in a
defined outcome: DriverUnavailable/DriverConfigError with a reason, or bad quality for
the tags concerned; never a good value made from a bad frame."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from drivers.base import DriverConfigError, DriverUnavailable
from drivers.s7 import codec
from drivers.s7.config import S7Device
from drivers.s7.driver import S7Driver
from drivers.s7.simulator import S7Simulator

pytestmark = pytest.mark.integration


def device(port: int, **extra: Any) -> S7Device:
    tags = extra.pop(
        "tags",
        [
            {
                "name": "a",
                "address": "DB1.DBW0",
                "type": "int",
                "simulate": {"generator": "constant", "value": 11},
            },
            {
                "name": "b",
                "address": "DB1.DBD2",
                "type": "real",
                "simulate": {"generator": "constant", "value": 2.5},
            },
        ],
    )
    return S7Device.model_validate(
        {
            "name": "plc",
            "protocol": "s7",
            "host": "127.0.0.1",
            "port": port,
            "timeout_s": 0.3,
            "tags": tags,
            **extra,
        }
    )


Answer = Callable[[bytes], bytes | None]


@contextlib.asynccontextmanager
async def scripted(answer: Answer, *, setup: bool = True) -> AsyncIterator[int]:
    """A TCP server that confirms the COTP connection and the setup (PDU 480), then
    answers each read job with `answer(job)` (None: stay silent). Yields its port."""

    async def read_tpdu(reader: asyncio.StreamReader) -> bytes:
        head = await reader.readexactly(4)
        return await reader.readexactly(int.from_bytes(head[2:4], "big") - 4)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            cr = await read_tpdu(reader)
            writer.write(codec.cotp_connect_confirm(cr))
            job = (await read_tpdu(reader))[3:]
            if not setup:
                await asyncio.sleep(10)
            ref = int.from_bytes(job[4:6], "big")
            writer.write(codec.cotp_data(codec.ack_data(ref, bytes.fromhex("f00000010001 01e0"))))
            while True:
                job = (await read_tpdu(reader))[3:]
                out = answer(job)
                if out is not None:
                    writer.write(out)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1):
                await server.wait_closed()


def good_answer(job: bytes, *, mutate: Callable[[bytearray], bytes] | None = None) -> bytes:
    """A correct answer to a read of DB1 bytes 0..5 holding int 11 and real 2.5."""
    ref = int.from_bytes(job[4:6], "big")
    count = job[11]
    data = bytearray()
    for i in range(count):
        n = struct.unpack_from(">H", job, 12 + 12 * i + 4)[0]
        data += (
            b"\xff\x04" + struct.pack(">H", 8 * n) + (struct.pack(">hf", 11, 2.5) + bytes(n))[:n]
        )
    pdu = bytearray(codec.ack_data(ref, bytes((4, count)), bytes(data)))
    if mutate is not None:
        return mutate(pdu)
    return codec.cotp_data(bytes(pdu))


async def test_scripted_good_answer_reads() -> None:
    # The scripted server itself is right: the mutations below are the only faults.
    async with scripted(good_answer) as port:
        driver = S7Driver(device(port))
        await driver.connect()
        try:
            assert [r.value for r in await driver.read("default")] == [11, 2.5]
        finally:
            await driver.close()


def _ref(pdu: bytearray) -> bytes:
    pdu[4:6] = struct.pack(">H", (int.from_bytes(pdu[4:6], "big") + 1) & 0xFFFF)
    return codec.cotp_data(bytes(pdu))


def _count(pdu: bytearray) -> bytes:
    pdu[13] = 2
    return codec.cotp_data(bytes(pdu))


def _trailing(pdu: bytearray) -> bytes:
    pdu += b"\x00\x00"
    pdu[8:10] = struct.pack(">H", int.from_bytes(pdu[8:10], "big") + 2)
    return codec.cotp_data(bytes(pdu))


def _s7_length(pdu: bytearray) -> bytes:
    pdu[8:10] = struct.pack(">H", int.from_bytes(pdu[8:10], "big") + 1)
    return codec.cotp_data(bytes(pdu))


def _item_length(pdu: bytearray) -> bytes:
    pdu[16:18] = struct.pack(">H", 8 * 4)
    return codec.cotp_data(bytes(pdu))


def _transport_size(pdu: bytearray) -> bytes:
    pdu[15] = 0x0C
    return codec.cotp_data(bytes(pdu))


def _not_tpkt(pdu: bytearray) -> bytes:
    return b"\x04" + codec.cotp_data(bytes(pdu))[1:]


def _job_type(pdu: bytearray) -> bytes:
    pdu[1] = 1
    return codec.cotp_data(bytes(pdu))


def _short_then_close(pdu: bytearray) -> bytes:
    return codec.cotp_data(bytes(pdu))[:-3]


MALFORMED: dict[str, tuple[Callable[[bytearray], bytes], str]] = {
    "wrong-PDU-reference": (_ref, "protocol error: wrong PDU reference"),
    "wrong-item-count": (_count, "protocol error: wrong item count"),
    "trailing-bytes": (_trailing, "protocol error: unexpected data"),
    "S7-length": (_s7_length, "protocol error: wrong S7 length"),
    "item-length": (_item_length, "protocol error: wrong item length"),
    "transport-size": (_transport_size, "protocol error: transport size 0x0C"),
    "not-TPKT": (_not_tpkt, "protocol error: not a TPKT frame"),
    "job-instead-of-ack": (_job_type, "protocol error: PDU type 1 where an ack was expected"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_malformed_answer_is_never_decoded(case: str) -> None:
    mutate, reason = MALFORMED[case]
    async with scripted(lambda job: good_answer(job, mutate=mutate)) as port:
        driver = S7Driver(device(port))
        await driver.connect()
        try:
            with pytest.raises(DriverUnavailable) as info:
                await driver.read("default")
        finally:
            await driver.close()
    assert info.value.reason == reason


async def test_answer_that_stops_short_is_a_timeout_not_a_value() -> None:
    async with scripted(lambda job: good_answer(job, mutate=_short_then_close)) as port:
        driver = S7Driver(device(port))
        await driver.connect()
        try:
            with pytest.raises(DriverUnavailable) as info:
                await driver.read("default")
        finally:
            await driver.close()
    assert info.value.reason == "timeout"


async def test_silent_plc_times_out_on_read_and_on_connect() -> None:
    async with scripted(lambda job: None) as port:
        driver = S7Driver(device(port))
        await driver.connect()
        try:
            with pytest.raises(DriverUnavailable) as info:
                await driver.read("default")
        finally:
            await driver.close()
        assert info.value.reason == "timeout"
    async with scripted(lambda job: None, setup=False) as port:
        driver = S7Driver(device(port))
        with pytest.raises(DriverUnavailable) as info:
            await driver.connect()
        assert info.value.reason == "timeout"
        await driver.close()


async def test_closed_port_is_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    driver = S7Driver(device(port))
    with pytest.raises(DriverUnavailable) as info:
        await driver.connect()
    assert info.value.reason == "connection refused"


@contextlib.asynccontextmanager
async def simulated(**options: Any) -> AsyncIterator[tuple[S7Simulator, S7Device]]:
    tags = options.pop("tags", None)
    dev = device(0, **({"tags": tags} if tags else {}))
    async with S7Simulator([dev], **options) as sim:
        host, port = sim.endpoints["plc"]
        yield sim, dev.model_copy(update={"host": host, "port": port})


async def test_wrong_rack_slot_is_refused_with_a_hint() -> None:
    async with simulated() as (_, dev):
        driver = S7Driver(dev.model_copy(update={"slot": 2}))
        with pytest.raises(DriverUnavailable) as info:
            await driver.connect()
    assert info.value.reason == "connection refused"
    assert "check rack/slot or TSAPs" in info.value.detail


async def test_connection_loss_raises_unavailable_and_reconnect_works() -> None:
    async with simulated() as (sim, dev):
        driver = S7Driver(dev)
        await driver.connect()
        try:
            assert [r.value for r in await driver.read("default")] == [11, 2.5]
            sim.drop_connections("plc")
            await asyncio.sleep(0.05)
            with pytest.raises(DriverUnavailable) as info:
                await driver.read("default")
            assert info.value.reason == "connection lost"
            await driver.close()
            await driver.connect()
            assert [r.value for r in await driver.read("default")] == [11, 2.5]
        finally:
            await driver.close()


async def test_put_get_disabled_says_what_to_change_on_the_plc() -> None:
    async with simulated(put_get=False) as (_, dev):
        driver = S7Driver(dev)
        await driver.connect()
        try:
            with pytest.raises(DriverConfigError) as info:
                await driver.read("default")
        finally:
            await driver.close()
    assert info.value.code == 0x8104
    assert "Permit access with PUT/GET communication from remote partner" in info.value.reason


async def test_optimized_db_tags_are_bad_with_the_setting_to_change() -> None:
    tags = [
        {"name": "opt", "address": "DB1.DBW0", "type": "int"},
        {
            "name": "plain",
            "address": "DB2.DBW0",
            "type": "int",
            "simulate": {"generator": "constant", "value": 5},
        },
    ]
    async with simulated(tags=tags, optimized_dbs=[1]) as (_, dev):
        driver = S7Driver(dev)
        await driver.connect()
        try:
            opt, plain = await driver.read("default")
        finally:
            await driver.close()
    assert (plain.quality, plain.value) == ("good", 5)
    assert (opt.quality, opt.value, opt.code) == ("bad", None, 0x05)
    assert opt.reason is not None
    assert "'Optimized block access' on" in opt.reason


async def test_smaller_granted_pdu_replans_the_reads() -> None:
    tags = [
        {
            "name": f"r{i}",
            "address": f"DB1.DBD{4 * i}",
            "type": "real",
            "simulate": {"generator": "constant", "value": float(i)},
        }
        for i in range(100)
    ]
    async with simulated(tags=tags, grant_pdu=240) as (sim, dev):
        driver = S7Driver(dev)
        assert len(driver.plan.groups["default"].requests) == 1  # 400 bytes at PDU 480
        with capture_logs() as logs:
            await driver.connect()
        try:
            before = sim.request_count("plc")
            readings = await driver.read("default")
            used = sim.request_count("plc") - before
        finally:
            await driver.close()
    assert driver.pdu_size == 240
    assert used == len(driver.plan.groups["default"].requests) == 2
    assert [r.value for r in readings] == [float(i) for i in range(100)]
    smaller = [e for e in logs if e["event"] == "s7.pdu.smaller"]
    assert smaller == [
        {
            "event": "s7.pdu.smaller",
            "device": "plc",
            "configured": 480,
            "granted": 240,
            "requests_before": 1,
            "requests_after": 2,
            "log_level": "warning",
        }
    ]


async def test_string_with_a_bad_header_is_bad_not_garbage() -> None:
    def answer(job: bytes) -> bytes:
        ref = int.from_bytes(job[4:6], "big")
        data = b"\xff\x04" + struct.pack(">H", 8 * 6) + bytes((4, 9)) + b"ABCD"
        return codec.cotp_data(codec.ack_data(ref, b"\x04\x01", data))

    tags = [{"name": "s", "address": "DB1.DBB0", "type": "string", "length": 4}]
    async with scripted(answer) as port:
        driver = S7Driver(device(port, tags=tags))
        await driver.connect()
        try:
            (reading,) = await driver.read("default")
        finally:
            await driver.close()
    assert (reading.quality, reading.value) == ("bad", None)
    assert reading.reason == (
        "invalid value: STRING header says 9 characters of at most 4 (declared 4)"
    )


async def test_value_too_large_for_the_granted_pdu_is_a_config_error() -> None:
    tags = [{"name": "s", "address": "DB1.DBB0", "type": "string", "length": 240}]
    async with simulated(tags=tags, grant_pdu=240) as (_, dev):
        driver = S7Driver(dev)
        with pytest.raises(DriverConfigError) as info:
            await driver.connect()
        await driver.close()
    assert info.value.reason == "the PLC grants PDU size 240, less than pdu_size 480"
    assert "a string of 242 bytes is larger than the 222 bytes" in info.value.detail


async def test_read_cancelled_in_flight_closes_the_connection() -> None:
    async with scripted(lambda job: None) as port:
        driver = S7Driver(device(port, timeout_s=5.0))
        await driver.connect()
        try:
            task = asyncio.ensure_future(driver.read("default"))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            with pytest.raises(DriverUnavailable) as info:
                await driver.read("default")
        finally:
            await driver.close()
    assert info.value.reason == "connection lost"


async def test_poller_publishes_the_put_get_hint_and_logs_it_once() -> None:
    from agent.poller import DevicePoller

    batches: list[list[Any]] = []

    async def sink(readings: Any) -> None:
        batches.append(list(readings))

    async with simulated(put_get=False) as (_, dev):
        dev = dev.model_copy(
            update={"interval_s": 0.05, "backoff_min_s": 0.05, "backoff_max_s": 0.1}
        )
        poller = DevicePoller(dev, "s7", S7Driver(dev), {"default": ["a", "b"]}, sink)
        with capture_logs() as logs:
            task = asyncio.create_task(poller.run())
            try:
                # Several refused polls (reconnecting with backoff after each one); the
                # bad sample sets may be rate-limited while the device stays down.
                async with asyncio.timeout(10):
                    while not batches or poller.status.connects < 3:
                        await asyncio.sleep(0.01)
            finally:
                task.cancel()
                await asyncio.wait({task})
    readings = [r for batch in batches for r in batch]
    assert {r.quality for r in readings} == {"bad"}
    assert all(r.value is None for r in readings)
    assert all("Permit access with PUT/GET" in (r.reason or "") for r in readings)
    down = [e for e in logs if e["event"] == "device.down"]
    assert len(down) == 1
    assert down[0]["reason"].startswith("s7 error 0x8104 (function refused by the CPU")


async def test_plan_follows_the_pdu_granted_at_each_connect() -> None:
    tags = [
        {"name": f"r{i}", "address": f"DB1.DBD{4 * i}", "type": "real",
         "simulate": {"generator": "constant", "value": float(i)}}
        for i in range(100)
    ]  # fmt: skip
    async with simulated(tags=tags, grant_pdu=240) as (sim, dev):
        driver = S7Driver(dev)
        await driver.connect()
        assert len(driver.plan.groups["default"].requests) == 2
        await driver.close()
        sim.grant_pdu = None  # the CPU is replaced by one granting the configured 480
        await driver.connect()
        try:
            before = sim.request_count("plc")
            readings = await driver.read("default")
            assert sim.request_count("plc") - before == 1
        finally:
            await driver.close()
    assert driver.pdu_size == 480
    assert [r.value for r in readings] == [float(i) for i in range(100)]
