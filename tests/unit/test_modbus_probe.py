"""`edge-agent probe`'s decodings: every type in every byte order, side by side."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.base import Scalar
from drivers.modbus.codec import ValueSpec, encode
from drivers.modbus.config import ByteOrder, DataType
from drivers.modbus.probe import ORDERS, decode_all, format_decodings, parse_units

CASES: list[tuple[DataType, Scalar]] = [
    ("uint32", 3_000_000_001),
    ("int32", -123_456_789),
    ("float32", 12.5),
    ("uint64", 18_000_000_000_000_000_001),
    ("int64", -9_000_000_000_000_000_001),
    ("float64", -1234.5678),
]


def table_cells(text: str) -> dict[tuple[int, str], list[str]]:
    """(address, short type) → the four cells (ABCD, CDAB, BADC, DCBA) of the text."""
    cells: dict[tuple[int, str], list[str]] = {}
    addr = -1
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 6 and parts[0].isdigit() and parts[1][0] in "uif":
            addr = int(parts[0])
            cells[(addr, parts[1])] = parts[2:]
        elif len(parts) == 5 and parts[0] in ("u32", "i32", "f32", "u64", "i64", "f64"):
            cells[(addr, parts[0])] = parts[1:]
    return cells


@pytest.mark.parametrize(("data_type", "value"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("order", ORDERS)
def test_every_type_and_order_is_found_where_it_was_written(
    data_type: DataType, value: Scalar, order: ByteOrder
) -> None:
    words = [0x1111, *encode(ValueSpec(data_type, order), value), 0x2222]
    found = decode_all(40, words)
    assert found[(41, data_type, order)] == value
    short = {"uint32": "u32", "int32": "i32", "float32": "f32"}.get(data_type)
    short = short or {"uint64": "u64", "int64": "i64", "float64": "f64"}[data_type]
    column = ORDERS.index(order)
    shown = table_cells(format_decodings(40, words))[(41, short)][column]
    if isinstance(value, float):
        assert float(shown) == pytest.approx(value, rel=1e-6)
    else:
        assert int(shown) == value


@given(
    data_type=st.sampled_from(["uint32", "int32", "uint64", "int64"]),
    order=st.sampled_from(ORDERS),
    data=st.data(),
)
def test_integers_round_trip_through_the_probe(
    data_type: DataType, order: ByteOrder, data: st.DataObject
) -> None:
    bits = 32 if data_type.endswith("32") else 64
    signed = data_type.startswith("int")
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    value = data.draw(st.integers(lo, hi))
    words = encode(ValueSpec(data_type, order), value)
    assert decode_all(0, words)[(0, data_type, order)] == value


def test_sixteen_bit_ascii_and_bits_columns() -> None:
    text = format_decodings(0, [0x4148, 0xFFF9])
    assert "      0  0x4148  16712   16712  AH HA  0100 0001 0100 1000" in text
    assert "      1  0xFFF9  65529      -7  .. ..  1111 1111 1111 1001" in text
    assert "ascii ABCD/CDAB (high byte first): 'AH..'" in text
    assert "ascii BADC/DCBA (low byte first):  'HA..'" in text


def test_strings_in_both_byte_orders() -> None:
    cases: list[tuple[ByteOrder, str]] = [("ABCD", "'PUMP-7'"), ("BADC", "'UPPM7-'")]
    for order, shown in cases:
        words = encode(ValueSpec("string", order, length=3), "PUMP-7")
        text = format_decodings(0, words)
        assert f"ascii ABCD/CDAB (high byte first): {shown}" in text


def test_bits_of_a_coil_range() -> None:
    text = format_decodings(16, [1, 0, 1] + [0] * 14, table="coil")
    assert text.splitlines() == [
        "coil 16..32: 17 bits",
        "     16: 1010000000000000",
        "     32: 0",
    ]


def test_nan_is_shown_not_raised() -> None:
    words = encode(ValueSpec("float32"), math.nan)
    assert "nan" in format_decodings(0, words)


def test_unit_ranges() -> None:
    assert parse_units("1-3,7, 10-11") == [1, 2, 3, 7, 10, 11]
    with pytest.raises(ValueError, match="units are 0-255"):
        parse_units("250-260")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "h", "--unit", "999"], "probe: --unit 999: unit ids are 0-255"),
        (
            ["--serial", "/dev/x", "--address", "abc"],
            "probe: --address 'abc': a 0-based number, or a classic address like 40001",
        ),
        (["--host", "h", "--timeout-s", "0"], "probe: --timeout-s 0: must be more than 0"),
        (
            ["--serial", "/dev/x", "--baud", "5"],
            "probe: baud: Input should be greater than or equal to 300",
        ),
        (["--rtu-over-tcp", "nohost"], "probe: --rtu-over-tcp 'nohost': give HOST:PORT"),
        (
            [],
            "probe: say where the device is: --host, --serial, --rtu-over-tcp, or "
            "CONFIG --device/--link",
        ),
        (["--device", "d"], "probe: --device and --link need the CONFIG file"),
        (
            ["--host", "h", "--address", "40001", "--table", "input"],
            "probe: address 40001 is in table holding, not input",
        ),
        (
            ["--host", "h", "--scan", "--units", "1-300"],
            "probe: unit range '1-300': units are 0-255",
        ),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import build_parser

    # Through the parser, not main(): main() configures the process' logging.
    parsed = build_parser().parse_args(["probe", *args])
    assert parsed.func(parsed) == 2
    assert capsys.readouterr().err == message + "\n"
