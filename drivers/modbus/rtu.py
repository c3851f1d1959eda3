"""Modbus RTU framing and line timing (pure code: no I/O, no pymodbus).

An RTU frame is `unit id | PDU | CRC-16 (low byte first)`; frames are delimited by
silence on the line (3.5 character times). A master sends one request and waits for
one answer, so the length of a good answer is known from the request:

    read coils / discrete inputs (1, 2):  unit fc count | ceil(n / 8) bytes | crc
    read registers (3, 4):                unit fc count | 2 n bytes        | crc
    exception:                            unit fc|0x80 code                | crc
    write (5, 6, 15, 16):                 unit fc address value/quantity   | crc
    mask write (22):                      unit fc address and-mask or-mask | crc

`check_rtu_frame` checks received bytes against the request incrementally, with the
same verdicts as the Modbus/TCP `check_frame` (FRAME_OK, FRAME_INCOMPLETE or the
reason), so a frame that does not fit the request is refused as soon as its header
arrives and never becomes a value. The CRC is the last check: a frame whose CRC does
not match is `crc error`, whatever its content.

The CRC implementation is checked against pymodbus' own (`FramerRTU.compute_CRC`) in
tests/unit/test_modbus_rtu.py, and interoperates with pymodbus' RTU server in
tests/integration/test_modbus_rtu.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from drivers.links import LineTiming

__all__ = [
    "FRAME_INCOMPLETE",
    "FRAME_OK",
    "check_rtu_frame",
    "crc16",
    "encode_answer",
    "exchange_s",
    "parse_answer",
    "read_request",
    "request_size",
    "response_size",
    "with_crc",
    "write_request",
]

FRAME_OK: Final = ""
FRAME_INCOMPLETE: Final = "incomplete"


def _table() -> list[int]:
    out = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        out.append(crc)
    return out


_CRC_TABLE: Final = _table()


def crc16(data: bytes | bytearray | memoryview) -> int:
    """Modbus CRC-16 (polynomial 0xA001 reflected, start 0xFFFF) of `data`, as a number
    whose low byte goes first on the wire."""
    crc = 0xFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc


def with_crc(frame: bytes) -> bytes:
    """`frame` followed by its CRC, low byte first."""
    return frame + crc16(frame).to_bytes(2, "little")


def read_request(unit: int, function_code: int, start: int, count: int) -> bytes:
    """The RTU frame of a read request (function 1-4)."""
    if function_code not in (1, 2, 3, 4):
        raise ValueError(f"function code {function_code} is not a read")
    if not 0 <= unit <= 255 or not 0 <= start <= 65535 or not 1 <= count <= 2000:
        raise ValueError(f"bad read request unit={unit} start={start} count={count}")
    return with_crc(
        bytes((unit, function_code)) + start.to_bytes(2, "big") + count.to_bytes(2, "big")
    )


def write_request(unit: int, pdu: bytes) -> bytes:
    """The RTU frame of a write request whose PDU is `pdu` (drivers.modbus.write)."""
    if not 0 <= unit <= 255 or not pdu or pdu[0] not in _WRITES:
        raise ValueError(f"bad write request unit={unit} pdu={pdu[:1].hex()}")
    return with_crc(bytes((unit,)) + pdu)


# Write function code → bytes of the request echoed in the answer after the function code.
_WRITES: Final[dict[int, int]] = {5: 4, 6: 4, 15: 4, 16: 4, 22: 6}


def request_size() -> int:
    """Bytes of a read request frame: unit, fc, start (2), count (2), CRC (2)."""
    return 8


def _payload_size(function_code: int, count: int) -> int:
    return 2 * count if function_code in (3, 4) else (count + 7) // 8


def response_size(function_code: int, count: int) -> int:
    """Bytes of the good answer to a read of `count` registers (bits)."""
    return 5 + _payload_size(function_code, count)


def check_rtu_frame(data: bytes | bytearray, request: bytes) -> str:
    """Check received bytes `data` against the read `request` (an RTU frame).

    Returns FRAME_OK for exactly one complete answer with a good CRC (values or an
    exception response), FRAME_INCOMPLETE when more bytes are needed, else the reason:
    `protocol error: wrong unit id`, `… wrong function code`, `… wrong byte count`,
    `… unexpected data` (more bytes than the answer holds) or `crc error`.
    """
    n = len(data)
    if n >= 1 and data[0] != request[0]:
        return "protocol error: wrong unit id"
    if n >= 2 and data[1] & 0x7F != request[1]:
        return "protocol error: wrong function code"
    if n < 3:
        return FRAME_INCOMPLETE
    if data[1] & 0x80:
        total = 5
    elif request[1] in _WRITES:
        echo = _WRITES[request[1]]
        total = 4 + echo
        # The answer echoes the request: address and value (quantity, masks).
        if data[2 : 2 + echo] != request[2 : 2 + echo][: max(0, n - 2)]:
            return "protocol error: wrong echo"
    else:
        count = int.from_bytes(request[4:6], "big")
        expected = _payload_size(request[1], count)
        if data[2] != expected:
            return "protocol error: wrong byte count"
        total = 5 + expected
    if n < total:
        return FRAME_INCOMPLETE
    if n > total:
        return "protocol error: unexpected data"
    if crc16(data[: total - 2]) != int.from_bytes(data[total - 2 : total], "little"):
        return "crc error"
    return FRAME_OK


def parse_answer(frame: bytes | bytearray, request: bytes) -> tuple[int | None, list[int]]:
    """(exception code, []) for an exception answer, else (None, values): registers for
    function 3/4, exactly `count` bits (0/1) for function 1/2. `frame` must have passed
    `check_rtu_frame`."""
    if frame[1] & 0x80:
        return frame[2], []
    if request[1] in _WRITES:
        return None, []
    count = int.from_bytes(request[4:6], "big")
    payload = frame[3:-2]
    if request[1] in (3, 4):
        return None, [int.from_bytes(payload[i : i + 2], "big") for i in range(0, 2 * count, 2)]
    return None, [(payload[i // 8] >> (i % 8)) & 1 for i in range(count)]


def encode_answer(request: bytes, values: Sequence[int] | None, exception: int = 0) -> bytes:
    """The RTU answer to the read `request` (for simulators and tests): `values` are
    registers or bits; `exception` > 0 makes an exception answer instead."""
    unit, fc = request[0], request[1]
    if exception:
        return with_crc(bytes((unit, fc | 0x80, exception)))
    if fc in _WRITES:  # a write is confirmed by echoing the request
        return with_crc(request[: 2 + _WRITES[fc]])
    assert values is not None
    if fc in (3, 4):
        payload = b"".join(int(v).to_bytes(2, "big") for v in values)
    else:
        packed = bytearray((len(values) + 7) // 8)
        for i, bit in enumerate(values):
            if bit:
                packed[i // 8] |= 1 << (i % 8)
        payload = bytes(packed)
    return with_crc(bytes((unit, fc, len(payload))) + payload)


def exchange_s(
    timing: LineTiming, function_code: int, count: int, turnaround_s: float = 0.0
) -> float:
    """Bus time of one read on a line with `timing`: request and answer on the wire,
    the silence that ends each of them, and the turnaround pause. The device's own
    reaction time is not included (it is not known before measuring)."""
    size = request_size() + response_size(function_code, count)
    return timing.wire_s(size) + 2 * timing.silence_s + turnaround_s
