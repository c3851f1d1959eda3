"""What `validate` refuses about writes, with file:line like every other config error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import ConfigError, parse_config
from drivers import registry
from drivers.fake import FakeBench


@pytest.fixture(autouse=True)
def fake_protocol() -> Iterator[None]:
    with registry.registered(FakeBench().protocol()):
        yield


def problems(text: str, simulate: bool | None = False) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.yaml", simulate=simulate)
    return info.value.problems


BROKER_OK = """\
mqtt:
  username: edge
  tls: {}
"""


def config(tags: str, *, commands: str = "", mqtt: str = BROKER_OK) -> str:
    return (
        "agent: {id: a1}\n"
        + mqtt
        + commands
        + "devices:\n"
        + "  - name: oven\n"
        + "    protocol: fake\n"
        + "    tags:\n"
        + tags
    )


def test_a_valid_writable_tag() -> None:
    text = config(
        "      - {name: permit, type: bool}\n"
        "      - name: sp\n"
        "        type: int\n"
        "        scale: 0.1\n"
        "        writable: true\n"
        "        write: {min: 0, max: 150.5, max_step: 5, max_per_min: 6, interlock: permit,"
        " tolerance: 0.1}\n",
        commands="commands: {enabled: true}\n",
    )
    cfg = parse_config(text, "c.yaml", simulate=False)
    tag = cfg.devices[0].tags[1]  # type: ignore[attr-defined]
    assert tag.writable
    assert tag.write.interlock == "permit"
    assert cfg.commands.enabled
    assert not parse_config(config("      - {name: t}\n")).commands.enabled  # off by default


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        (
            "      - {name: t, read_only: true, writable: true}\n",
            "c.yaml:9 devices[0].tags[0].writable: tag 't' cannot be written: the tag is read_only",
        ),
        (
            "      - {name: t, write: {max: 3}}\n",
            "c.yaml:9 devices[0].tags[0]: 'write' settings on a tag without writable: true",
        ),
        (
            "      - {name: t, writable: true, write: {min: 5, max: 3}}\n",
            "c.yaml:9 devices[0].tags[0].write: min 5 is larger than max 3",
        ),
        (
            "      - {name: t, type: bool, writable: true, write: {max: 3}}\n",
            "c.yaml:9 devices[0].tags[0].write.max: max is for numeric tags; this one is bool",
        ),
        (
            "      - {name: t, type: str, writable: true, write: {max_step: 3}}\n",
            "c.yaml:9 devices[0].tags[0].write.max_step: max_step is for numeric tags; this one "
            "is string",
        ),
        (
            "      - {name: t, type: bool, writable: true, write: {allowed: [1.5]}}\n",
            "c.yaml:9 devices[0].tags[0].write.allowed[0]: 1.5 is not a bool (true/false) for bool",
        ),
        (
            "      - {name: t, type: int, writable: true, write: {min: 0, allowed: [-1]}}\n",
            "c.yaml:9 devices[0].tags[0].write.allowed[0]: -1 is outside min .. max",
        ),
        (
            "      - {name: t, writable: true, write: {interlock: permit}}\n",
            "c.yaml:9 devices[0].tags[0].write.interlock: interlock 'permit' names no tag of "
            "device 'oven'",
        ),
        (
            "      - {name: t, writable: true, write: {interlock: t}}\n",
            "c.yaml:9 devices[0].tags[0].write.interlock: a tag cannot be its own interlock",
        ),
        (
            "      - {name: t, writable: true, scale: 0}\n",
            "c.yaml:9 devices[0].tags[0].scale: scale 0 cannot be inverted for writes "
            "(writable: true)",
        ),
        (
            "      - {name: t, writable: true, write: {max_per_min: 0}}\n",
            "c.yaml:9 devices[0].tags[0].write.max_per_min: Input should be greater than or "
            "equal to 1",
        ),
    ],
)
def test_tag_problems(tags: str, expected: str) -> None:
    assert problems(config(tags)) == [expected]


def test_limits_outside_what_the_type_holds() -> None:
    # The fake protocol's int is 64 bits; use a scale that makes the range small.
    text = config("      - {name: t, type: int, writable: true, scale: 1e-18, write: {max: 10}}\n")
    assert problems(text) == [
        "c.yaml:9 devices[0].tags[0].write.max: 10 is outside what int64 can hold with this "
        "scale and offset (-9.22337 .. 9.22337)"
    ]


@pytest.mark.parametrize(
    ("mqtt", "expected"),
    [
        (
            "mqtt: {username: edge}\n",
            [
                "c.yaml:3 commands.enabled: commands need a TLS broker connection (mqtt.tls); "
                "plaintext is allowed only in simulator mode"
            ],
        ),
        (
            "mqtt: {tls: {}}\n",
            [
                "c.yaml:3 commands.enabled: commands need an authenticated broker session: set "
                "mqtt.username (and password) or a client certificate (mqtt.tls.cert_file)"
            ],
        ),
        (
            "mqtt: {username: edge, tls: {}, protocol: '3.1.1'}\n",
            [
                "c.yaml:3 commands.enabled: commands need MQTT 5 (request/response properties): "
                "mqtt.protocol '5'"
            ],
        ),
    ],
)
def test_broker_session_problems(mqtt: str, expected: list[str]) -> None:
    text = config("      - {name: t}\n", commands="commands: {enabled: true}\n", mqtt=mqtt)
    assert problems(text) == expected


def test_plaintext_is_allowed_in_simulator_mode_only() -> None:
    text = config("      - {name: t}\n", commands="commands: {enabled: true}\n", mqtt="")
    assert parse_config(text, "c.yaml", simulate=True).commands.enabled
    assert len(problems(text, simulate=False)) == 2  # not TLS, not authenticated


def test_signing_key_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.key"
    text = config(
        "      - {name: t}\n",
        commands=f"commands:\n  enabled: true\n  signing: {{key_file: {missing}}}\n",
    )
    assert problems(text) == [
        f"c.yaml:7 commands.signing.key_file: cannot read {missing}: No such file or directory"
    ]
    key = tmp_path / "k.key"
    key.write_bytes(b"0123456789abcdef0123\n")
    key.chmod(0o644)
    text = config(
        "      - {name: t}\n",
        commands=f"commands:\n  enabled: true\n  signing: {{key_file: {key}}}\n",
    )
    assert problems(text) == [
        f"c.yaml:7 commands.signing.key_file: {key} is readable by group or others; chmod 600 {key}"
    ]
    key.chmod(0o600)
    assert parse_config(text, "c.yaml", simulate=False).commands.signing is not None
    key.write_bytes(b"short\n")
    assert problems(text) == [
        f"c.yaml:7 commands.signing.key_file: {key} holds 5 bytes; a key needs at least 16"
    ]


@pytest.mark.parametrize(
    ("commands", "expected"),
    [
        (
            "commands: {topic: 'edge/+/cmd'}\n",
            "c.yaml:5 commands.topic: 'edge/+/cmd': '+' (an MQTT wildcard) is not allowed in a "
            "topic",
        ),
        (
            "commands: {audit_topic: 'audit/{device}'}\n",
            "c.yaml:5 commands.audit_topic: 'audit/{device}': unknown field {device}; allowed: "
            "{agent}",
        ),
        (
            "commands: {result_topic: 'edge-cmd/{agent}/write'}\n",
            "c.yaml:5 commands.result_topic: the same topic as commands.topic",
        ),
        (
            "commands: {enabled: yes}\n",
            "c.yaml:5 commands.enabled: Input should be a valid boolean",
        ),
    ],
)
def test_commands_section(commands: str, expected: str) -> None:
    assert problems(config("      - {name: t}\n", commands=commands)) == [expected]


def test_a_modbus_input_register_cannot_be_writable() -> None:
    text = (
        "agent: {id: a1}\n"
        "devices:\n"
        "  - name: plc\n"
        "    protocol: modbus\n"
        "    host: 127.0.0.1\n"
        "    tags:\n"
        "      - {name: t, table: input, address: 3, writable: true}\n"
    )
    assert problems(text) == [
        "c.yaml:7 devices[0].tags[0].writable: tag 't' cannot be written: an input register "
        "is read-only in Modbus (only coils and holding registers are written)"
    ]


def test_types_that_cannot_be_written() -> None:
    from agent.command.convert import raw_type
    from drivers.base import TagCommon

    class Tag(TagCommon):
        type: str | None = None

    assert raw_type(Tag(name="t", type="date_and_time")) is None
    assert raw_type(Tag(name="t", type="Structure")) is None
    assert raw_type(Tag(name="t", type="DateTime")) is None
    any_type = raw_type(Tag(name="t"))
    assert any_type is not None
    assert any_type.kind == "any"


def test_a_reload_that_changes_commands_is_refused() -> None:
    from agent.runtime.reload import plan_reload

    old = parse_config(config("      - {name: t}\n"))
    new = parse_config(config("      - {name: t}\n", commands="commands: {enabled: true}\n"))
    result = plan_reload(old, new, {"oven"})
    assert not result.ok
    assert "section 'commands' changed" in result.problems[0]


def test_sparkplug_commands_over_mqtt_3() -> None:
    mqtt = (
        "mqtt: {username: edge, tls: {}, protocol: '3.1.1', layout: sparkplug,"
        " sparkplug: {group_id: plant}}\n"
    )
    text = config("      - {name: t}\n", commands="commands: {enabled: true}\n", mqtt=mqtt)
    assert parse_config(text, "c.yaml", simulate=False).commands.enabled
