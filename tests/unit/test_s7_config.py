"""S7 config: address notation, type/size-letter agreement, TSAPs, errors with file:line."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from agent.config import ConfigError, parse_config
from drivers.s7.config import Address, S7Device, S7Tag, parse_address, parse_tsap


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("DB1.DBX0.3", Address("DB", 1, 0, 3, "X")),
        ("%DB10.DBW20", Address("DB", 10, 20, None, "W")),
        ("db2.dbd8", Address("DB", 2, 8, None, "D")),
        ("DB65535.DBB0", Address("DB", 65535, 0, None, "B")),
        ("M10.7", Address("M", 0, 10, 7, "X")),
        ("MX10.7", Address("M", 0, 10, 7, "X")),
        ("%MW10", Address("M", 0, 10, None, "W")),
        ("MD20", Address("M", 0, 20, None, "D")),
        ("IB0", Address("I", 0, 0, None, "B")),
        ("E1.2", Address("I", 0, 1, 2, "X")),
        ("EW4", Address("I", 0, 4, None, "W")),
        ("Q0.0", Address("Q", 0, 0, 0, "X")),
        ("A3.1", Address("Q", 0, 3, 1, "X")),
        ("AD8", Address("Q", 0, 8, None, "D")),
    ],
)
def test_addresses_as_tia_portal_writes_them(text: str, expected: Address) -> None:
    assert parse_address(text) == expected


def test_canonical_text() -> None:
    assert parse_address("%db1.dbx0.3").text() == "DB1.DBX0.3"
    assert parse_address("EW4").text() == "IW4"
    assert parse_address("A3.1").text() == "Q3.1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("DB0.DBW0", "DB numbers are 1-65535"),
        ("DB1.DBX0", "a bit address needs .<bit> (0-7), e.g. M10.7"),
        ("M10", "a bit address needs .<bit> (0-7), e.g. M10.7"),
        ("M1.8", "bit numbers are 0-7"),
        ("MW10.1", "only X (bit) addresses have a .<bit>"),
        ("T5", "write DB<n>.DBX<byte>.<bit>"),
        ("DB1.DBW", "write DB<n>.DBX<byte>.<bit>"),
        ("MB9999999", "byte offset above 2097151"),
    ],
)
def test_bad_addresses_say_how_to_write_them(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="address") as info:
        parse_address(text)
    assert message in str(info.value)
    assert repr(text) in str(info.value)


def tag(**kw: Any) -> S7Tag:
    return S7Tag.model_validate({"name": "t", **kw})


def test_type_defaults_follow_the_size_letter() -> None:
    assert [tag(address=a).resolved_type() for a in ("M0.0", "MB0", "MW0", "MD0")] == [
        "bool",
        "byte",
        "int",
        "dint",
    ]
    assert tag(address="DB1.DBB0", type="string", length=20).size() == 22
    assert tag(address="DB1.DBB0", type="string").size() == 256
    assert tag(address="DB1.DBB0", type="lreal").size() == 8


@pytest.mark.parametrize(
    ("address", "type_", "hint"),
    [
        ("DB1.DBW0", "real", "a double-word address such as DB1.DBD0 or MD0"),
        ("DB1.DBD0", "int", "a word address such as DB1.DBW0 or MW0"),
        ("MB0", "bool", "a bit address such as DB1.DBX0.0 or M0.0"),
        ("DB1.DBX0.0", "byte", "a byte address such as DB1.DBB0 or MB0"),
        ("DB1.DBD0", "lreal", "a byte address such as DB1.DBB0 or MB0"),
    ],
)
def test_size_letter_must_agree_with_the_type(address: str, type_: str, hint: str) -> None:
    with pytest.raises(ValidationError) as info:
        tag(address=address, type=type_)
    assert f"type {type_} at {address!r}: write {hint}" in str(info.value)


def test_length_only_for_strings() -> None:
    with pytest.raises(ValidationError, match="'length' is only for type string"):
        tag(address="DB1.DBW0", type="int", length=4)


def dev(**kw: Any) -> S7Device:
    return S7Device.model_validate(
        {
            "name": "p",
            "protocol": "s7",
            "host": "h",
            "tags": [{"name": "t", "address": "MW0"}],
            **kw,
        }
    )


def test_tsaps_from_rack_slot_and_connection_type() -> None:
    assert dev().tsaps() == (0x0100, 0x0101)
    assert dev(rack=0, slot=2).tsaps() == (0x0100, 0x0102)
    assert dev(rack=1, slot=3, connection_type="op").tsaps() == (0x0100, 0x0223)
    assert dev(connection_type="basic").tsaps() == (0x0100, 0x0301)
    assert dev(remote_tsap="03.01", local_tsap="10.00").tsaps() == (0x1000, 0x0301)


def test_tsap_notations() -> None:
    assert [parse_tsap(t) for t in ("01.02", "0102", "0x0102", "4D.57")] == [
        0x0102,
        0x0102,
        0x0102,
        0x4D57,
    ]
    with pytest.raises(ValueError, match="write two hexadecimal bytes"):
        parse_tsap("01.0G")


def test_remote_tsap_and_rack_slot_are_exclusive() -> None:
    with pytest.raises(ValidationError, match="remote_tsap replaces slot: give one or the other"):
        dev(remote_tsap="03.01", slot=2)


def test_config_errors_have_file_and_line() -> None:
    text = """\
agent:
  id: gw
devices:
  - name: plc
    protocol: s7
    host: 10.0.0.1
    tags:
      - name: a
        address: DB1.DBW0
        type: real
      - name: b
        address: MW10.1
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "line4.yaml")
    problems = info.value.problems
    assert len(problems) == 2
    assert problems[0].startswith("line4.yaml:8 devices[0].tags[0]")
    assert "type real at 'DB1.DBW0': write a double-word address" in problems[0]
    assert problems[1].startswith("line4.yaml:12 devices[0].tags[1].address")
    assert "only X (bit) addresses have a .<bit>" in problems[1]


def test_check_points_at_a_string_too_long_for_the_pdu_and_at_port_0() -> None:
    device = S7Device.model_validate(
        {
            "name": "p",
            "protocol": "s7",
            "host": "h",
            "port": 0,
            "pdu_size": 240,
            "tags": [
                {"name": "ok", "address": "MW0"},
                {"name": "s", "address": "DB1.DBB0", "type": "string"},
            ],
        }
    )
    assert device.check(simulate=False) == [
        (("port",), "port 0 is only for simulator mode (run --simulate)"),
        (
            ("tags", 1, "length"),
            "a string of 256 bytes is larger than the 222 bytes one answer carries at "
            "pdu_size 240: declare a shorter length",
        ),
    ]
    assert device.check(simulate=True) == device.check(simulate=False)[1:]
