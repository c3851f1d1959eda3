"""ModbusDriver on a shared link (RTU framing) over a scripted line: values decoded
with the configured types and byte orders, exception answers, noise and silence."""

from __future__ import annotations

from typing import Any

import pytest

from drivers.base import DriverUnavailable, Scalar
from drivers.links import Link, SerialLink, TcpGatewayLink
from drivers.modbus.codec import ValueSpec, encode
from drivers.modbus.config import ModbusDevice
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.rtu import encode_answer
from tests.support.scripted_line import ScriptedLine

TAGS: list[dict[str, Any]] = [
    {"name": "f", "address": 0, "type": "float32", "byte_order": "CDAB"},
    {"name": "d", "address": 2, "type": "float64", "byte_order": "DCBA"},
    {"name": "i", "address": 6, "type": "int16"},
    {"name": "u", "address": 7, "type": "uint32", "byte_order": "BADC"},
    {"name": "s", "address": 9, "type": "string", "length": 2},
    {"name": "c", "table": "coil", "address": 3, "type": "bool"},
]
VALUES: dict[str, Scalar] = {"f": 12.5, "d": -1.25, "i": -7, "u": 123456789, "s": "OK", "c": True}


def image() -> list[int]:
    regs = [0] * 11
    for tag in TAGS[:-1]:
        spec = ValueSpec(tag["type"], tag.get("byte_order", "ABCD"), length=tag.get("length"))
        words = encode(spec, VALUES[tag["name"]])
        regs[tag["address"] : tag["address"] + len(words)] = words
    return regs


class Units:
    """Units 1 and 2 serve `image()`; anything else is silent. `spoil` damages answers."""

    def __init__(self) -> None:
        self.regs = image()
        self.spoil: list[str] = []
        self.exception: int = 0

    def __call__(self, req: bytes) -> list[bytes] | None:
        if req[0] not in (1, 2):
            return None
        fc = req[1]
        start, count = int.from_bytes(req[2:4], "big"), int.from_bytes(req[4:6], "big")
        if self.exception:
            return [encode_answer(req, None, exception=self.exception)]
        if fc == 1:
            values = [1 if a == 3 else 0 for a in range(start, start + count)]
        else:
            values = self.regs[start : start + count]
        answer = encode_answer(req, values)
        if self.spoil and fc == 3:
            kind = self.spoil.pop(0)
            if kind == "crc":
                answer = answer[:-1] + bytes((answer[-1] ^ 1,))
            elif kind == "value":  # one data bit flipped: the CRC must catch it
                answer = answer[:3] + bytes((answer[3] ^ 0x40,)) + answer[4:]
        return [answer]


def device(unit: int = 1, retries: int = 0, **extra: Any) -> ModbusDevice:
    return ModbusDevice.model_validate(
        {
            "name": f"unit{unit}",
            "protocol": "modbus",
            "link": "line1",
            "unit_id": unit,
            "timeout_s": 0.05,
            "retries": retries,
            "tags": TAGS,
            **extra,
        }
    )


def make(units: Units, **dev: Any) -> tuple[ModbusDriver, Link, ScriptedLine]:
    line = ScriptedLine(units)
    link = Link(
        "line1",
        SerialLink(type="serial", port="/dev/fake", suspend_min_s=0.05),
        transport_factory=lambda: line,
    )
    return ModbusDriver(device(**dev), link=link), link, line


async def test_values_decode_for_every_type_and_order() -> None:
    driver, _, line = make(Units())
    await driver.connect()
    readings = await driver.read("default")
    assert {r.tag: r.value for r in readings} == VALUES
    assert all(r.quality == "good" for r in readings)
    assert len(line.writes) == 2  # one block of registers, one of coils
    await driver.close()


async def test_an_exception_answer_is_bad_with_its_code() -> None:
    units = Units()
    units.exception = 4
    driver, _, _ = make(units)
    await driver.connect()
    readings = await driver.read("default")
    assert {(r.quality, r.reason, r.code) for r in readings} == {
        ("bad", "modbus exception 4 (server device failure)", 4)
    }


@pytest.mark.parametrize("kind", ["crc", "value"])
async def test_noise_makes_the_block_bad_never_a_wrong_value(kind: str) -> None:
    units = Units()
    units.spoil = [kind]
    driver, link, _ = make(units)
    await driver.connect()
    readings = {r.tag: r for r in await driver.read("default")}
    for name in ("f", "d", "i", "u", "s"):
        assert (readings[name].quality, readings[name].reason, readings[name].value) == (
            "bad",
            "crc error",
            None,
        )
    assert readings["c"].value is True  # the other block of the poll is unaffected
    assert link.stats.frame_errors == 1
    # Resynchronised: the next poll is all good.
    assert all(r.quality == "good" for r in await driver.read("default"))


async def test_retries_recover_from_noise_within_the_poll() -> None:
    units = Units()
    units.spoil = ["crc"]
    driver, _, line = make(units, retries=1)
    await driver.connect()
    readings = await driver.read("default")
    assert {r.tag: r.value for r in readings} == VALUES
    assert len(line.writes) == 3


async def test_a_silent_unit_raises_timeout_then_is_suspended() -> None:
    driver, _, line = make(Units(), unit=9)
    await driver.connect()
    with pytest.raises(DriverUnavailable) as err:
        await driver.read("default")
    assert err.value.reason == "timeout"
    assert "link line1 unit 9" in str(err.value)
    sent = len(line.writes)
    with pytest.raises(DriverUnavailable) as again:
        await driver.read("default")
    assert again.value.reason == "timeout"
    assert "suspended" in str(again.value)
    assert len(line.writes) == sent  # nothing sent to a suspended unit


async def test_close_releases_the_link_but_other_units_keep_it() -> None:
    units = Units()
    line = ScriptedLine(units)
    link = Link(
        "line1", SerialLink(type="serial", port="/dev/fake"), transport_factory=lambda: line
    )
    a, b = ModbusDriver(device(1), link=link), ModbusDriver(device(2), link=link)
    await a.connect()
    await b.connect()
    await a.close()
    assert line.closed == 0
    assert all(r.quality == "good" for r in await b.read("default"))
    await b.close()
    assert line.closed == 1


def test_a_device_on_a_link_needs_the_link() -> None:
    with pytest.raises(ValueError, match="device 'unit1' is on link 'line1': pass the shared Link"):
        ModbusDriver(device())


def test_transport_must_match_the_link() -> None:
    link = Link("line1", TcpGatewayLink(type="tcp", host="127.0.0.1"))
    with pytest.raises(ValueError, match="transport rtu does not match link 'line1' of type tcp"):
        ModbusDriver(device(transport="rtu"), link=link)
