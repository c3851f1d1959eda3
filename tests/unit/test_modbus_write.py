"""Modbus write planning and the frames of write answers (pure code)."""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.modbus import rtu
from drivers.modbus.codec import CodecError, ValueSpec, decode
from drivers.modbus.config import ModbusTag
from drivers.modbus.driver import FRAME_INCOMPLETE, FRAME_OK, check_frame, mbap_request
from drivers.modbus.write import WriteOp, merge_bit, plan_write


def tag(**fields: Any) -> ModbusTag:
    return ModbusTag.model_validate({"name": "t", "address": 100, **fields})


def test_function_codes_by_table_type_and_option() -> None:
    assert plan_write(tag(type="bool"), True) == WriteOp(5, 100, (1,))
    assert plan_write(tag(type="bool"), False, write_functions="multiple") == WriteOp(15, 100, (0,))
    assert plan_write(tag(type="int16"), -2) == WriteOp(6, 100, (0xFFFE,))
    assert plan_write(tag(type="uint16"), 7, write_functions="multiple") == WriteOp(16, 100, (7,))
    assert plan_write(tag(type="uint32", byte_order="CDAB"), 0x11223344) == WriteOp(
        16, 100, (0x3344, 0x1122)
    )
    assert plan_write(tag(type="bit", bit=4), True) == WriteOp(22, 100, (0xFFEF, 0x0010))
    assert plan_write(tag(type="bit", bit=4), False) == WriteOp(22, 100, (0xFFEF, 0))
    assert plan_write(tag(type="bit", bit=4), True, bit_write="read_modify_write") is None
    assert merge_bit(tag(type="bit", bit=4), True, 0x8001, "single") == WriteOp(6, 100, (0x8011,))
    assert merge_bit(tag(type="bit", bit=15), False, 0x8001, "multiple") == WriteOp(
        16, 100, (0x0001,)
    )


def test_pdus() -> None:
    assert WriteOp(5, 1, (1,)).pdu() == bytes.fromhex("05 0001 ff00")
    assert WriteOp(5, 1, (0,)).pdu() == bytes.fromhex("05 0001 0000")
    assert WriteOp(6, 2, (0xABCD,)).pdu() == bytes.fromhex("06 0002 abcd")
    assert WriteOp(15, 3, (1, 0, 1, 1, 0, 0, 0, 0, 1)).pdu() == bytes.fromhex(
        "0f 0003 0009 02 0d 01"
    )
    assert WriteOp(16, 4, (1, 2)).pdu() == bytes.fromhex("10 0004 0002 04 0001 0002")
    assert WriteOp(22, 5, (0xFFFE, 1)).pdu() == bytes.fromhex("16 0005 fffe 0001")
    with pytest.raises(ValueError, match="not a write"):
        WriteOp(3, 0, (1,)).pdu()
    assert WriteOp(16, 4, (1, 2)).describe() == (
        "function 16 (write multiple registers) at holding 4, 2 registers"
    )


@pytest.mark.parametrize(
    ("fields", "value", "message"),
    [
        ({"type": "int16"}, 40000, "does not fit int16"),
        ({"type": "int16"}, 2.0, "needs an integer"),
        ({"type": "uint64"}, -1, "does not fit uint64"),
        ({"type": "float32"}, 3.5e38, "does not fit float32"),
        ({"type": "float32"}, -math.inf, "not a finite number"),
        ({"type": "float64"}, "1", "needs a number"),
        ({"type": "bool"}, 1, "needs true or false"),
        ({"type": "string", "length": 1}, "abc", "longer than 2"),
        ({"type": "string", "length": 1}, 5, "needs a string"),
    ],
)
def test_values_the_type_cannot_hold(fields: dict[str, Any], value: Any, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        plan_write(tag(**fields), value)


ORDERS = st.sampled_from(["ABCD", "BADC", "CDAB", "DCBA"])


@given(st.integers(-(1 << 63), (1 << 63) - 1), ORDERS)
def test_an_int64_write_decodes_to_the_value(value: int, order: str) -> None:
    t = tag(type="int64", byte_order=order)
    op = plan_write(t, value)
    assert op is not None
    assert op.function_code == 16
    assert len(op.words) == 4
    assert decode(ValueSpec.from_tag(t), op.words) == value


@given(st.floats(width=32, allow_nan=False, allow_infinity=False), ORDERS)
def test_a_float32_write_decodes_to_the_value(value: float, order: str) -> None:
    t = tag(type="float32", byte_order=order)
    op = plan_write(t, value)
    assert op is not None
    assert decode(ValueSpec.from_tag(t), op.words) == value
    # and the words are the value's IEEE bytes in the named order, checked by hand
    a, b, c, d = struct.pack(">f", value)
    layout = {
        "ABCD": (a, b, c, d),
        "BADC": (b, a, d, c),
        "CDAB": (c, d, a, b),
        "DCBA": (d, c, b, a),
    }
    x = layout[order]
    assert op.words == ((x[0] << 8) | x[1], (x[2] << 8) | x[3])


# ------------------------------------------------------------------ answers to writes


def test_tcp_write_answer_must_echo_the_request() -> None:
    request = mbap_request(7, 1, WriteOp(16, 10, (1, 2)).pdu())
    echo = request[:4] + (6).to_bytes(2, "big") + request[6:12]
    assert check_frame(echo, request) == FRAME_OK
    assert check_frame(echo[:9], request) == FRAME_INCOMPLETE
    wrong_qty = echo[:-1] + b"\x03"
    assert check_frame(wrong_qty, request) == "protocol error: wrong echo"
    long = echo[:4] + (7).to_bytes(2, "big") + echo[6:] + b"\x00"
    assert check_frame(long, request) == "protocol error: wrong length"
    exception = request[:4] + (3).to_bytes(2, "big") + bytes((1, 0x90, 2))
    assert check_frame(exception, request) == FRAME_OK
    other_fc = echo[:7] + b"\x06" + echo[8:]
    assert check_frame(other_fc, request) == "protocol error: wrong function code"
    mask = mbap_request(8, 1, WriteOp(22, 10, (0xFFFE, 1)).pdu())
    assert check_frame(mask, mask) == FRAME_OK  # 22 answers with the whole request


def test_rtu_write_answer_must_echo_the_request() -> None:
    request = rtu.write_request(3, WriteOp(6, 10, (0x1234,)).pdu())
    answer = rtu.encode_answer(request, None)
    assert answer == request  # 6 answers with the request itself
    assert rtu.check_rtu_frame(answer, request) == FRAME_OK
    assert rtu.check_rtu_frame(answer[:5], request) == FRAME_INCOMPLETE
    assert rtu.parse_answer(answer, request) == (None, [])
    wrong = rtu.with_crc(answer[:5] + b"\x35")
    assert rtu.check_rtu_frame(wrong, request) == "protocol error: wrong echo"
    assert rtu.check_rtu_frame(answer[:-1] + bytes((answer[-1] ^ 1,)), request) == "crc error"
    multi = rtu.write_request(3, WriteOp(16, 10, (1, 2, 3)).pdu())
    echo = rtu.encode_answer(multi, None)
    assert len(echo) == 8
    assert rtu.check_rtu_frame(echo, multi) == FRAME_OK
    refused = rtu.encode_answer(multi, None, exception=2)
    assert rtu.check_rtu_frame(refused, multi) == FRAME_OK
    assert rtu.parse_answer(refused, multi) == (2, [])
    mask = rtu.write_request(3, WriteOp(22, 10, (0xFFFE, 1)).pdu())
    assert rtu.check_rtu_frame(rtu.encode_answer(mask, None), mask) == FRAME_OK
    with pytest.raises(ValueError, match="bad write request"):
        rtu.write_request(3, bytes((3, 0, 0, 0, 1)))
