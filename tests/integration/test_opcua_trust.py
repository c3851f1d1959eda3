"""Errors an operator can act on, against the asyncua simulator configured strict: a
server refusing our certificate, an untrusted server, and the `opcua` commands taking
their settings from the config file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers.base import DriverConfigError
from drivers.opcua import certs
from drivers.opcua.config import OpcUaDevice
from drivers.opcua.driver import OpcUaDriver
from drivers.opcua.simulator import OpcUaSimulator, Rejection

pytestmark = pytest.mark.integration


def device(
    tmp_path: Path, endpoint: str = "opc.tcp://127.0.0.1:0/sim", **extra: Any
) -> OpcUaDevice:
    data: dict[str, Any] = {
        "name": "oven",
        "protocol": "opcua",
        "endpoint": endpoint,
        "cert_dir": str(tmp_path / "client"),
        "timeout_s": 2.0,
        "security_policy": "Basic256Sha256",
        "security_mode": "SignAndEncrypt",
        "tags": [{"name": "t", "node_id": "ns=2;s=T"}],
    }
    data.update(extra)
    return OpcUaDevice.model_validate(data)


@pytest.mark.parametrize(
    ("rejection", "reason"),
    [
        ("service_fault", "client certificate rejected"),
        ("error_message", "BadSecurityChecksFailed"),
    ],
)
async def test_strict_server_rejecting_our_certificate_says_so_and_what_to_trust(
    tmp_path: Path, rejection: Rejection, reason: str
) -> None:
    served = device(tmp_path)
    trusted_clients = tmp_path / "sim-trusted-clients"
    trusted_clients.mkdir()
    async with OpcUaSimulator(
        [served],
        cert_dir=tmp_path / "sim",
        trusted_clients=trusted_clients,
        rejection=rejection,
    ) as sim:
        endpoint = sim.endpoints["oven"]
        server_der = sim.certificate("oven")
        assert server_der is not None
        certs.trust_certificate(server_der, tmp_path / "client" / "trusted")
        drv = OpcUaDriver(device(tmp_path, endpoint))
        try:
            with pytest.raises(DriverConfigError) as err:
                await drv.connect()
            own = (tmp_path / "client" / "own" / "cert.der").absolute()
            assert err.value.reason == reason
            assert "does not trust our client certificate" in err.value.detail
            assert f"trust {own}" in err.value.detail
            assert certs.sha1_thumbprint(own.read_bytes()) in err.value.detail
            assert "AssertionError" not in str(err.value)
            assert sim.rejected_clients("oven") == 1
            # Doing what the message says makes it work.
            shutil.copy(own, trusted_clients / "edge-agent.der")
            await drv.connect()
            assert (await drv.read("default"))[0].quality == "good"
        finally:
            await drv.close()


async def test_untrusted_server_message_names_the_cert_dir(tmp_path: Path) -> None:
    cert_dir = tmp_path / "my pki"
    async with OpcUaSimulator([device(tmp_path)], cert_dir=tmp_path / "sim") as sim:
        endpoint = sim.endpoints["oven"]
        drv = OpcUaDriver(device(tmp_path, endpoint, cert_dir=str(cert_dir)))
        with pytest.raises(DriverConfigError) as err:
            await drv.connect()
        await drv.close()
    assert err.value.reason == "untrusted server certificate"
    assert f"`edge-agent opcua trust {endpoint} --cert-dir '{cert_dir}'`" in err.value.detail


# ------------------------------------------------------------ opcua commands + config

REPO = Path(__file__).resolve().parents[2]


def agent_config(
    path: Path, endpoint: str, cert_dir: Path, password: str, *, other: bool = True
) -> None:
    """A config with the OPC UA device `oven` (and `other`, never contacted)."""
    path.write_text(
        "agent: {id: test}\n"
        "devices:\n"
        + (
            "  - name: other\n"
            "    protocol: opcua\n"
            "    endpoint: opc.tcp://192.0.2.1:4840/unused\n"
            "    tags: [{name: t, node_id: 'ns=2;s=T'}]\n"
            if other
            else ""
        )
        + "  - name: oven\n"
        "    protocol: opcua\n"
        f"    endpoint: {endpoint}\n"
        "    security_policy: Basic256Sha256\n"
        f"    cert_dir: {cert_dir}\n"
        "    application_uri: urn:test:line4-gateway\n"
        "    username: operator\n"
        f"    password: {password}\n"
        "    timeout_s: 2\n"
        "    tags:\n"
        "      - {name: temp, node_id: 'ns=2;s=Temp'}\n",
        encoding="utf-8",
    )


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "opcua", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


@pytest.fixture
def strict_sim(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A simulator process serving `oven` strictly: (endpoint, its trusted-clients dir)."""
    sim_config = tmp_path / "sim.yaml"
    agent_config(
        sim_config, "opc.tcp://127.0.0.1:0/sim", tmp_path / "unused", "s3cret", other=False
    )
    trusted_clients = tmp_path / "sim-trusted-clients"
    trusted_clients.mkdir()
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "drivers.opcua.simulator",
            str(sim_config),
            "--cert-dir",
            str(tmp_path / "sim"),
            "--trusted-clients",
            str(trusted_clients),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    ) as proc:
        try:
            assert proc.stdout is not None
            line = json.loads(proc.stdout.readline())
            assert line["device"] == "oven"
            yield line["endpoint"], trusted_clients
        finally:
            proc.kill()
            proc.wait(timeout=10)


def test_opcua_commands_take_their_settings_from_the_config(
    tmp_path: Path, strict_sim: tuple[str, Path]
) -> None:
    endpoint, trusted_clients = strict_sim
    pki = tmp_path / "agent-pki"
    config = tmp_path / "agent.yaml"
    agent_config(config, endpoint, pki, "${OVEN_PW}")
    env = {"OVEN_PW": "s3cret"}
    base = ("--config", str(config), "--device", "oven")

    # cert: the config's cert_dir and application URI.
    out = cli("cert", *base, env=env)
    assert out.returncode == 0, out.stderr
    assert f"certificate: {pki / 'own' / 'cert.der'}" in out.stdout
    assert "application uri: urn:test:line4-gateway" in out.stdout

    # trust: the config's endpoint, into the config's trust directory.
    out = cli("trust", *base, env=env)
    assert out.returncode == 0, out.stderr
    assert list((pki / "trusted").iterdir())

    # browse: the config's security and login; the strict server refuses our certificate
    # and the message says exactly which file to trust.
    out = cli("browse", *base, "--format", "yaml", env=env)
    assert out.returncode == 1
    own = pki / "own" / "cert.der"
    assert "client certificate rejected" in out.stderr
    assert f"trust {own}" in out.stderr
    assert "Traceback" not in out.stderr
    shutil.copy(own, trusted_clients / "gateway.der")
    out = cli("browse", *base, "--format", "yaml", env=env)
    assert out.returncode == 0, out.stderr
    assert "ns=2;s=Temp" in out.stdout
    assert "s3cret" not in out.stdout + out.stderr

    # An option given as well overrides the config (a wrong password is refused).
    out = cli(
        "browse",
        *base,
        "--username",
        "operator",
        "--password-env",
        "WRONG",
        env={**env, "WRONG": "nope"},
    )
    assert out.returncode == 1
    assert "BadUserAccessDenied" in out.stderr


def test_opcua_commands_refuse_an_unusable_config_choice(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    agent_config(config, "opc.tcp://127.0.0.1:4840", tmp_path / "pki", "pw")
    out = cli("cert", "--config", str(config))
    assert out.returncode == 2
    assert "has 2 OPC UA devices (other, oven); choose one with --device" in out.stderr
    out = cli("trust", "--config", str(config), "--device", "press")
    assert out.returncode == 2
    assert "no OPC UA device named 'press'; its OPC UA devices: other, oven" in out.stderr
    out = cli("cert", "--device", "oven")
    assert out.returncode == 2
    assert "--device needs --config FILE" in out.stderr
    out = cli("browse")
    assert out.returncode == 2
    assert "give an ENDPOINT, or --config FILE" in out.stderr
    config.write_text(config.read_text().replace("timeout_s: 2", "timeout_s: -2"))
    out = cli("browse", "--config", str(config), "--device", "oven")
    assert out.returncode == 2
    assert f"{config}:" in out.stderr
    assert "timeout_s" in out.stderr
