"""The loader's checks beyond the keys: what starting the agent would otherwise meet."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.config import (
    ConfigError,
    host_problem,
    load_config,
    parse_config,
    topic_name_problem,
    utf8_problem,
)
from drivers.base import DeviceCommon
from drivers.modbus.config import ModbusDevice


def problems(text: str, simulate: bool | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.yaml", simulate=simulate)
    return info.value.problems


def device(tags: str = "[{name: t, address: 0}]", extra: str = "") -> str:
    return (
        "devices:\n"
        f"  - {{name: plc, protocol: modbus, host: 127.0.0.1, port: 502{extra}, tags: {tags}}}\n"
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("temp_1", None),
        ("Ofen Zone 2 °C", None),
        ("", "an empty name makes an empty topic level"),
        (
            "a+b",
            "'a+b': '+' (an MQTT wildcard) is not allowed in a name that goes into MQTT topics",
        ),
        ("a#", "'a#': '#' (an MQTT wildcard) is not allowed in a name that goes into MQTT topics"),
        (
            "a/b",
            "'a/b': '/' (it would add a topic level) is not allowed in a name that goes into "
            "MQTT topics",
        ),
        ("a\x00", "'a\\x00': NUL (U+0000) is not allowed in MQTT strings"),
        ("a\x1f", "'a\\x1f': control character U+001F is not allowed in MQTT strings"),
        ("a\x85", "'a\\x85': control character U+0085 is not allowed in MQTT strings"),
        ("a\ufffe", "'a\\ufffe': noncharacter U+FFFE is not allowed in MQTT strings"),
        ("a\ud800", "'a\\ud800': not valid Unicode (lone surrogate U+D800)"),
    ],
)
def test_topic_names(name: str, expected: str | None) -> None:
    assert topic_name_problem(name) == expected


def test_utf8_allows_what_mqtt_allows() -> None:
    assert utf8_problem("plant/α/$x+#") is None  # wildcards are a topic matter, not UTF-8's
    assert utf8_problem("日本語 🙂") is None


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("[::1]", True),
        ("plc-1.line4.example", True),
        ("plc_1", True),
        ("broker.", True),
        ("no such host", False),
        ("-plc", False),
        ("a..b", False),
        ("", False),
        ("x" * 64, False),
    ],
)
def test_host_names(host: str, ok: bool) -> None:
    assert (host_problem(host) is None) == ok


def test_tag_names_matter_only_where_they_reach_a_topic() -> None:
    text = "agent: {id: gw}\n" + device("[{name: a+b, address: 0}]")
    parse_config(text)  # device layout: tag names are only in the JSON body
    assert problems(
        text.replace("agent: {id: gw}\n", "agent: {id: gw}\nmqtt: {layout: tag}\n")
    ) == [
        "c.yaml:4 devices[0].tags[0].name: 'a+b': '+' (an MQTT wildcard) is not allowed in a "
        "name that goes into MQTT topics"
    ]


def test_site_matters_only_when_a_template_uses_it() -> None:
    text = "agent: {id: gw, site: a/b}\n" + device()
    parse_config(text)
    assert problems(text + "mqtt: {topic: 'x/{site}/{device}'}\n") == [
        "c.yaml:1 agent.site: 'a/b': '/' (it would add a topic level) is not allowed in a name "
        "that goes into MQTT topics"
    ]


def test_status_topics_are_checked_too() -> None:
    text = "agent: {id: gw}\nmqtt: {device_status_topic: 'st/#/{device}'}\n" + device()
    assert problems(text) == [
        "c.yaml:2 mqtt.device_status_topic: 'st/#/{device}': '#' (an MQTT wildcard) is not "
        "allowed in a topic"
    ]


def test_sparkplug_ids() -> None:
    text = (
        "agent: {id: gw}\nmqtt:\n  layout: sparkplug\n"
        '  sparkplug: {group_id: "plant\\u0001"}\n' + device("[{name: a+b/c#, address: 0}]")
    )
    # Metric names may hold '/', '+' and '#' (they are not topic levels); the group id may not.
    assert problems(text) == [
        "c.yaml:4 mqtt.sparkplug.group_id: Sparkplug id 'plant\\x01': control character "
        "U+0001 is not allowed in MQTT strings"
    ]


def test_start_checks_come_with_the_other_problems() -> None:
    text = (
        "agent: {id: gw}\nmqtt: {layout: tag, port: 0}\n"
        "devices:\n"
        "  - {name: plc, protocol: modbus, host: 127.0.0.1, max_registers_per_request: 1,\n"
        "     tags: [{name: f, address: 0, type: float32}, {name: 'x#', address: 9}]}\n"
        "  - {name: bad, protocol: modbus, tags: []}\n"
    )
    assert problems(text) == [
        "c.yaml:2 mqtt.port: Input should be greater than or equal to 1",
        "c.yaml:5 devices[0].tags[0].type: tag 'f': a float32 of 2 registers is larger than "
        "the 1 registers this device allows per request: raise the device's "
        "max_registers_per_request to at least 2",
        "c.yaml:6 devices[1]: `host` is required (or `link` for a unit on a shared link)",
        "c.yaml:6 devices[1].tags: List should have at least 1 item after validation, not 0",
    ]


def test_port_0_depends_on_the_mode() -> None:
    text = "agent: {id: gw}\n" + device(extra="").replace("port: 502", "port: 0")
    parse_config(text)  # mode unknown (a reload, a library caller): not judged
    parse_config(text, simulate=True)
    assert problems(text, simulate=False) == [
        "c.yaml:3 devices[0].port: port 0 is only for simulator mode (run --simulate)"
    ]


def test_non_finite_scale() -> None:
    text = "agent: {id: gw}\n" + device("[{name: t, address: 0, offset: -.inf}]")
    assert problems(text) == [
        "c.yaml:3 devices[0].tags[0].offset: -inf is not a finite number (every value would be bad)"
    ]


def test_the_hook_is_protocol_neutral() -> None:
    assert DeviceCommon.check is not ModbusDevice.check
    plain = DeviceCommon(name="d")
    assert plain.check(simulate=False) == []


def test_a_valid_file_takes_the_fast_path_and_stays_valid() -> None:
    tags = ", ".join(f"{{name: t{i}, address: {i}}}" for i in range(500))
    config = parse_config("agent: {id: gw}\nmqtt: {layout: tag}\n" + device(f"[{tags}]"))
    assert len(getattr(config.devices[0], "tags", [])) == 500


async def test_a_reload_to_a_file_run_could_not_start_changes_nothing(tmp_path: Path) -> None:
    """The issue's case: a reload to a float64 tag with max_registers_per_request: 2
    used to stop the device and never restart it."""
    from agent.buffer.memory import MemoryBuffer
    from agent.publish.fake import FakePublisher
    from agent.runtime import Agent

    path = tmp_path / "agent.yaml"
    body = (
        "agent: {id: gw}\nbuffer: {kind: memory}\ndevices:\n"
        "  - {name: plc, protocol: modbus, host: 127.0.0.1, port: 1, timeout_s: 0.1,\n"
        "     backoff_min_s: 0.05, backoff_max_s: 0.1, tags: [{name: t, address: 0}]}\n"
    )
    path.write_text(body)
    config = load_config(path)
    agent = Agent(
        config, publisher=FakePublisher(), buffer=MemoryBuffer(config.buffer), config_path=path
    )
    task = asyncio.create_task(agent.run())
    try:
        async with asyncio.timeout(20):
            while "plc" not in agent.devices:
                await asyncio.sleep(0.02)
        poller = agent.devices["plc"].poller
        path.write_text(
            body.replace(
                "tags: [{name: t, address: 0}]",
                "max_registers_per_request: 2,\n     tags: [{name: t, address: 0, type: float64}]",
            )
        )
        result = await agent.reload()
        assert not result.ok
        assert result.problems == [
            f"{path}:6 devices[0].tags[0].type: tag 't': a float64 of 4 registers is larger "
            "than the 2 registers this device allows per request: raise the device's "
            "max_registers_per_request to at least 4"
        ]
        assert agent.devices["plc"].poller is poller
        assert not agent.devices["plc"].task.done()
    finally:
        agent.stop()
        await task


def test_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("agent: {id: gw}\n# Öl\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}:2 not UTF-8 text (invalid continuation byte at byte 18); save it as UTF-8"
    ]


def test_a_tag_name_that_would_start_the_topic_with_a_dollar() -> None:
    text = "agent: {id: gw}\nmqtt: {layout: tag, topic_tag: '{tag}/{device}'}\n" + device(
        "[{name: $t, address: 0}]"
    )
    assert problems(text) == [
        "c.yaml:4 devices[0].tags[0].name: the topic would start with '$' (reserved for the broker)"
    ]
    parse_config(text.replace("'{tag}/{device}'", "'x/{tag}/{device}'"))
