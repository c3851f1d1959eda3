"""Seeded fuzzing of the XGT frame checks: garbage is refused with FrameError (driver side)
or a NAK code (simulator side), never decoded into values and never another exception."""

from __future__ import annotations

import random
import struct

import pytest

from drivers.xgt.codec import (
    HEADER_LEN,
    FrameError,
    NakError,
    ReadRequest,
    continuous_read,
    encode_frame,
    encode_read_response,
    individual_read,
    parse_read_request,
)
from drivers.xgt.config import XgtDevice
from drivers.xgt.driver import check_answer
from drivers.xgt.plan import Request, plan_requests

CASES = 3000


def _requests() -> list[Request]:
    device = XgtDevice.model_validate(
        {
            "name": "p",
            "protocol": "xgt",
            "host": "h",
            "tags": [
                {"name": "a", "address": "%MW0"},
                {"name": "b", "address": "%MW1", "type": "float32"},
                {"name": "w1", "address": "%DW100"},
                {"name": "w2", "address": "%PW7"},
                {"name": "t", "address": "%TX3"},
            ],
        }
    )
    return plan_requests(device.tags)


def _answer(request: Request, invoke_id: int, rng: random.Random) -> bytes:
    blocks = [bytes(rng.randrange(2) for _ in range(n)) for n in request.block_sizes]
    body = encode_read_response(request.data_type, blocks)
    return encode_frame(body, invoke_id=invoke_id, cpu_info=0xA0, source=0x11, plc_info=0x0101)


def _mutate(frame: bytes, rng: random.Random) -> bytes:
    data = bytearray(frame)
    kind = rng.randrange(4)
    if kind == 0:
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del data[rng.randrange(HEADER_LEN, len(data)) :]
    elif kind == 2:
        data += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 6)))
    else:
        pos = rng.randrange(len(data))
        data[pos] = rng.randrange(256)
    return bytes(data)


@pytest.mark.parametrize("seed", [1, 2])
def test_mutated_answers_are_refused_or_fit_the_request_exactly(seed: int) -> None:
    rng = random.Random(seed)
    requests = _requests()
    refused = 0
    for _ in range(CASES):
        request = rng.choice(requests)
        frame = _mutate(_answer(request, 7, rng), rng)
        head, body = frame[:HEADER_LEN], frame[HEADER_LEN:]
        try:
            response = check_answer(head, body, 7, request)
        except FrameError:
            refused += 1
            continue
        if response.error_status:
            assert response.blocks == ()
        else:
            assert tuple(len(b) for b in response.blocks) == request.block_sizes
            if request.size == "X":
                assert all(b in (b"\x00", b"\x01") for b in response.blocks)
    assert refused > CASES // 2  # most mutations break the frame (it must be checked)


def test_any_changed_header_byte_is_refused() -> None:
    rng = random.Random(3)
    for request in _requests():
        frame = _answer(request, 0x1234, rng)
        for pos in range(HEADER_LEN - 1):
            for flip in (0x01, 0x80):
                changed = bytearray(frame)
                changed[pos] ^= flip
                with pytest.raises(FrameError):
                    check_answer(
                        bytes(changed[:HEADER_LEN]), bytes(changed[HEADER_LEN:]), 0x1234, request
                    )


def test_random_request_bodies_get_a_nak_code_or_parse_cleanly() -> None:
    rng = random.Random(4)
    valid = [
        individual_read(["%MW0", "%DW10"], "W"),
        individual_read(["%MX3"], "X"),
        continuous_read("%MB0", 12),
    ]
    codes: set[int] = set()
    for i in range(CASES):
        if i % 2:
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 48)))
        else:
            body = _mutate(b"\x00" * HEADER_LEN + rng.choice(valid), rng)[HEADER_LEN:]
        try:
            parsed = parse_read_request(body)
        except NakError as exc:
            codes.add(exc.code)
            continue
        assert isinstance(parsed, ReadRequest)
        assert 1 <= len(parsed.names) <= 16
        assert all(1 <= len(n) <= 16 for n in parsed.names)
    assert codes <= {0x01, 0x02, 0x05, 0x22, 0x76, 0x78}
    assert {0x76, 0x78} <= codes


def test_every_length_of_a_truncated_answer_is_refused() -> None:
    rng = random.Random(5)
    for request in _requests():
        frame = _answer(request, 1, rng)
        for cut in range(HEADER_LEN, len(frame)):
            head, body = frame[:HEADER_LEN], frame[HEADER_LEN:cut]
            with pytest.raises(FrameError):
                check_answer(head, body, 1, request)
            # Even with the header's length made to match the short body.
            fixed = bytearray(head)
            fixed[16:18] = struct.pack("<H", len(body))
            fixed[19] = 0
            with pytest.raises(FrameError):
                check_answer(bytes(fixed), body, 1, request)
