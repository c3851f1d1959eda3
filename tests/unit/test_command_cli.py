"""`edge-agent write` in process against the fake protocol's simulator: output, exit codes,
the audit record, and refusal while the agent (the audit log's lock holder) runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli import main
from agent.command.audit import AuditLog
from agent.command.cli import parse_value
from agent.command.config import AuditConfig
from drivers import registry
from drivers.fake import FakeBench


@pytest.fixture(autouse=True)
def keep_logging() -> Iterator[None]:
    """main() configures logging for the process, onto the test's captured stderr; later
    tests would log into a closed file: put back what was there."""
    import logging

    import structlog

    saved = structlog.get_config()
    handlers = list(logging.root.handlers)
    yield
    structlog.configure(**saved)
    for handler in logging.root.handlers[:]:
        if handler not in handlers:
            logging.root.removeHandler(handler)


@pytest.fixture
def bench() -> Iterator[FakeBench]:
    b = FakeBench()
    with registry.registered(b.protocol()):
        yield b


def write_config(tmp_path: Path, *, enabled: bool = True) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(
        "agent: {id: a1}\n"
        "mqtt: {username: edge, tls: {}}\n"
        f"commands: {{enabled: {'true' if enabled else 'false'}, "
        f"audit: {{path: {tmp_path / 'audit.jsonl'}}}}}\n"
        "devices:\n"
        "  - name: oven\n"
        "    protocol: fake\n"
        "    tags:\n"
        "      - {name: sp, type: float, scale: 0.1, writable: true, write: {max: 200}}\n"
        "      - {name: temp}\n"
    )
    return path


def records(tmp_path: Path) -> list[dict[str, object]]:
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_parse_value() -> None:
    assert parse_value("42") == 42
    assert parse_value("42.5") == 42.5
    assert parse_value("true") is True
    assert parse_value('"42"') == "42"
    assert parse_value("auto") == "auto"
    assert parse_value("[1]") == "[1]"


def test_write_done(bench: FakeBench, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "write",
            "--no-audit-topic",
            str(write_config(tmp_path)),
            "oven",
            "sp",
            "55.5",
            "--simulate",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("done: oven.sp = 55.5 (raw 555.0; was ")
    assert out.endswith("holds 55.5, verified)\n")
    assert [c.outcome for c in bench.calls_of("oven", "write")] == ["ok"]
    accepted, final = records(tmp_path)
    assert (final["raw"], final["holds"]) == (555.0, 55.5)
    assert accepted["event"] == "accepted"
    assert final["result"] == "done"
    assert final["who"]["channel"] == "cli"  # type: ignore[index]


@pytest.mark.parametrize(
    ("tag", "value", "line"),
    [
        ("sp", "250", "refused (above_max): oven.sp: 250 is above max 200\n"),
        ("temp", "1", "refused (not_writable): oven.temp: tag 'temp' is not writable: true\n"),
        ("sp", "hot", "refused (wrong_type): oven.sp: 'hot' is not a number for float64\n"),
        ("nope", "1", "refused (unknown_tag): oven.nope: device 'oven' has no tag 'nope'\n"),
    ],
)
def test_write_refused(
    bench: FakeBench,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tag: str,
    value: str,
    line: str,
) -> None:
    code = main(
        ["write", "--no-audit-topic", str(write_config(tmp_path)), "oven", tag, value, "--simulate"]
    )
    assert code == 3
    assert capsys.readouterr().err.endswith(line)
    assert records(tmp_path)[-1]["result"] == "refused"


def test_write_disabled(
    bench: FakeBench, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "write",
            "--no-audit-topic",
            str(write_config(tmp_path, enabled=False)),
            "oven",
            "sp",
            "1",
            "--simulate",
        ]
    )
    assert code == 3
    assert "refused (disabled): oven.sp: writes are disabled (commands.enabled is false)" in (
        capsys.readouterr().err
    )


def test_write_failed_device_unreachable(
    bench: FakeBench, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Without --simulate nothing serves fake://local: refused, nothing was sent.
    code = main(["write", "--no-audit-topic", str(write_config(tmp_path)), "oven", "sp", "1"])
    assert code == 3
    assert "refused (device_unavailable): oven.sp: device 'oven': unreachable: no fake server" in (
        capsys.readouterr().err
    )


def test_json_output(bench: FakeBench, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "write",
            "--no-audit-topic",
            str(write_config(tmp_path)),
            "oven",
            "sp",
            "12",
            "--simulate",
            "--json",
        ]
    )
    assert code == 0
    body = json.loads(capsys.readouterr().out)
    assert (body["result"], body["raw"], body["holds"]) == ("done", 120.0, 12.0)


def test_refused_while_the_agent_holds_the_audit_log(
    bench: FakeBench, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path)
    held = AuditLog(AuditConfig(path=str(tmp_path / "audit.jsonl")))
    held.open()
    try:
        code = main(["write", "--no-audit-topic", str(path), "oven", "sp", "1", "--simulate"])
    finally:
        held.close()
    assert code == 3
    err = capsys.readouterr().err
    assert "is held by another process (is the agent running?)" in err
    assert "send the write as a command" in err
    assert bench.simulators == []  # nothing was started


def test_config_error(bench: FakeBench, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("agent: {id: a1}\ndevices: []\n")
    assert main(["write", "--no-audit-topic", str(path), "oven", "sp", "1"]) == 2
