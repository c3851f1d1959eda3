"""The shared link (drivers/links.py) over a scripted transport: serialisation, line
timing, suspension of a silent unit, resynchronisation after noise, lost transports."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from drivers.links import (
    FRAME_INCOMPLETE,
    FRAME_OK,
    Link,
    LinkError,
    RtuOverTcpLink,
    SerialLink,
)
from drivers.modbus.rtu import check_rtu_frame, encode_answer, read_request
from tests.support.scripted_line import Reply, ScriptedLine, registers


def make_link(reply: Reply, **cfg: object) -> tuple[Link, ScriptedLine]:
    line = ScriptedLine(reply)
    config = SerialLink.model_validate({"type": "serial", "port": "/dev/fake", **cfg})
    return Link("line1", config, transport_factory=lambda: line), line


async def read(link: Link, unit: int, timeout_s: float = 0.05, retries: int = 0) -> bytes:
    request = read_request(unit, 3, 0, 2)
    return await link.transact(unit, request, check_rtu_frame, timeout_s, retries=retries)


async def test_requests_are_serialised_and_answers_exact() -> None:
    link, line = make_link(registers)
    answers = await asyncio.gather(*(read(link, unit) for unit in (1, 2, 3)))
    assert answers == [encode_answer(read_request(u, 3, 0, 2), [u, u]) for u in (1, 2, 3)]
    # Three writes, one at a time: each after the previous answer.
    assert [w[1][0] for w in line.writes] == [1, 2, 3]
    assert link.stats.transactions == 3
    assert link.stats.answered == 3
    assert line.flushes >= 3  # input flushed before every request


async def test_turnaround_and_silence_separate_requests() -> None:
    link, line = make_link(registers, baud=9600, turnaround_s=0.03)
    await read(link, 1)
    await read(link, 2)
    (t1, _), (t2, _) = line.writes
    # The answer took ~1 ms; then the line must stay quiet for silence + turnaround.
    assert t2 - t1 >= 0.03 + 3.5 * 11 / 9600


async def test_a_silent_unit_is_suspended_and_the_others_keep_going() -> None:
    link, line = make_link(
        lambda req: None if req[0] == 2 else registers(req), suspend_min_s=0.2, suspend_max_s=0.4
    )
    with pytest.raises(LinkError) as first:
        await read(link, 2)
    assert (first.value.kind, first.value.reason) == ("timeout", "timeout")
    writes = len(line.writes)
    # Suspended: fails at once, nothing is sent.
    with pytest.raises(LinkError) as again:
        await read(link, 2)
    assert again.value.kind == "suspended"
    assert "suspended for" in str(again.value)
    assert len(line.writes) == writes
    assert await read(link, 1)  # another unit is unaffected
    assert link.suspended_for(2) > 0
    await asyncio.sleep(0.21)
    with pytest.raises(LinkError):  # tried again once after the suspension, still silent
        await read(link, 2)
    assert link.suspended_for(2) > 0.3  # backoff doubled (0.4)
    assert link.stats.timeouts == 2


async def test_a_unit_that_answers_again_is_resumed() -> None:
    silent = {"on": True}
    link, _ = make_link(lambda req: None if silent["on"] else registers(req), suspend_min_s=0.05)
    with pytest.raises(LinkError):
        await read(link, 5)
    silent["on"] = False
    await asyncio.sleep(0.06)
    assert await read(link, 5)
    assert link.suspended_for(5) == 0


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda a: [a[:-1] + bytes((a[-1] ^ 0xFF,))], "crc error"),
        (lambda a: [b"\x00\x13" + a], "protocol error: wrong unit id"),
        (lambda a: [a + b"\x55"], "protocol error: unexpected data"),
        (lambda a: [a[:4]], "protocol error: incomplete frame"),
    ],
    ids=["crc", "garbage-before", "garbage-after", "cut-off"],
)
async def test_noise_is_a_frame_error_and_the_link_resynchronises(
    damage: Callable[[bytes], list[bytes]], reason: str
) -> None:
    calls = {"n": 0}

    def reply(req: bytes) -> list[bytes] | None:
        calls["n"] += 1
        good = registers(req)
        assert good is not None
        return damage(good[0]) if calls["n"] == 1 else good

    link, _ = make_link(reply)
    with pytest.raises(LinkError) as err:
        await read(link, 1)
    assert (err.value.kind, err.value.reason) == ("frame", reason)
    assert link.stats.frame_errors == 1
    assert link.suspended_for(1) == 0  # noise is not silence
    # Resynchronised: the next request gets its own, exact answer.
    assert await read(link, 1) == encode_answer(read_request(1, 3, 0, 2), [1, 1])
    assert link.stats.by_reason == {reason: 1}


async def test_noise_after_a_good_answer_does_not_spoil_the_next_one() -> None:
    link, line = make_link(registers)
    assert await read(link, 1) == encode_answer(read_request(1, 3, 0, 2), [1, 1])
    # Noise on the line after the answer was taken (injected here rather than scheduled
    # after it: on a loaded machine both could reach the link in one loop iteration, and
    # then they are one frame with trailing bytes, which is a frame error).
    line._received(b"\x55\x01")
    assert await read(link, 2) == encode_answer(read_request(2, 3, 0, 2), [2, 2])
    assert link.stats.frame_errors == 0


async def test_a_cancelled_request_leaves_its_late_answer_to_be_flushed() -> None:
    def reply(req: bytes) -> list[bytes] | None:
        start = int.from_bytes(req[2:4], "big")
        return [encode_answer(req, [start, start])]

    link, line = make_link(reply)
    line.delay_s = 0.03  # the unit answers after 30 ms
    first = asyncio.ensure_future(link.transact(1, read_request(1, 3, 0, 2), check_rtu_frame, 0.1))
    await asyncio.sleep(0.005)
    first.cancel()  # e.g. the poller stops while the answer is on its way
    with pytest.raises(asyncio.CancelledError):
        await first
    line.delay_s = 0.05  # slower than the late answer still on its way
    # Same unit, function and size, another address: it must get its own answer.
    request = read_request(1, 3, 100, 2)
    answer = await link.transact(1, request, check_rtu_frame, 0.1)
    assert answer == encode_answer(request, [100, 100])


async def test_retries_repeat_a_request_after_noise() -> None:
    calls = {"n": 0}

    def reply(req: bytes) -> list[bytes] | None:
        calls["n"] += 1
        good = registers(req)
        assert good is not None
        return [b"\xff" * 5] if calls["n"] == 1 else good

    link, line = make_link(reply)
    assert await read(link, 1, retries=1)
    assert len(line.writes) == 2


async def test_a_lost_transport_is_unavailable_and_reopened() -> None:
    drop = {"on": False}

    def reply(req: bytes) -> list[bytes] | None:
        if drop["on"]:
            asyncio.get_running_loop().call_soon(line._closed, "connection lost: scripted")
            return None
        return registers(req)

    link, line = make_link(reply)
    assert await read(link, 1)
    line._closed("connection lost: between requests")
    assert await read(link, 1)  # reopened on the next transaction
    assert line.opened == 2
    drop["on"] = True
    with pytest.raises(LinkError) as err:
        await read(link, 1, timeout_s=5)
    assert (err.value.kind, err.value.reason) == ("unavailable", "port error")
    assert link.suspended_for(1) == 0  # the line failed, not the unit
    drop["on"] = False
    assert await read(link, 1)
    assert line.opened == 3
    line.fail_write = True
    with pytest.raises(LinkError) as err:
        await read(link, 1)
    assert (err.value.kind, err.value.reason) == ("unavailable", "port error")


async def test_acquire_and_release_share_one_port() -> None:
    link, line = make_link(registers)
    await link.acquire()
    await link.acquire()
    await link.release()
    assert line.closed == 0
    await link.release()
    assert line.closed == 1


async def test_a_missing_serial_port_is_reported() -> None:
    link = Link("line1", SerialLink(type="serial", port="/nonexistent/ttyUSB9"))
    with pytest.raises(LinkError) as err:
        await link.acquire()
    assert err.value.kind == "unavailable"
    assert err.value.reason == "port unavailable"
    assert "/nonexistent/ttyUSB9" in str(err.value)


async def test_a_refused_rtu_over_tcp_server_is_reported() -> None:
    import socket

    with socket.socket() as s:  # a port from the OS that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    link = Link("gw", RtuOverTcpLink(type="rtu_over_tcp", host="127.0.0.1", port=port))
    with pytest.raises(LinkError) as err:
        await link.acquire()
    assert (err.value.kind, err.value.reason) == ("unavailable", "connection refused")


def test_verdicts_are_the_tcp_ones() -> None:
    from drivers.modbus.driver import FRAME_INCOMPLETE as TCP_INCOMPLETE
    from drivers.modbus.driver import FRAME_OK as TCP_OK

    assert (FRAME_OK, FRAME_INCOMPLETE) == (TCP_OK, TCP_INCOMPLETE)


# ------------------------------------------------------------------ pipelined TCP gateway


def gateway(reply: Callable[[bytes], list[bytes] | None], n: int = 4) -> tuple[Link, ScriptedLine]:
    from drivers.links import TcpGatewayLink

    line = ScriptedLine(reply)
    config = TcpGatewayLink(type="tcp", host="127.0.0.1", max_transactions=n, suspend_min_s=0.05)
    return Link("gw", config, transport_factory=lambda: line), line


def mbap_answer(request: bytes, value: int) -> bytes:
    return request[0:4] + b"\x00\x05" + request[6:8] + b"\x02" + value.to_bytes(2, "big")


async def read_tcp(link: Link, unit: int, timeout_s: float = 0.2) -> bytes:
    from drivers.modbus.driver import check_frame, mbap_read_request

    request = mbap_read_request(link.next_tid(), unit, 3, 0, 1)
    return await link.transact(unit, request, check_frame, timeout_s)


async def test_pipelined_answers_are_matched_by_transaction_id() -> None:
    held: list[bytes] = []

    def reply(req: bytes) -> list[bytes] | None:
        held.append(req)
        if len(held) < 3:
            return None  # answered later, all at once, in reverse order
        return [mbap_answer(r, r[6]) for r in reversed(held)]

    link, line = gateway(reply)
    answers = await asyncio.gather(*(read_tcp(link, unit) for unit in (1, 2, 3)))
    assert [a[-1] for a in answers] == [1, 2, 3]
    assert link.stats.peak_in_flight == 3
    assert len(line.writes) == 3


async def test_a_late_answer_is_dropped_and_a_stray_one_resets_the_stream() -> None:
    held: list[bytes] = []

    def reply(req: bytes) -> list[bytes] | None:
        if req[6] in (5, 9):  # units 5 and 9 answer only when the test says so
            held.append(req)
            return None
        return [mbap_answer(req, 7)]

    link, line = gateway(reply)
    with pytest.raises(LinkError) as err:
        await read_tcp(link, 9, timeout_s=0.02)
    assert err.value.kind == "timeout"
    line._received(mbap_answer(held[0], 1))  # the late answer to unit 9: dropped quietly
    assert (await read_tcp(link, 1))[-1] == 7
    assert line.closed == 0
    waiting = asyncio.ensure_future(read_tcp(link, 5, timeout_s=1.0))
    while len(held) < 2:
        await asyncio.sleep(0.001)
    stray = b"\x12\x34" + mbap_answer(held[1], 1)[2:]  # a transaction id nobody used
    line._received(stray)
    with pytest.raises(LinkError) as out:
        await waiting
    assert (out.value.kind, out.value.reason) == ("frame", "protocol error: wrong transaction id")
    assert line.closed == 1  # the stream was out of step: closed, reopened on the next request
    assert (await read_tcp(link, 1))[-1] == 7
    assert line.opened == 2


async def test_suspension_and_resumption_are_logged_once_each() -> None:
    from structlog.testing import capture_logs

    silent = {"on": True}
    link, _ = make_link(lambda req: None if silent["on"] else registers(req), suspend_min_s=0.02)
    with capture_logs() as logs:
        for _ in range(3):
            with pytest.raises(LinkError):
                await read(link, 4, timeout_s=0.01)
            await asyncio.sleep(0.05)  # past the suspension: asked again, silent again
        silent["on"] = False
        await asyncio.sleep(0.2)
        assert await read(link, 4)
        assert await read(link, 4)
    events = [(e["event"], e.get("unit")) for e in logs if e["event"].startswith("link.unit")]
    assert events == [("link.unit.suspended", 4), ("link.unit.resumed", 4)]
    assert link.stats.timeouts == 3
