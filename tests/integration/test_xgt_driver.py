"""XgtDriver against XgtSimulator on loopback: values of every type, planned requests, and
faults (refused addresses isolated, malformed frames, timeouts, lost connections)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from bench.xgt_poll import tags as bench_tags
from drivers.base import DriverUnavailable, RawReading
from drivers.xgt.codec import (
    HEADER_LEN,
    bcc,
    continuous_read,
    decode_header,
    encode_frame,
    encode_nak,
)
from drivers.xgt.config import XgtDevice
from drivers.xgt.driver import XgtDriver
from drivers.xgt.simulator import XgtSimulator

pytestmark = pytest.mark.integration

FLOAT32 = struct.unpack("<f", struct.pack("<f", 123.456))[0]


def const(value: Any) -> dict[str, Any]:
    return {"generator": "constant", "value": value}


def make_device(tags: list[dict[str, Any]], **extra: Any) -> XgtDevice:
    fields: dict[str, Any] = {
        "name": "plc",
        "protocol": "xgt",
        "host": "127.0.0.1",
        "port": 0,
        "timeout_s": 0.5,
        "tags": tags,
    }
    fields.update(extra)
    return XgtDevice.model_validate(fields)


TYPED: list[tuple[dict[str, Any], Any]] = [
    ({"address": "%MW0"}, 54321),
    ({"address": "%MW1", "type": "int16"}, -1234),
    ({"address": "%MW2", "type": "int32"}, -123456789),
    ({"address": "%MW4", "type": "uint32"}, 3_000_000_000),
    ({"address": "%MW6", "type": "float32"}, FLOAT32),
    ({"address": "%MW8", "type": "float64"}, -273.15),
    ({"address": "%MW12", "type": "int64"}, -1_234_567_890_123),
    ({"address": "%ML4", "type": "uint64"}, 1 << 60),
    ({"address": "%MB40", "type": "int8"}, -7),
    ({"address": "%MB41"}, 200),
    ({"address": "%MB42", "type": "string", "length": 6}, "HELLO"),
    ({"address": "%MX384"}, True),  # bit 0 of byte 48
    ({"address": "%MX385"}, False),
    ({"address": "%MX399"}, True),  # bit 15 of word 24
    ({"address": "%MW25", "type": "bit", "bit": 9}, True),
    ({"address": "%DD100"}, 123_456),
    ({"address": "%DW900", "type": "int16", "scale": 0.1}, -12.5),
    ({"address": "%PX17"}, True),
    ({"address": "%TX3"}, True),  # timer contact: individual read
    ({"address": "%TW3"}, 77),  # its current value
    ({"address": "%CX9"}, False),
    ({"address": "%KW8"}, 4096),
    ({"address": "%LW3", "type": "int16"}, -2),
    ({"address": "%RW10"}, 11),
]


def typed_tags() -> list[dict[str, Any]]:
    return [
        {"name": f"t{i}", **fields, "simulate": const(value)}
        for i, (fields, value) in enumerate(TYPED)
    ]


@pytest.fixture
async def served() -> AsyncIterator[tuple[XgtSimulator, XgtDevice]]:
    device = make_device(typed_tags())
    async with XgtSimulator([device]) as sim:
        yield sim, device


async def connected(sim: XgtSimulator, device: XgtDevice, **kw: Any) -> XgtDriver:
    driver = XgtDriver(device, endpoint=sim.endpoints[device.name], **kw)
    await driver.connect()
    return driver


def by_tag(readings: list[RawReading]) -> dict[str, RawReading]:
    return {r.tag: r for r in readings}


async def test_every_type_and_area_reads_exactly(
    served: tuple[XgtSimulator, XgtDevice],
) -> None:
    sim, device = served
    driver = await connected(sim, device)
    try:
        readings = await driver.read("default")
    finally:
        await driver.close()
    for reading, (fields, value) in zip(readings, TYPED, strict=True):
        assert reading.quality == "good", reading
        raw = round(value / fields["scale"]) if "scale" in fields else value  # before scaling
        assert reading.value == raw, (fields, reading)
        assert type(reading.value) is type(raw), (fields, reading)


async def test_one_poll_makes_exactly_the_planned_requests(
    served: tuple[XgtSimulator, XgtDevice],
) -> None:
    sim, device = served
    driver = await connected(sim, device)
    try:
        planned = len(driver.plan.groups["default"].requests)
        before = sim.request_count("plc")
        await driver.read("default")
        assert sim.request_count("plc") - before == planned == driver.requests_sent
    finally:
        await driver.close()


async def test_xgi_cpu_serves_i_q_areas() -> None:
    device = make_device(
        [
            {"name": "in", "address": "%IX5", "simulate": const(True)},
            {"name": "out", "address": "%QW2", "simulate": const(513)},
            {"name": "m", "address": "%MD1", "type": "float32", "simulate": const(2.5)},
        ],
        cpu="XGI",
    )
    async with XgtSimulator([device]) as sim:
        driver = await connected(sim, device)
        try:
            values = {r.tag: r.value for r in await driver.read("default")}
        finally:
            await driver.close()
    assert values == {"in": True, "out": 513, "m": 2.5}


# ---------------------------------------------------------------- refused addresses


async def test_refused_addresses_are_isolated_to_their_tags() -> None:
    served_tags = [
        {"name": "a", "address": "%DW0", "simulate": const(1)},
        {"name": "c", "address": "%DW4", "simulate": const(3)},
        {"name": "w1", "address": "%MW100", "simulate": const(10)},
        {"name": "w2", "address": "%MW300", "simulate": const(30)},
    ]
    polled_tags = [
        {"name": "a", "address": "%DW0"},
        {"name": "missing", "address": "%DW2"},  # not served: the block has a hole
        {"name": "c", "address": "%DW4"},
        {"name": "w1", "address": "%MW100"},
        {"name": "gone", "address": "%MW200"},
        {"name": "w2", "address": "%MW300"},
    ]
    served_device = make_device(served_tags)
    polled = make_device(polled_tags, max_gap_bytes=4)
    async with XgtSimulator([served_device]) as sim:
        driver = XgtDriver(polled, endpoint=sim.endpoints["plc"])
        await driver.connect()
        try:
            with capture_logs() as logs:
                first = by_tag(await driver.read("default"))
            again = by_tag(await driver.read("default"))
        finally:
            await driver.close()
    for readings in (first, again):
        assert {t: r.value for t, r in readings.items() if r.quality == "good"} == {
            "a": 1,
            "c": 3,
            "w1": 10,
            "w2": 30,
        }
        for name in ("missing", "gone"):
            assert readings[name].quality == "bad"
            assert readings[name].code == 4
            assert readings[name].reason == "xgt error 0x0004 (address beyond the device area)"
    isolated = [e for e in logs if e["event"] == "xgt.block.isolated"]
    assert sorted(t for e in isolated for t in e["bad_tags"]) == ["gone", "missing"]
    # After isolation a poll reads only what the PLC serves, in as few requests as it can.
    assert [r.describe() for r in driver.active_requests("default")] == [
        "continuous %DB0 x 2 bytes (1 tag)",
        "continuous %DB8 x 2 bytes (1 tag)",
        "individual W x 2 (%MW100 %MW300; 2 tags)",
    ]


async def test_an_area_the_cpu_does_not_serve_is_error_3_for_that_tag_only() -> None:
    served_device = make_device([{"name": "ok", "address": "%MW0", "simulate": const(5)}])
    # The same config claims XGI: %MW is served there too, %QW is not served by the XGK sim.
    polled = make_device(
        [{"name": "ok", "address": "%MW0"}, {"name": "q", "address": "%QW0"}], cpu="XGI"
    )
    async with XgtSimulator([served_device]) as sim:
        driver = XgtDriver(polled, endpoint=sim.endpoints["plc"])
        await driver.connect()
        try:
            readings = by_tag(await driver.read("default"))
        finally:
            await driver.close()
    assert readings["ok"].value == 5
    assert (readings["q"].quality, readings["q"].code) == ("bad", 3)
    assert "device not served by this CPU" in str(readings["q"].reason)


# ---------------------------------------------------------------- malformed frames


def _rewrite(
    change: Callable[[bytearray], None], *, fix_bcc: bool = True
) -> Callable[[bytes], bytes]:
    def fault(answer: bytes) -> bytes:
        frame = bytearray(answer)
        change(frame)
        if fix_bcc:
            frame[16:18] = struct.pack("<H", len(frame) - HEADER_LEN)
            frame[19] = bcc(bytes(frame))
        return bytes(frame)

    return fault


def _set(index: int, value: int) -> Callable[[bytearray], None]:
    def change(frame: bytearray) -> None:
        frame[index] = value

    return change


def _longer(answer: bytes, length: int = 0) -> bytes:
    """The header announces more bytes than follow (32 more, or `length`; BCC kept right)."""
    frame = bytearray(answer)
    frame[16:18] = struct.pack("<H", length or len(frame) - HEADER_LEN + 32)
    frame[19] = bcc(bytes(frame))
    return bytes(frame)


MALFORMED: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("invoke id", _rewrite(_set(14, 0x7F)), "protocol error: wrong invoke id"),
    ("bcc", _rewrite(_set(19, 0x01), fix_bcc=False), "protocol error: wrong BCC"),
    ("source", _rewrite(_set(13, 0x33)), "protocol error: wrong source of frame"),
    ("company", _rewrite(_set(0, ord("X"))), "protocol error: wrong company id"),
    ("command", _rewrite(_set(20, 0x59)), "protocol error: wrong command"),
    ("data size", _rewrite(_set(30, 0x03)), "protocol error: wrong data size"),
    ("trailing", _rewrite(lambda f: f.extend(b"\x00")), "protocol error: 1 unexpected bytes"),
    ("length", _longer, "protocol error: incomplete frame"),
    ("huge length", lambda a: _longer(a, 0xFFFF), "protocol error: header length 65535"),
]


@pytest.mark.parametrize(("name", "fault", "reason"), MALFORMED, ids=[m[0] for m in MALFORMED])
async def test_malformed_answers_are_never_decoded(
    name: str, fault: Callable[[bytes], bytes], reason: str
) -> None:
    device = make_device([{"name": "w", "address": "%MW0", "simulate": const(7)}])
    async with XgtSimulator([device]) as sim:
        driver = await connected(sim, device)
        try:
            assert (await driver.read("default"))[0].value == 7
            sim.set_fault("plc", fault)
            with pytest.raises(DriverUnavailable) as info:
                await driver.read("default")
            assert info.value.reason.startswith(reason), info.value
            # The driver dropped the connection: nothing stale can be paired later.
            with pytest.raises(DriverUnavailable, match="connection lost"):
                await driver.read("default")
        finally:
            await driver.close()


async def test_a_bit_answer_other_than_00_01_is_a_protocol_error() -> None:
    device = make_device([{"name": "t", "address": "%TX1", "simulate": const(True)}])
    async with XgtSimulator([device]) as sim:
        sim.set_fault("plc", _rewrite(lambda f: f.__setitem__(-1, 2)))
        driver = await connected(sim, device)
        try:
            with pytest.raises(DriverUnavailable, match="neither 00 nor 01"):
                await driver.read("default")
        finally:
            await driver.close()


# ---------------------------------------------------------------- timeouts and connections


async def test_a_silent_plc_is_a_timeout_and_the_connection_is_closed() -> None:
    device = make_device([{"name": "w", "address": "%MW0"}], timeout_s=0.3)
    async with XgtSimulator([device]) as sim:
        sim.set_fault("plc", lambda answer: None)
        driver = await connected(sim, device)
        try:
            with pytest.raises(DriverUnavailable) as info:
                await driver.read("default")
            assert info.value.reason == "timeout"
            with pytest.raises(DriverUnavailable, match="connection lost"):
                await driver.read("default")
            sim.set_fault("plc", None)
            await driver.connect()  # what the poller does after backoff
            assert (await driver.read("default"))[0].quality == "good"
        finally:
            await driver.close()


async def test_an_answer_that_stops_short_is_an_incomplete_frame() -> None:
    device = make_device([{"name": "w", "address": "%MW0"}], timeout_s=0.3)
    async with XgtSimulator([device]) as sim:
        sim.set_fault("plc", lambda answer: answer[:25])
        driver = await connected(sim, device)
        try:
            with pytest.raises(DriverUnavailable) as info:
                await driver.read("default")
        finally:
            await driver.close()
    assert info.value.reason == "protocol error: incomplete frame"


async def test_a_dropped_connection_is_connection_lost() -> None:
    device = make_device([{"name": "w", "address": "%MW0"}])
    async with XgtSimulator([device]) as sim:
        driver = await connected(sim, device)
        try:
            await driver.read("default")
            sim.drop_connections("plc")
            await asyncio.sleep(0.05)
            with pytest.raises(DriverUnavailable) as info:
                await driver.read("default")
            assert info.value.reason == "connection lost"
        finally:
            await driver.close()


async def test_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    device = make_device([{"name": "w", "address": "%MW0"}], port=port)
    driver = XgtDriver(device)
    with pytest.raises(DriverUnavailable) as info:
        await driver.connect()
    assert info.value.reason == "connection refused"
    await driver.close()


# ---------------------------------------------------------------- the simulator's strictness


async def _exchange(port: int, frame: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(frame)
        head = await asyncio.wait_for(reader.readexactly(HEADER_LEN), 2)
        body = await asyncio.wait_for(reader.readexactly(int.from_bytes(head[16:18], "little")), 2)
    finally:
        writer.close()
    return head + body


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (lambda f: f.__setitem__(19, (f[19] + 1) & 0xFF), 0x77),  # wrong non-zero BCC
        (lambda f: f.__setitem__(0, ord("X")), 0x75),  # not LS ELECTRIC's company id
        (lambda f: f.__setitem__(13, 0x11), 0x75),  # source of a response
        (lambda f: f.__setitem__(20, 0x58), 0x76),  # a write without its data
        (lambda f: f.__setitem__(20, 0x5A), 0x78),  # no such command
    ],
)
async def test_the_simulator_refuses_what_the_manual_refuses(
    change: Callable[[bytearray], None], code: int
) -> None:
    device = make_device([{"name": "w", "address": "%MW0"}])
    async with XgtSimulator([device]) as sim:
        frame = bytearray(encode_frame(continuous_read("%MB0", 2), invoke_id=9, cpu_info=0xA0))
        change(frame)
        answer = await _exchange(sim.endpoints["plc"][1], bytes(frame))
    header = decode_header(answer)
    assert (header.source, header.invoke_id, header.bcc_ok) == (0x11, 9, True)
    assert header.bcc == bcc(answer)
    status, error = struct.unpack_from("<HH", answer, 26)
    assert (status, error) == (0xFFFF, code)


async def test_the_simulator_answers_a_bcc_of_zero() -> None:
    device = make_device([{"name": "w", "address": "%MW0", "simulate": const(0xBEEF)}])
    async with XgtSimulator([device]) as sim:
        frame = bytearray(encode_frame(continuous_read("%MB0", 2), invoke_id=3, cpu_info=0xA0))
        frame[19] = 0
        answer = await _exchange(sim.endpoints["plc"][1], bytes(frame))
    assert answer[20:] == struct.pack("<HHHHHH", 0x55, 0x14, 0, 0, 1, 2) + b"\xef\xbe"
    assert answer[12] == 0xA0  # CPU info of the configured XGK
    assert answer[10:12] == b"\x01\x01"  # PLC info: XGK CPU type, RUN


async def test_a_read_cancelled_in_flight_drops_the_connection() -> None:
    device = make_device([{"name": "w", "address": "%MW0"}], timeout_s=5)
    async with XgtSimulator([device]) as sim:
        sim.set_fault("plc", lambda answer: None)
        driver = await connected(sim, device)
        try:
            task = asyncio.create_task(driver.read("default"))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The late answer can never be taken for the next request's: no connection.
            with pytest.raises(DriverUnavailable, match="connection lost"):
                await driver.read("default")
        finally:
            await driver.close()


async def test_five_hundred_tags_read_exactly_in_the_planned_requests() -> None:
    tags = bench_tags(500)
    expected: dict[str, Any] = {}
    for i, tag in enumerate(tags):
        if tag.get("type") == "float32":
            value: Any = float(i) + 0.25
        elif tag.get("type") == "int16":
            value = -i
        else:
            value = i % 3 == 0
        tag["simulate"] = const(value)
        expected[tag["name"]] = value
    device = make_device(tags, interval_s=0.1)
    async with XgtSimulator([device]) as sim:
        driver = await connected(sim, device)
        try:
            before = sim.request_count("plc")
            for _ in range(3):
                readings = await driver.read("default")
                assert {r.tag: r.value for r in readings} == expected
                assert all(r.quality == "good" for r in readings)
            assert sim.request_count("plc") - before == 3 * 5
            assert len(driver.plan.groups["default"].requests) == 5
        finally:
            await driver.close()


async def test_an_isolated_tag_recovers_when_the_plc_serves_it_again() -> None:
    tags = [
        {"name": "a", "address": "%DW0", "simulate": const(1)},
        {"name": "b", "address": "%DW1", "simulate": const(2)},
        {"name": "c", "address": "%DW2", "simulate": const(3)},
    ]
    device = make_device(tags)
    async with XgtSimulator([device]) as sim:
        # Test-only reach into the simulated memory map: D word 1 stops being served, as
        # after a PLC download that shrank the area, then comes back.
        mask = sim._plcs["plc"].mask["D"]
        mask[2:4] = b"\x00\x00"
        driver = XgtDriver(device, endpoint=sim.endpoints["plc"], isolation_retry_s=0.2)
        await driver.connect()
        try:
            with capture_logs() as logs:
                first = by_tag(await driver.read("default"))
                assert (first["a"].value, first["b"].code, first["c"].value) == (1, 4, 3)
                mask[2:4] = b"\x01\x01"
                still = by_tag(await driver.read("default"))  # before the retry: not read
                assert still["b"].code == 4
                await asyncio.sleep(0.25)
                back = by_tag(await driver.read("default"))
        finally:
            await driver.close()
    assert {t: r.value for t, r in back.items()} == {"a": 1, "b": 2, "c": 3}
    events = [e["event"] for e in logs if e["event"].startswith("xgt.block")]
    assert events == ["xgt.block.isolated", "xgt.block.recovered"]
    assert [r.describe() for r in driver.active_requests("default")] == [
        "continuous %DB0 x 6 bytes (3 tags)"
    ]


async def test_two_plcs_configured_on_one_port_are_both_served() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    first = make_device(
        [{"name": "w", "address": "%MW0", "simulate": const(1)}], host="10.0.0.1", port=port
    ).model_copy(update={"name": "press"})
    second = make_device(
        [{"name": "w", "address": "%MW0", "simulate": const(2)}], host="10.0.0.2", port=port
    ).model_copy(update={"name": "feeder"})
    async with XgtSimulator([first, second]) as sim:
        assert sim.endpoints["press"] != sim.endpoints["feeder"]
        values = []
        for device in (first, second):
            driver = await connected(sim, device)
            try:
                values.append((await driver.read("default"))[0].value)
            finally:
                await driver.close()
    assert values == [1, 2]


async def test_a_silent_plc_gets_the_request_retries_times_more() -> None:
    device = make_device([{"name": "w", "address": "%MW0"}], timeout_s=0.2, retries=2)
    async with XgtSimulator([device]) as sim:
        sim.set_fault("plc", lambda answer: None)
        driver = await connected(sim, device)
        try:
            before = sim.request_count("plc")
            with pytest.raises(DriverUnavailable) as info:
                await driver.read("default")
            await asyncio.sleep(0.05)
            assert sim.request_count("plc") - before == 3
        finally:
            await driver.close()
    assert info.value.reason == "timeout"
    assert "within 0.2 s x 3" in info.value.detail


async def test_a_late_answer_to_a_retried_request_is_skipped() -> None:
    device = make_device(
        [
            {
                "name": "w",
                "address": "%MW0",
                "simulate": {"generator": "counter", "step": 1, "period_s": 0.05},
            }
        ],
        timeout_s=0.3,
        retries=1,
    )
    held: list[bytes] = []

    def late(answer: bytes) -> bytes | None:
        if not held:
            held.append(answer)  # the first answer is late: it comes with the second
            return None
        return held[0] + answer

    async with XgtSimulator([device]) as sim:
        driver = await connected(sim, device)
        try:
            sim.set_fault("plc", late)
            (reading,) = await driver.read("default")
            sim.set_fault("plc", None)
            (after,) = await driver.read("default")  # same connection, still in step
        finally:
            await driver.close()
    assert reading.quality == "good"
    stale = int.from_bytes(held[0][-2:], "little")
    # The value is the second answer's: the counter moved on while the first one waited.
    assert isinstance(reading.value, int)
    assert reading.value > stale
    assert after.quality == "good"


def _nak_instead(code: int) -> Callable[[bytes], bytes]:
    """Answer every request with a NAK of `code` (same invoke id, data type and header)."""

    def fault(answer: bytes) -> bytes:
        invoke_id = int.from_bytes(answer[14:16], "little")
        data_type = int.from_bytes(answer[22:24], "little")
        return encode_frame(
            encode_nak(0x55, data_type, code),
            invoke_id=invoke_id,
            cpu_info=answer[12],
            source=0x11,
            plc_info=int.from_bytes(answer[10:12], "little"),
        )

    return fault


async def test_a_nak_about_the_request_makes_its_tags_bad_without_isolation() -> None:
    device = make_device(
        [
            {"name": "a", "address": "%MW0", "simulate": const(1)},
            {"name": "b", "address": "%MW1", "simulate": const(2)},
        ]
    )
    async with XgtSimulator([device]) as sim:
        driver = await connected(sim, device)
        try:
            sim.set_fault("plc", _nak_instead(0x05))
            before = sim.request_count("plc")
            with capture_logs() as logs:
                readings = await driver.read("default")
            assert sim.request_count("plc") - before == 1  # not split: no isolation
            sim.set_fault("plc", None)
            again = await driver.read("default")  # the connection is still fine
        finally:
            await driver.close()
    assert [(r.quality, r.code) for r in readings] == [("bad", 5), ("bad", 5)]
    assert readings[0].reason == "xgt error 0x0005 (more than 1,400 bytes in one block)"
    assert not [e for e in logs if e["event"] == "xgt.block.isolated"]
    assert [r.value for r in again] == [1, 2]


async def test_a_change_of_the_plc_state_is_logged_once() -> None:
    device = make_device([{"name": "w", "address": "%MW0", "simulate": const(9)}])

    def stopped(answer: bytes) -> bytes:
        frame = bytearray(answer)
        frame[10:12] = (0x0201).to_bytes(2, "little")  # XGK CPU type, STOP
        frame[19] = bcc(bytes(frame))
        return bytes(frame)

    async with XgtSimulator([device]) as sim:
        driver = await connected(sim, device)
        try:
            with capture_logs() as logs:
                await driver.read("default")
                sim.set_fault("plc", stopped)
                readings = [await driver.read("default") for _ in range(3)]
        finally:
            await driver.close()
    changes = [
        (e["status"], e["previous"], e["log_level"]) for e in logs if e["event"] == "xgt.cpu.status"
    ]
    assert changes == [("STOP", "RUN", "warning")]
    assert all(r[0].value == 9 for r in readings)  # values are still read
    assert driver.last_header is not None
    assert driver.last_header.system_status == "STOP"


async def test_the_simulator_survives_garbage_and_keeps_serving() -> None:
    rng = random.Random(11)
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
    device = make_device([{"name": "w", "address": "%MW0", "simulate": const(0x0102)}])
    async with XgtSimulator([device]) as sim:
        port = sim.endpoints["plc"][1]
        for _ in range(40):
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
            head = bytearray(encode_frame(body, invoke_id=rng.randrange(65536), cpu_info=0xA0))
            for _ in range(rng.randrange(3)):
                head[rng.randrange(20)] = rng.randrange(256)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(bytes(head))
            with contextlib.suppress(asyncio.TimeoutError, asyncio.IncompleteReadError):
                await asyncio.wait_for(reader.read(2000), 0.2)
            writer.close()
        answer = await _exchange(
            port, encode_frame(continuous_read("%MB0", 2), invoke_id=1, cpu_info=0xA0)
        )
    assert answer[-2:] == b"\x02\x01"
    assert errors == []  # no handler of the simulator failed
