"""deploy/: the systemd unit (checked by systemd-analyze where present), the Dockerfile
(checked statically: docker's engine does not run here), the compose file and the
mosquitto config it mounts (accepted by the real mosquitto)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.broker import MosquittoBroker, require_mosquitto

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

DOCKER_INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip


def unit_settings(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def test_systemd_unit_has_the_promised_settings() -> None:
    unit = unit_settings((DEPLOY / "edge-agent.service").read_text())
    service = unit["Service"]
    assert service["User"] == ["edge-agent"]
    assert service["ExecStartPre"][0].endswith("edge-agent validate /etc/edge-agent/agent.yaml")
    assert service["ExecStart"][0].endswith("edge-agent run /etc/edge-agent/agent.yaml")
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["Restart"] == ["on-failure"]
    assert service["RestartPreventExitStatus"] == ["2"]
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["ReadWritePaths"] == ["/var/lib/edge-agent"]
    assert service["StateDirectory"] == ["edge-agent"]
    assert service["PrivateTmp"] == ["yes"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that the commands exist: point them at this checkout's agent.
    agent = ROOT / ".venv" / "bin" / "edge-agent"
    if not agent.exists():
        pytest.skip("no .venv/bin/edge-agent in this checkout")
    text = (DEPLOY / "edge-agent.service").read_text()
    unit = tmp_path / "edge-agent.service"
    unit.write_text(text.replace("/opt/edge-agent/current/venv/bin/edge-agent", str(agent)))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    problems = [ln for ln in result.stderr.splitlines() if "edge-agent.service" in ln]
    assert result.returncode == 0, result.stderr
    assert problems == []


def test_collector_unit_runs_collect_with_a_fixed_client_id(tmp_path: Path) -> None:
    unit = unit_settings((DEPLOY / "edge-agent-collect.service").read_text())
    service = unit["Service"]
    start = shlex.split(service["ExecStart"][0])
    assert start[1:4] == ["collect", "/etc/edge-agent/agent.yaml", "--out"]
    assert start[4] == "/var/lib/edge-agent-collect"
    assert service["ReadWritePaths"] == ["/var/lib/edge-agent-collect"]
    assert "--client-id" in start
    assert service["Restart"] == ["on-failure"]
    assert service["RestartPreventExitStatus"] == ["2"]
    # The command line is one the CLI accepts.
    agent = ROOT / ".venv" / "bin" / "edge-agent"
    if agent.exists():
        args = [a.replace("%H", "host") for a in start[1:]]
        help_run = subprocess.run(
            [str(agent), *args[:1], "--help"], capture_output=True, text=True, timeout=60,
            check=False,
        )  # fmt: skip
        assert help_run.returncode == 0
        for option in (a for a in args if a.startswith("--")):
            assert option in help_run.stdout
    analyze = shutil.which("systemd-analyze")
    if analyze is None or not agent.exists():
        return
    text = (DEPLOY / "edge-agent-collect.service").read_text()
    path = tmp_path / "edge-agent-collect.service"
    path.write_text(text.replace("/opt/edge-agent/current/venv/bin/edge-agent", str(agent)))
    result = subprocess.run(
        [analyze, "verify", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert [ln for ln in result.stderr.splitlines() if "edge-agent-collect" in ln] == []


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends in a line continuation"
    return out


def test_dockerfile_is_well_formed_non_root_with_volume_and_healthcheck() -> None:
    steps = dockerfile_instructions((DEPLOY / "Dockerfile").read_text())
    assert steps[0][0] == "FROM"
    for word, _ in steps:
        assert word in DOCKER_INSTRUCTIONS, f"unknown instruction {word}"
    kinds = [w for w, _ in steps]
    user = steps[kinds.index("USER")][1]
    assert user not in ("root", "0")
    assert kinds.index("USER") < kinds.index("ENTRYPOINT")
    assert "/var/lib/edge-agent" in steps[kinds.index("VOLUME")][1]
    assert "/healthz" in steps[kinds.index("HEALTHCHECK")][1]
    for word, rest in steps:
        if word == "COPY" and not rest.startswith("--"):
            *sources, _ = shlex.split(rest)
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


def test_compose_file_mounts_the_mosquitto_config() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"mosquitto", "edge-agent"}
    mounts = services["mosquitto"]["volumes"]
    assert "./mosquitto.conf:/mosquitto/config/mosquitto.conf:ro" in mounts
    assert services["edge-agent"]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / services["edge-agent"]["build"]["context"] / "deploy/Dockerfile").exists()
    conf = (DEPLOY / "mosquitto.conf").read_text().splitlines()
    assert "max_inflight_messages 100" in conf


def test_mosquitto_accepts_the_settings_of_the_compose_config(tmp_path: Path) -> None:
    binary = require_mosquitto()
    # The listener and persistence lines are the container's; the rest must be valid.
    keep = [
        ln
        for ln in (DEPLOY / "mosquitto.conf").read_text().splitlines()
        if ln and not ln.startswith(("#", "listener", "persistence", "allow_anonymous"))
    ]
    broker = MosquittoBroker(extra_config=keep, binary=binary)
    try:
        broker.start()
    finally:
        broker.close()


def test_install_script_is_valid_bash() -> None:
    result = subprocess.run(
        ["bash", "-n", str(DEPLOY / "install.sh")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
