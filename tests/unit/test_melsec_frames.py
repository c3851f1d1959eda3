"""The driver's frame checks, fed answers through a scripted transport (no sockets): a
frame that does not fit the request is never decoded into a good value."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from drivers.base import DriverUnavailable, RawReading
from drivers.melsec.config import MelsecDevice
from drivers.melsec.driver import MelsecDriver, _Link

Answer = Callable[[bytes], list[bytes]]


class ScriptedTransport(asyncio.Transport):
    """Answers each written request with the chunks `answer(request)` returns."""

    def __init__(self, link: _Link, answer: Answer) -> None:
        super().__init__()
        self.link = link
        self.answer = answer
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        frame = bytes(data)
        self.written.append(frame)
        loop = asyncio.get_running_loop()
        for chunk in self.answer(frame):
            loop.call_soon(self.link.data_received, chunk)

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted


def device(**keys: Any) -> MelsecDevice:
    return MelsecDevice.model_validate(
        {
            "name": "plc",
            "protocol": "melsec",
            "series": "q",
            "host": "127.0.0.1",
            "port": 5000,
            "timeout_s": 0.05,
            "retries": 0,
            "tags": keys.pop("tags", [{"name": "d", "address": "D100"}]),
            **keys,
        }
    )


def attach(driver: MelsecDriver, answer: Answer) -> ScriptedTransport:
    link = _Link(asyncio.get_running_loop())
    transport = ScriptedTransport(link, answer)
    link.connection_made(transport)
    driver._link = link
    return transport


def ok_answer(request: bytes, data: bytes, *, end: int = 0) -> bytes:
    """A well-formed answer to `request` (3E or 4E), echoing its route."""
    if request[:2] == b"\x54\x00":
        head, route = b"\xd4\x00" + request[2:6], request[6:11]
    else:
        head, route = b"\xd0\x00", request[2:7]
    tail = struct.pack("<H", end) + data
    return head + route + struct.pack("<H", len(tail)) + tail


async def test_a_good_answer_is_decoded() -> None:
    driver = MelsecDriver(device())
    attach(driver, lambda req: [ok_answer(req, b"\x39\x30")])
    assert await driver.read("default") == [RawReading("d", 12345)]


async def test_an_answer_split_in_pieces_is_reassembled() -> None:
    driver = MelsecDriver(device())

    def answer(req: bytes) -> list[bytes]:
        frame = ok_answer(req, b"\x39\x30")
        return [frame[:1], frame[1:5], frame[5:10], frame[10:]]

    attach(driver, answer)
    assert await driver.read("default") == [RawReading("d", 12345)]


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda f: b"\xd4\x00" + f[2:], "protocol error: wrong subheader"),
        (lambda f: b"\x00\x00" + f[2:], "protocol error: wrong subheader"),
        (lambda f: f[:2] + b"\x01" + f[3:], "protocol error: wrong route"),
        (lambda f: f[:4] + b"\xe0" + f[5:], "protocol error: wrong route"),
        (lambda f: f[:7] + b"\x01\x00" + f[9:10], "protocol error: bad length"),
        (lambda f: f[:7] + b"\xff\x7f" + f[9:], "protocol error: bad length"),
        (lambda f: f[:7] + b"\x06\x00" + f[9:] + b"\x00\x00", "protocol error: wrong data length"),
        (lambda f: f[:7] + b"\x03\x00" + f[9:12], "protocol error: wrong data length"),
        (lambda f: f + b"\xd0", "protocol error: unexpected data"),
    ],
)
async def test_malformed_answers_fail_the_request(
    mangle: Callable[[bytes], bytes], reason: str
) -> None:
    driver = MelsecDriver(device())
    attach(driver, lambda req: [mangle(ok_answer(req, b"\x39\x30"))])
    with pytest.raises(DriverUnavailable) as info:
        await driver.read("default")
    assert info.value.reason == reason


@pytest.mark.parametrize("frame", ["3e", "4e"])
async def test_a_frame_that_stops_short_is_an_incomplete_frame(frame: str) -> None:
    driver = MelsecDriver(device(frame=frame, retries=2))
    transport = attach(driver, lambda req: [ok_answer(req, b"\x39\x30")[:12]])
    with pytest.raises(DriverUnavailable) as info:
        await driver.read("default")
    assert info.value.reason == "protocol error: incomplete frame"
    assert len(transport.written) == 1  # never retried into a stream out of step


async def test_silence_is_a_timeout_and_bytes_between_polls_are_refused() -> None:
    driver = MelsecDriver(device())
    attach(driver, lambda req: [])
    with pytest.raises(DriverUnavailable) as info:
        await driver.read("default")
    assert info.value.reason == "timeout"
    driver = MelsecDriver(device())
    transport = attach(driver, lambda req: [ok_answer(req, b"\x39\x30")])
    transport.link.data_received(b"\xd0\x00")
    with pytest.raises(DriverUnavailable) as info:
        await driver.read("default")
    assert info.value.reason == "protocol error: unexpected data"


async def test_4e_checks_the_serial_and_discards_a_late_answer_after_a_retry() -> None:
    driver = MelsecDriver(device(frame="4e", retries=1))
    sent: list[bytes] = []

    def answer(req: bytes) -> list[bytes]:
        sent.append(req)
        if len(sent) == 1:
            return []  # the first try is lost …
        # … its answer arrives late, just before the answer to the retry.
        return [ok_answer(sent[0], b"\x01\x00"), ok_answer(req, b"\x02\x00")]

    attach(driver, answer)
    assert await driver.read("default") == [RawReading("d", 2)]
    assert [s[2:4] for s in sent] == [b"\x01\x00", b"\x02\x00"]

    driver = MelsecDriver(device(frame="4e"))
    attach(driver, lambda req: [ok_answer(req[:2] + b"\x99\x99" + req[4:], b"\x01\x00")])
    with pytest.raises(DriverUnavailable) as info:
        await driver.read("default")
    assert info.value.reason == "protocol error: wrong serial number"


async def test_3e_does_not_retry_since_a_late_answer_could_not_be_told_apart() -> None:
    driver = MelsecDriver(device(retries=3))
    transport = attach(driver, lambda req: [])
    with pytest.raises(DriverUnavailable, match="timeout"):
        await driver.read("default")
    assert len(transport.written) == 1


async def test_an_end_code_marks_the_tags_of_its_request_bad() -> None:
    driver = MelsecDriver(device())
    attach(driver, lambda req: [ok_answer(req, bytes(9), end=0xC059)])
    assert await driver.read("default") == [
        RawReading(
            "d",
            None,
            "bad",
            "end code 0xC059 (command or sub-command not supported by this CPU)",
            0xC059,
        )
    ]


def _well_formed(data: bytes, request: bytes) -> bool:
    return (
        len(data) == 13
        and data[:2] == b"\xd0\x00"
        and data[2:7] == request[2:7]
        and data[7:9] == b"\x04\x00"
        and data[9:11] == b"\x00\x00"
    )


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.one_of(
        st.binary(max_size=40),
        st.binary(max_size=6).map(lambda tail: bytes.fromhex("D000 00FF FF03 00 0400 0000") + tail),
        st.binary(min_size=13, max_size=13).map(lambda b: b"\xd0\x00" + b[2:]),
    )
)
def test_garbage_never_becomes_a_good_value(data: bytes) -> None:
    async def run() -> list[RawReading] | str:
        driver = MelsecDriver(device(timeout_s=0.005))
        transport = attach(driver, lambda req: [data] if data else [])
        try:
            readings = await driver.read("default")
        except DriverUnavailable as exc:
            return exc.reason
        assert _well_formed(data, transport.written[0]) or all(r.quality == "bad" for r in readings)
        return readings

    outcome = asyncio.run(run())
    if not isinstance(outcome, str):
        good = [r for r in outcome if r.quality == "good"]
        if good:
            assert good == [RawReading("d", struct.unpack("<h", data[11:13])[0])]


async def test_a_cpu_without_random_read_is_read_with_batch_reads() -> None:
    tags = [{"name": "a", "address": "D0"}, {"name": "b", "address": "D100"}]
    driver = MelsecDriver(device(tags=tags))
    assert [r.mode for r in driver.group_plan("default").requests] == ["random"]

    def answer(req: bytes) -> list[bytes]:
        if req[11:13] == b"\x03\x04":  # 0403: this module does not know it
            return [ok_answer(req, bytes(9), end=0xC059)]
        number = int.from_bytes(req[15:18], "little")
        return [ok_answer(req, struct.pack("<h", number + 1))]

    transport = attach(driver, answer)
    with capture_logs() as logs:
        assert await driver.read("default") == [RawReading("a", 1), RawReading("b", 101)]
        assert await driver.read("default") == [RawReading("a", 1), RawReading("b", 101)]
    assert [r.describe() for r in driver.active_requests("default")] == [
        "D0..D0 (1 word, 1 tag)",
        "D100..D100 (1 word, 1 tag)",
    ]
    assert len(transport.written) == 1 + 2 + 2  # one refused random read, then batch reads
    (event,) = [e for e in logs if e["event"] == "melsec.random_read.unsupported"]
    assert event["reason"] == "end code 0xC059 (command or sub-command not supported by this CPU)"


async def test_a_connect_nobody_answers_is_a_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()

    async def hang(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(3600)

    monkeypatch.setattr(loop, "create_connection", hang)
    driver = MelsecDriver(device(timeout_s=0.01))
    with pytest.raises(DriverUnavailable) as info:
        await driver.connect()
    assert info.value.reason == "timeout"
