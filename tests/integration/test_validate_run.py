"""validate = run: every way a config can fail `run`'s start-up is found by `validate`.

The start-up of `run` was walked (agent.runtime: buffer open, publisher, drivers' and
planners' constructors, topic building, the HTTP listener) and each failure it can meet
has one bad config here. For each, `edge-agent validate` exits 2 and names the file, the
line and the key; `edge-agent run` exits 2 with the very same lines (nothing started),
never 1 with a traceback from inside the running agent.

What is a run-time condition instead (documented in docs/configuration.md, "Checks
beyond the keys") is tested at the end: an HTTP address this machine cannot listen on
ends `run` with exit 1 and one clear line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.agent_proc import cli

pytestmark = pytest.mark.integration

HEAD = "agent: {id: gw}\nmqtt: {port: 1}\n"


def modbus(tag: str = "{name: t, address: 0}", extra: str = "") -> str:
    return (
        "devices:\n"
        "  - name: plc\n"
        "    protocol: modbus\n"
        "    host: 127.0.0.1\n"
        "    port: 5020\n"
        f"{extra}"
        "    tags:\n"
        f"      - {tag}\n"
    )


# (id, config text without buffer section, marker of the reported line, expected "key: text")
CASES: list[tuple[str, str, str, str]] = [
    (
        "plan-register-cap",
        HEAD
        + modbus("{name: big, address: 0, type: float64}", "    max_registers_per_request: 2\n"),
        "name: big",
        "devices[0].tags[0].type: tag 'big': a float64 of 4 registers is larger than the 2 "
        "registers this device allows per request: raise the device's "
        "max_registers_per_request to at least 4",
    ),
    (
        "plan-string-cap",
        HEAD
        + modbus(
            "{name: s, address: 0, type: string, length: 10}", "    max_registers_per_request: 8\n"
        ),
        "name: s",
        "devices[0].tags[0].length: tag 's': a string of 10 registers is larger than the 8 "
        "registers this device allows per request",
    ),
    (
        "tag-layout-plus",
        "agent: {id: gw}\nmqtt: {port: 1, layout: tag}\n" + modbus("{name: a+b, address: 0}"),
        "name: a+b",
        "devices[0].tags[0].name: 'a+b': '+' (an MQTT wildcard) is not allowed in a name "
        "that goes into MQTT topics",
    ),
    (
        "tag-layout-hash",
        "agent: {id: gw}\nmqtt: {port: 1, layout: tag}\n" + modbus('{name: "temp#1", address: 0}'),
        "temp#1",
        "devices[0].tags[0].name: 'temp#1': '#' (an MQTT wildcard) is not allowed",
    ),
    (
        "tag-layout-slash",
        "agent: {id: gw}\nmqtt: {port: 1, layout: tag}\n" + modbus("{name: a/b, address: 0}"),
        "name: a/b",
        "devices[0].tags[0].name: 'a/b': '/' (it would add a topic level) is not allowed",
    ),
    (
        "tag-layout-nul",
        "agent: {id: gw}\nmqtt: {port: 1, layout: tag}\n" + modbus('{name: "a\\0b", address: 0}'),
        "a\\0b",
        "devices[0].tags[0].name: 'a\\x00b': NUL (U+0000) is not allowed in MQTT strings",
    ),
    (
        "tag-layout-too-long",
        "agent: {id: gw}\nmqtt: {port: 1, layout: tag}\n"
        + modbus("{name: " + "x" * 70_000 + ", address: 0}"),
        "layout: tag",
        "mqtt.topic_tag: the topic of device 'plc' tag "
        "'xxxxxxxxxxxxxxxxxxxx'...'xxxxxxxxxxxxxxxxxxxx' (70,000 characters) is 70,012 bytes, "
        "over MQTT's 65,535",
    ),
    (
        "site-slash",
        "agent: {id: gw, site: plant/1}\nmqtt: {port: 1, topic: 'e/{site}/{device}'}\n" + modbus(),
        "site: plant/1",
        "agent.site: 'plant/1': '/' (it would add a topic level) is not allowed",
    ),
    (
        "topic-wildcard",
        "agent: {id: gw}\nmqtt: {port: 1, topic: 'edge/+/{device}'}\n" + modbus(),
        "topic:",
        "mqtt.topic: 'edge/+/{device}': '+' (an MQTT wildcard) is not allowed in a topic",
    ),
    (
        "topic-dollar",
        "agent: {id: gw}\nmqtt:\n  port: 1\n  status_topic: '$SYS/edge/{agent}'\n" + modbus(),
        "status_topic",
        "mqtt.status_topic: '$SYS/edge/{agent}': topics starting with '$' are reserved",
    ),
    (
        "topic-dollar-field",
        "agent: {id: gw, site: $plant}\nmqtt: {port: 1, topic: '{site}/{device}'}\n" + modbus(),
        "topic:",
        "mqtt.topic: the topic would start with '$' (reserved for the broker)",
    ),
    (
        "sparkplug-group-nul",
        'agent: {id: gw}\nmqtt:\n  port: 1\n  layout: sparkplug\n  sparkplug: {group_id: "g\\0"}\n'
        + modbus(),
        "group_id",
        "mqtt.sparkplug.group_id: Sparkplug id 'g\\x00': NUL (U+0000) is not allowed",
    ),
    (
        "sparkplug-edge-control",
        "agent: {id: gw}\nmqtt:\n  port: 1\n  layout: sparkplug\n"
        '  sparkplug: {group_id: g, edge_node_id: "n\\tx"}\n' + modbus(),
        "edge_node_id",
        "mqtt.sparkplug.edge_node_id: Sparkplug id 'n\\tx': control character U+0009",
    ),
    (
        "client-id-control",
        'agent: {id: gw}\nmqtt: {port: 1, client_id: "a\\x07"}\n' + modbus(),
        "client_id",
        "mqtt.client_id: control character U+0007 is not allowed in MQTT strings",
    ),
    (
        "modbus-port-0",
        HEAD + modbus().replace("port: 5020", "port: 0"),
        "port: 0",
        "devices[0].port: port 0 is only for simulator mode (run --simulate)",
    ),
    (
        "opcua-port-0",
        HEAD + "devices:\n  - name: oven\n    protocol: opcua\n"
        "    endpoint: opc.tcp://127.0.0.1:0/oven\n"
        "    tags: [{name: t, node_id: 'ns=2;i=2'}]\n",
        "endpoint:",
        "devices[0].endpoint: port 0 is only for simulator mode (run --simulate)",
    ),
    (
        "modbus-host",
        HEAD + modbus().replace("host: 127.0.0.1", "host: no such host"),
        "host: no such host",
        "devices[0].host: 'no such host' is neither an IP address nor a host name",
    ),
    (
        "mqtt-host",
        "agent: {id: gw}\nmqtt: {port: 1, host: 'broker one'}\n" + modbus(),
        "mqtt:",
        "mqtt.host: 'broker one' is neither an IP address nor a host name",
    ),
    (
        "http-host",
        HEAD + "http: {host: 'not a host!', port: 9108}\n" + modbus(),
        "http:",
        "http.host: 'not a host!' is neither an IP address nor a host name",
    ),
    (
        "scale-nan",
        HEAD + modbus("{name: t, address: 0, scale: .nan}"),
        "scale: .nan",
        "devices[0].tags[0].scale: nan is not a finite number",
    ),
]


def _problem_lines(stderr: str) -> list[str]:
    return [line.strip() for line in stderr.splitlines() if line.startswith("  ")]


@pytest.mark.parametrize(
    ("text", "marker", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_validate_reports_what_run_would_meet(
    tmp_path: Path, text: str, marker: str, expected: str
) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(text + f"buffer: {{path: {tmp_path / 'buffer.db'}}}\n", encoding="utf-8")
    line = next(n for n, t in enumerate(text.splitlines(), 1) if marker in t)

    validate = cli("validate", str(path), timeout_s=60)
    assert validate.returncode == 2, validate.stdout + validate.stderr
    problems = _problem_lines(validate.stderr)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}:{line} {expected}"), problems[0][:300]

    run = cli("run", str(path), timeout_s=60)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert _problem_lines(run.stderr) == problems
    assert not (tmp_path / "buffer.db").exists()  # nothing was started


def test_buffer_path_that_can_never_be_a_file(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    for buffer_path, expected in (
        (
            tmp_path,
            f"buffer.path: {tmp_path} is a directory; give a file, e.g. {tmp_path}/buffer.db",
        ),
        (
            tmp_path / "a-file" / "buffer.db",
            f"buffer.path: {tmp_path / 'a-file'} is a file, so {tmp_path / 'a-file'}/buffer.db "
            "cannot be created",
        ),
    ):
        path = tmp_path / "agent.yaml"
        path.write_text(HEAD + f"buffer:\n  path: {buffer_path}\n" + modbus())
        for command in ("validate", "run"):
            out = cli(command, str(path), timeout_s=60)
            assert out.returncode == 2, out.stderr[-2000:]
            assert _problem_lines(out.stderr) == [f"{path}:4 {expected}"]


def test_port_0_is_valid_for_simulator_mode(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        HEAD + f"buffer: {{path: {tmp_path / 'b.db'}}}\n" + modbus().replace("5020", "0")
    )
    assert cli("validate", str(path)).returncode == 2
    ok = cli("validate", "--simulate", str(path))
    assert ok.returncode == 0, ok.stderr
    assert "OK (1 devices, 1 tags)" in ok.stdout


def test_an_http_address_not_on_this_machine_is_a_runtime_failure(tmp_path: Path) -> None:
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): valid, but no machine listens on it. Whether
    # an address is on this machine can change (an interface coming up), so `validate`
    # accepts it and `run` ends with one clear line and exit 1, as documented.
    path = tmp_path / "agent.yaml"
    path.write_text(
        HEAD
        + f"buffer: {{path: {tmp_path / 'b.db'}}}\nhttp: {{host: 192.0.2.1, port: 9108}}\n"
        + modbus()
    )
    assert cli("validate", str(path)).returncode == 0
    run = cli("run", str(path), timeout_s=60)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    failed = [line for line in run.stderr.splitlines() if "agent.failed" in line]
    assert len(failed) == 1
    assert "cannot listen on 192.0.2.1:9108" in failed[0]


def test_a_simulated_value_the_simulator_cannot_make(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        HEAD
        + f"buffer: {{path: {tmp_path / 'b.db'}}}\n"
        + modbus("{name: t, address: 0, type: int16, simulate: {generator: constant, value: abc}}")
    )
    expected = [f"{path}:10 devices[0].tags[0].simulate: constant 'abc' does not fit a int tag"]
    for args in (("validate", "--simulate"), ("run", "--simulate")):
        out = cli(*args, str(path), timeout_s=60)
        assert out.returncode == 2, out.stderr[-2000:]
        assert _problem_lines(out.stderr) == expected
    # Without simulators the simulate section is never used: `run` can run the file.
    assert cli("validate", str(path)).returncode == 0
