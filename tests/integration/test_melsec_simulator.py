"""The MELSEC simulator answers raw SLMP frames like a CPU: end codes for what a CPU
refuses, silence-and-close for what is not SLMP binary, and a restart the driver
recovers from."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest

from drivers.base import DriverUnavailable, RawReading
from drivers.melsec.codec import Route, batch_read_body, random_read_body, request_frame
from drivers.melsec.config import MelsecDevice
from drivers.melsec.driver import MelsecDriver
from drivers.melsec.simulator import MelsecSimulator

pytestmark = pytest.mark.integration


def make(**keys: Any) -> MelsecDevice:
    return MelsecDevice.model_validate(
        {
            "name": "plc",
            "protocol": "melsec",
            "series": keys.pop("series", "iq-f"),
            "host": "127.0.0.1",
            "port": keys.pop("port", 0),
            "tags": [{"name": "d", "address": "D10", "simulate": {"generator": "constant",
                                                                   "value": 7}}],
            **keys,
        }
    )  # fmt: skip


async def exchange(port: int, frame: bytes) -> tuple[int, bytes]:
    """Send one 3E frame, return (end code, the rest of the answer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(frame)
        head = await asyncio.wait_for(reader.readexactly(9), 5)
        assert head[:2] == b"\xd0\x00"
        (length,) = struct.unpack_from("<H", head, 7)
        body = await asyncio.wait_for(reader.readexactly(length), 5)
        return struct.unpack_from("<H", body)[0], body[2:]
    finally:
        writer.close()


def read_frame(command: int, sub: int, body: bytes) -> bytes:
    return request_frame("3e", Route(), 4, command, sub, body)


@pytest.mark.parametrize(
    ("frame", "end"),
    [
        (read_frame(0x0401, 0, batch_read_body(10, 0xA8, 1)), 0),
        (read_frame(0x0401, 0, batch_read_body(7999, 0xA8, 2)), 0xC056),
        (read_frame(0x0401, 0, batch_read_body(0, 0xA8, 961)), 0xC052),
        (read_frame(0x0401, 0, batch_read_body(0, 0xA8, 0)), 0xC052),
        (read_frame(0x0401, 1, batch_read_body(0, 0x90, 3585)), 0xC051),
        (read_frame(0x0401, 1, batch_read_body(0, 0xA8, 1)), 0xC05C),  # bit units of D
        (read_frame(0x0401, 0, batch_read_body(0, 0xB0, 1)), 0xC05C),  # no ZR on iQ-F
        (read_frame(0x0401, 0, batch_read_body(0, 0x55, 1)), 0xC05C),  # no such device
        (read_frame(0x0401, 0, batch_read_body(0, 0xA8, 1) + b"\x00"), 0xC061),
        (read_frame(0x0403, 0, random_read_body([(0, 0xA8)] * 193, [])), 0xC054),
        (read_frame(0x0403, 0, b"\x01\x00"), 0xC061),
        # writes (accepted ones: tests/integration/test_melsec_write.py)
        (read_frame(0x1401, 0, batch_read_body(7999, 0xA8, 2) + b"\x01\x00" * 2), 0xC056),
        (read_frame(0x1401, 0, batch_read_body(10, 0xA8, 2) + b"\x01\x00"), 0xC061),
        (read_frame(0x1401, 0, batch_read_body(0, 0xB0, 1) + b"\x01\x00"), 0xC05C),  # no ZR
        (read_frame(0x1401, 1, batch_read_body(0, 0xA8, 1) + b"\x10"), 0xC05C),  # bits of D
        (read_frame(0x1401, 0, batch_read_body(0, 0xA8, 961) + b"\x00" * 1922), 0xC052),
        (read_frame(0x1402, 0, b"\x01\x00"), 0xC059),  # random write: not served
        (read_frame(0x0619, 0, b"\x02\x00AB"), 0xC059),
    ],
)
async def test_requests_get_the_cpus_end_codes(frame: bytes, end: int) -> None:
    async with MelsecSimulator([make()]) as sim:
        code, rest = await exchange(sim.endpoints["plc"][1], frame)
    assert code == end
    if end == 0:
        assert rest == b"\x07\x00"
    else:
        assert rest == Route().pack() + frame[11:15]  # error information: route + command


async def test_what_is_not_slmp_binary_is_dropped_and_others_are_still_served() -> None:
    async with MelsecSimulator([make()]) as sim:
        port = sim.endpoints["plc"][1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"500000FF03FF00")  # ASCII code into a binary port
        assert await asyncio.wait_for(reader.read(100), 5) == b""
        writer.close()
        code, data = await exchange(port, read_frame(0x0401, 0, batch_read_body(10, 0xA8, 1)))
    assert (code, data) == (0, b"\x07\x00")


async def test_a_restarted_cpu_is_read_again_after_reconnect() -> None:
    device = make()
    async with MelsecSimulator([device]) as sim:
        port = sim.endpoints["plc"][1]
        driver = MelsecDriver(device.model_copy(update={"port": port}))
        await driver.connect()
        assert await driver.read("default") == [RawReading("d", 7)]
    with pytest.raises(DriverUnavailable) as info:
        await driver.read("default")
    assert info.value.reason == "connection lost"
    with pytest.raises(DriverUnavailable) as info:
        await driver.connect()
    assert info.value.reason == "connection refused"
    async with MelsecSimulator([make(port=port)]) as sim:
        assert sim.endpoints["plc"][1] == port
        await driver.connect()
        assert await driver.read("default") == [RawReading("d", 7)]
        await driver.close()
