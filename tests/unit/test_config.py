"""Config loading: strict YAML, interpolation, and the exact text of every error."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, load_config, parse_config
from agent.yamlsafe import YamlProblem, load_yaml
from drivers import registry

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))

GOOD = """\
agent:
  id: gw-1
mqtt:
  port: 1883
devices:
  - name: plc-1
    protocol: modbus
    host: 127.0.0.1
    tags:
      - name: t1
        address: 0
        type: float32
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "line4.yaml")
    return info.value.problems


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_example_config_validates(path: Path) -> None:
    config = load_config(path)
    assert config.devices


def test_examples_exist() -> None:
    assert len(CONFIGS) >= 1


def test_good_config_parses_with_defaults() -> None:
    config = parse_config(GOOD)
    assert config.mqtt.protocol == "5"
    assert config.buffer.when_full == "drop_oldest"
    assert config.devices[0].name == "plc-1"


def test_three_mistakes_reported_at_once_with_lines() -> None:
    text = (
        GOOD.replace("  port: 1883", "  prot: 1883").replace("type: float32", "type: flaot32")
        + "logging:\n  level: loud\n"
    )
    out = problems(text)
    assert len(out) == 3
    # The list of allowed keys grows with the model; its start is the message.
    assert out[0].startswith(
        "line4.yaml:4 mqtt.prot: unknown key 'prot'; did you mean 'port'? (allowed: "
    )
    from agent.config import MqttConfig

    assert out[0].endswith(", ".join(sorted(MqttConfig.model_fields)) + ")")
    assert out[1:] == [
        "line4.yaml:12 devices[0].tags[0].type: Input should be 'bool', 'bit', 'int16', "
        "'uint16', 'int32', 'uint32', 'int64', 'uint64', 'float32', 'float64' or 'string'",
        "line4.yaml:14 logging.level: Input should be 'debug', 'info', 'warning' or 'error'",
    ]


def test_wrong_types_are_not_coerced() -> None:
    text = GOOD.replace("port: 1883", 'port: "1883"').replace("address: 0", "address: true")
    out = problems(text)
    assert out[0] == "line4.yaml:4 mqtt.port: Input should be a valid integer"
    assert out[1] == (
        "line4.yaml:11 devices[0].tags[0].address: Input should be a valid integer; "
        "or Input should be a valid string"
    )


def test_missing_key_and_unknown_protocol() -> None:
    text = "agent: {}\ndevices:\n  - name: x\n    protocol: profinet\n"
    assert problems(text) == [
        "line4.yaml:1 agent.id: required key is missing",
        "line4.yaml:4 devices[0].protocol: unknown protocol 'profinet'; allowed: "
        + ", ".join(m.rsplit(".", 1)[-1] for m in registry.BUILTIN),
    ]


def test_duplicate_names_and_unknown_group() -> None:
    text = GOOD + (
        "      - name: t1\n        address: 4\n        group: fast\n"
        "  - name: plc-1\n    protocol: modbus\n    host: h\n    tags: [{name: a, address: 1}]\n"
    )
    assert problems(text) == [
        "line4.yaml:13 devices[0].tags[1].name: duplicate tag name 't1' (also tags[0])",
        "line4.yaml:15 devices[0].tags[1].group: unknown poll group 'fast'; defined: default",
        "line4.yaml:16 devices[1].name: duplicate device name 'plc-1' (also devices[0])",
    ]


def test_duplicate_yaml_key_is_an_error() -> None:
    text = GOOD.replace("  port: 1883", "  port: 1883\n  port: 1884")
    assert problems(text) == ["line4.yaml:5 mqtt: duplicate key 'port' (first at line 4)"]


def test_anchors_are_rejected() -> None:
    text = GOOD.replace("  port: 1883", "  port: &p 1883")
    assert problems(text) == ["line4.yaml:4 anchors and aliases (&name, *name) are not allowed"]


def test_yaml_syntax_error_has_a_line() -> None:
    out = problems(GOOD.replace("  port: 1883", "  port: [1883"))
    assert len(out) == 1
    assert out[0].startswith("line4.yaml:")
    assert "YAML syntax" in out[0]


def test_yaml12_scalars() -> None:
    data, _, errs = load_yaml("a: no\nb: 010\nc: 0x10\nd: on\ne: 1.5\nf: ~\ng: true\nh: '12'\n")
    assert errs == []
    assert data == {
        "a": "no",
        "b": 10,
        "c": 16,
        "d": "on",
        "e": 1.5,
        "f": None,
        "g": True,
        "h": "12",
    }


def test_env_interpolation() -> None:
    env = {"PORT": "8883", "NAME": "gw"}
    data, _, errs = load_yaml(
        "p: ${PORT}\nq: ${MISSING:-1883}\nn: ${NAME}-1\ns: '${PORT}'\nl: $${PORT}\n", env
    )
    assert errs == []
    assert data == {"p": 8883, "q": 1883, "n": "gw-1", "s": "8883", "l": "${PORT}"}


def test_unset_variable_is_reported_with_its_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGE_TEST_UNSET", raising=False)
    text = GOOD.replace("host: 127.0.0.1", "host: ${EDGE_TEST_UNSET}")
    assert problems(text) == [
        "line4.yaml:8 devices[0].host: environment variable EDGE_TEST_UNSET is not set "
        "(write ${EDGE_TEST_UNSET:-default} to give a default)"
    ]


def test_python_tags_are_rejected() -> None:
    _, _, errs = load_yaml("a: !!python/object/apply:os.system ['true']\n")
    assert [e.message for e in errs] == [
        "tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed"
    ]


def test_aliases_raise() -> None:
    with pytest.raises(YamlProblem):
        load_yaml("a: &x [1]\nb: *x\n")


def test_topic_template_fields_checked() -> None:
    text = GOOD.replace("  port: 1883", "  port: 1883\n  topic: '{site}/{devcie}'")
    assert problems(text) == [
        "line4.yaml:5 mqtt.topic: unknown field {devcie}; allowed: {agent}, "
        "{area}, {device}, {line}, {site}",
        "line4.yaml:5 mqtt.topic: uses {site} but agent.site is not set",
    ]


def test_modbus_tag_rules() -> None:
    text = GOOD.replace("type: float32", "type: bool\n        table: holding")
    assert problems(text) == [
        "line4.yaml:10 devices[0].tags[0]: type bool reads a coil or discrete_input; use "
        "type bit with 'bit' for a bit inside a register"
    ]


def test_classic_address_and_table_must_agree() -> None:
    text = GOOD.replace("address: 0", "address: '30001'\n        table: holding")
    out = problems(text)
    assert out == [
        "line4.yaml:10 devices[0].tags[0]: address '30001' is in table input, but table is holding"
    ]


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert info.value.problems[0].startswith(f"{tmp_path / 'nope.yaml'}: cannot read:")
