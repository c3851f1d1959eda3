"""MELSEC addresses as users write them, per series, and the config's error messages."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from agent.config import ConfigError, parse_config
from drivers.melsec.config import MelsecDevice, Series, parse_address


@pytest.mark.parametrize(
    ("text", "series", "name", "number", "bit"),
    [
        ("D100", "q", "D", 100, None),
        ("d100", "q", "D", 100, None),
        ("M0", "iq-f", "M", 0, None),
        ("X1F", "q", "X", 0x1F, None),
        ("X1F", "iq-r", "X", 0x1F, None),
        ("X17", "iq-f", "X", 0o17, None),  # octal on iQ-F: the 16th input
        ("X17", "q", "X", 0x17, None),  # the same text is the 24th input on Q
        ("Y777", "iq-f", "Y", 0o777, None),
        ("W1A0", "q", "W", 0x1A0, None),
        ("W1A0", "iq-f", "W", 0x1A0, None),  # W is hexadecimal everywhere
        ("B0", "l", "B", 0, None),
        ("ZR100", "iq-r", "ZR", 0x100, None),
        ("R32767", "iq-f", "R", 32767, None),
        ("SM400", "q", "SM", 400, None),
        ("SD520", "iq-f", "SD", 520, None),
        ("TN3", "q", "TN", 3, None),
        ("CN10", "q", "CN", 10, None),
        ("L9", "q", "L", 9, None),
        ("SB1F", "q", "SB", 0x1F, None),
        ("SW10", "q", "SW", 0x10, None),
        ("D100.F", "q", "D", 100, 15),
        ("W10.3", "iq-f", "W", 0x10, 3),
    ],
)
def test_addresses_parse_as_gx_works_writes_them(
    text: str, series: Series, name: str, number: int, bit: int | None
) -> None:
    addr = parse_address(text, series)
    assert (addr.kind.name, addr.number, addr.bit) == (name, number, bit)


@pytest.mark.parametrize(
    ("text", "series", "message"),
    [
        ("X18", "iq-f", "address 'X18': '18' is not an octal X number (X and Y are octal on iq-f)"),
        ("XG", "q", "address 'XG': 'G' is not a hexadecimal X number (X and Y are hexadecimal"),
        ("D1A", "q", "address 'D1A': '1A' is not a decimal D number"),
        ("ZR0", "iq-f", "address 'ZR0': iQ-F has no ZR: use R (R0-R32767)"),
        ("M0.1", "q", "address 'M0.1': M is a bit device; '.n' is for words"),
        ("D0.G", "q", "address 'D0.G': the bit after '.' is one hex digit, 0-F"),
        ("Q100", "q", "address 'Q100': expected a device name"),
        ("D", "q", "address 'D': expected a device name"),
        ("D16777216", "q", "device number is above 0XFFFFFF"),
    ],
)
def test_bad_addresses_say_what_is_wrong(text: str, series: Series, message: str) -> None:
    with pytest.raises(ValueError, match=r"^address ") as info:
        parse_address(text, series)
    assert message in str(info.value)


def device(series: str = "q", **tag: Any) -> dict[str, Any]:
    return {
        "name": "plc",
        "protocol": "melsec",
        "series": series,
        "host": "127.0.0.1",
        "port": 5000,
        "tags": [{"name": "t", **tag}],
    }


def test_type_defaults_follow_the_device() -> None:
    dev = MelsecDevice.model_validate(
        {**device(address="D0"), "tags": [{"name": "a", "address": "D0"},
         {"name": "b", "address": "M0"}, {"name": "c", "address": "D0.1"}]}
    )  # fmt: skip
    assert [t.resolved_type() for t in dev.tags] == ["int16", "bool", "bool"]
    assert dev.bit_cap() == 7168
    assert MelsecDevice.model_validate(device("iq-f", address="M0")).bit_cap() == 3584
    assert dev.monitoring_timer() == 4  # 1 s in units of 250 ms
    timers = [
        MelsecDevice.model_validate({**device(address="D0"), "timeout_s": t}).monitoring_timer()
        for t in (0.1, 0.3, 0.5, 2.9)
    ]
    assert timers == [1, 1, 2, 11]


@pytest.mark.parametrize(
    ("tag", "message"),
    [
        ({"address": "M0", "type": "int16"}, "M is a bit device (internal relay): use type bool"),
        ({"address": "D0", "type": "bool"}, "type bool needs a bit, e.g. D100.0"),
        ({"address": "D0.1", "type": "int16"}, "'D0.1' is one bit of a word: use type bool"),
        ({"address": "D0", "type": "string"}, "type string needs 'length'"),
        ({"address": "D0", "length": 2}, "'length' is only for type string"),
        ({"address": "X8", "_series": "iq-f"}, "'8' is not an octal X number"),
    ],
)
def test_tag_mistakes_are_refused(tag: dict[str, Any], message: str) -> None:
    series = tag.pop("_series", "q")
    with pytest.raises(ValidationError) as info:
        MelsecDevice.model_validate(device(series, **tag))
    assert message in str(info.value)


def test_config_errors_name_file_line_and_tag() -> None:
    text = """\
agent: {id: gw}
devices:
  - name: plc
    protocol: melsec
    series: iq-f
    host: 127.0.0.1
    port: 5002
    tags:
      - {name: ok, address: X17}
      - {name: wrong, address: X18}
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "line.yaml")
    (problem,) = info.value.problems
    assert problem.startswith("line.yaml:3 devices[0]")
    assert "tags[1] 'wrong': address 'X18': '18' is not an octal X number" in problem


def test_series_is_required_since_it_changes_what_x17_means() -> None:
    text = "agent: {id: gw}\ndevices:\n  - {name: p, protocol: melsec, host: h, port: 1,\n"
    text += "     tags: [{name: x, address: X17}]}\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, "line.yaml")
    assert any("series: required key is missing" in p for p in info.value.problems)
