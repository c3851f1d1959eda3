"""The `links:` section, devices on links, and `plan`'s bus time per link."""

from __future__ import annotations

import pytest

from agent.config import ConfigError, parse_config
from drivers.links import LineTiming, SerialLink
from drivers.modbus.config import ModbusDevice
from drivers.modbus.plan import format_link_plans, link_plan

HEAD = "agent: {id: gw-1}\n"


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "line4.yaml")
    return err.value.problems


def test_every_link_problem_is_reported_at_its_line() -> None:
    text = HEAD + (
        "links:\n"
        "  line1: {type: serial, port: /dev/ttyUSB0, baud: 19200, parity: X}\n"
        "  gw: {type: rtu_ovr_tcp, host: 10.0.0.5}\n"
        "  ok: {type: serial, port: /dev/ttyUSB1, bauds: 9600}\n"
        "devices:\n"
        "  - {name: a, protocol: modbus, link: line1, unit_id: 1, tags: [{name: t, address: 0}]}\n"
        "  - {name: b, protocol: modbus, link: line1, unit_id: 1, tags: [{name: t, address: 0}]}\n"
        "  - {name: c, protocol: modbus, link: nope, tags: [{name: t, address: 0}]}\n"
        "  - {name: d, protocol: modbus, link: line1, unit_id: 4, transport: tcp,"
        " tags: [{name: t, address: 0}]}\n"
        "  - {name: e, protocol: modbus, link: line1, host: x, unit_id: 5,"
        " tags: [{name: t, address: 0}]}\n"
        "  - {name: f, protocol: modbus, tags: [{name: t, address: 0}]}\n"
        "  - {name: g, protocol: modbus, host: x, transport: rtu, tags: [{name: t, address: 0}]}\n"
    )
    assert problems(text) == [
        "line4.yaml:3 links.line1.parity: Input should be 'N', 'E' or 'O'",
        "line4.yaml:4 links.gw.type: link type must be one of: serial, rtu_over_tcp, tcp",
        "line4.yaml:5 links.ok.bauds: unknown key 'bauds'",
        "line4.yaml:8 devices[1].unit_id: unit 1 on link 'line1' is already used by devices[0]",
        "line4.yaml:9 devices[2].link: unknown link 'nope'; defined: gw, line1, ok",
        "line4.yaml:10 devices[3].transport: transport tcp does not match link 'line1' of type "
        "serial (use rtu, or leave transport out)",
        "line4.yaml:11 devices[4].host: `host` and `link` exclude each other (link 'line1')",
        "line4.yaml:12 devices[5]: `host` is required (or `link` for a unit on a shared link)",
        "line4.yaml:13 devices[6]: transport rtu needs a `link`",
    ]


def test_serial_units_are_1_to_247() -> None:
    text = HEAD + (
        "links:\n  line1: {type: serial, port: /dev/ttyUSB0}\n  gw: {type: tcp, host: h}\n"
        "devices:\n"
        "  - {name: a, protocol: modbus, link: line1, unit_id: 0, tags: [{name: t, address: 0}]}\n"
        "  - {name: b, protocol: modbus, link: line1, unit_id: 248, tags: [{name: t, address: 1}]}"
        "\n"
        "  - {name: c, protocol: modbus, link: gw, unit_id: 255, tags: [{name: t, address: 0}]}\n"
    )
    assert problems(text) == [
        "line4.yaml:6 devices[0].unit_id: unit 0 on a serial line: units are 1-247 (0 is "
        "broadcast, which no unit answers; 248-255 are reserved)",
        "line4.yaml:7 devices[1].unit_id: unit 248 on a serial line: units are 1-247 (0 is "
        "broadcast, which no unit answers; 248-255 are reserved)",
    ]


def test_a_disabled_device_may_share_a_unit_id() -> None:
    text = HEAD + (
        "links:\n  line1: {type: serial, port: /dev/ttyUSB0}\n"
        "devices:\n"
        "  - {name: a, protocol: modbus, link: line1, unit_id: 1, tags: [{name: t, address: 0}]}\n"
        "  - {name: b, protocol: modbus, link: line1, unit_id: 1, enabled: false,"
        " tags: [{name: t, address: 0}]}\n"
    )
    config = parse_config(text)
    assert isinstance(config.links["line1"], SerialLink)
    assert config.links["line1"].baud == 19200  # Modbus' usual default, 8E1
    assert config.links["line1"].parity == "E"


def unit(name: str, unit_id: int, interval_s: float, count: int = 10) -> ModbusDevice:
    return ModbusDevice.model_validate(
        {
            "name": name,
            "protocol": "modbus",
            "link": "line1",
            "unit_id": unit_id,
            "interval_s": interval_s,
            "tags": [{"name": f"r{i}", "address": i} for i in range(count)],
        }
    )


def test_bus_time_per_cycle_follows_baud_and_frame_sizes() -> None:
    link = SerialLink(type="serial", port="/dev/ttyUSB0", baud=9600, turnaround_s=0.005)
    devices = [unit(f"m{u}", u, 1.0) for u in range(1, 9)]
    plan = link_plan("line1", link, devices)
    t = LineTiming(9600, "E", 1, 8)
    per_request = t.wire_s(8 + 25) + 2 * t.silence_s + 0.005
    assert plan.cycle_s == pytest.approx(8 * per_request)
    assert plan.load == pytest.approx(8 * per_request / 1.0)
    assert plan.fits
    text, warnings = format_link_plans({"line1": link}, devices)
    assert warnings == []
    assert text.splitlines()[0] == "link line1 (serial /dev/ttyUSB0, 9600 baud, 8 units)"
    assert f"m1 default: 1 request, {per_request * 1000:.1f} ms of bus time every 1 s" in text
    assert f"one cycle of every group: {8 * per_request * 1000:.1f} ms" in text


def test_plan_warns_when_the_intervals_cannot_fit_the_baud() -> None:
    link = SerialLink(type="serial", port="/dev/ttyUSB0", baud=9600)
    devices = [unit(f"m{u}", u, 0.2, count=60) for u in range(1, 11)]
    _, warnings = format_link_plans({"line1": link}, devices)
    plan = link_plan("line1", link, devices)
    assert not plan.fits
    assert warnings == [
        f"link line1: the configured intervals need {100 * plan.load:.0f}% of the line's time at "
        "9600 baud; polls will overrun and be skipped (raise the baud rate, lengthen intervals "
        "or split the line)"
    ]


def test_a_tcp_gateway_without_baud_has_no_bus_time() -> None:
    from drivers.links import TcpGatewayLink

    link = TcpGatewayLink(type="tcp", host="10.0.0.9")
    text, warnings = format_link_plans({"line1": link}, [unit("m1", 1, 0.5)])
    assert "2 requests/s (no serial timing" in text
    assert warnings == []
