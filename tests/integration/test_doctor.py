"""`edge-agent doctor` against the real simulators, real mosquitto brokers (plain, with an
ACL and users, with TLS), a silent device and a disk too small for the buffer: each fault is
one FAIL line that says what to do, and the exit code says whether there was any."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import Config, load_config
from agent.doctor import Finding, check_buffer, check_clock, check_device, probe_messages
from agent.simulate import simulators
from drivers.modbus.config import ModbusDevice
from tests.integration.conftest import BrokerFactory
from tests.support.agent_proc import ROOT, cli
from tests.support.broker import MosquittoBroker, TlsListener, require_mosquitto
from tests.support.certs import TestPki

pytestmark = pytest.mark.integration

ROOT_DIR = Path(__file__).resolve().parents[2]

MODBUS_DEVICE = """\
  - name: press-1
    protocol: modbus
    host: 127.0.0.1
    port: {port}
    timeout_s: 0.3
    retries: 0
    tags:
      - {{ name: power_kw, address: 0, type: float32,
          simulate: {{ generator: constant, value: 5 }} }}
      - {{ name: running, address: 4, type: bit, bit: 0 }}
"""


def _config(
    tmp: Path,
    *,
    mqtt: str,
    device_port: int,
    buffer: str | None = None,
    name: str = "agent.yaml",
) -> Path:
    path = tmp / name
    path.write_text(
        "agent: {id: gw-doc, site: plant, area: a1, line: l1}\n"
        + (buffer or f"buffer: {{path: {tmp / 'buffer.db'}, max_bytes: 1048576}}\n")
        + mqtt
        + "devices:\n"
        + MODBUS_DEVICE.format(port=device_port),
        encoding="utf-8",
    )
    return path


def _plain_mqtt(broker: MosquittoBroker) -> str:
    return (
        f"mqtt: {{host: 127.0.0.1, port: {broker.port}, topic: '{{site}}/{{line}}/{{device}}'}}\n"
    )


def _lines(result: subprocess.CompletedProcess[str], level: str) -> list[str]:
    return [ln for ln in result.stdout.splitlines() if ln.startswith(level)]


@pytest.fixture
def modbus_port() -> Iterator[int]:
    """A Modbus simulator serving MODBUS_DEVICE, in a thread of its own (the doctor runs
    as a child process while the test waits)."""
    from drivers.modbus.simulator import ModbusSimulator

    config = load_config_text(MODBUS_DEVICE.format(port=0))
    started: asyncio.Queue[int] = asyncio.Queue()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def serve() -> None:
        async with ModbusSimulator([config.devices[0]]) as sim:  # type: ignore[list-item]
            started.put_nowait(sim.endpoints["press-1"][1])
            await stop.wait()

    import threading

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    port = asyncio.run_coroutine_threadsafe(started.get(), loop).result(timeout=10)
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)
        loop.close()


def load_config_text(devices: str) -> Config:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text("agent: {id: gw-doc}\ndevices:\n" + devices, encoding="utf-8")
        return load_config(path)


def _doctor(config: Path) -> subprocess.CompletedProcess[str]:
    return cli("doctor", str(config), "--timeout-s", "5", timeout_s=60)


# ------------------------------------------------------------------ the CLI, whole


def test_all_good_exits_0_with_one_ok_line_per_check(
    tmp_path: Path, broker: MosquittoBroker, modbus_port: int
) -> None:
    result = _doctor(_config(tmp_path, mqtt=_plain_mqtt(broker), device_port=modbus_port))
    assert result.returncode == 0, result.stdout + result.stderr
    subjects = [ln.split(": ")[0] for ln in _lines(result, "ok")]
    assert subjects == [
        f"ok    config {tmp_path / 'agent.yaml'}",
        "ok    device press-1",
        f"ok    broker 127.0.0.1:{broker.port}",
        f"ok    buffer {tmp_path / 'buffer.db'}",
        "ok    clock",
    ]
    assert "2 tags of group default read" in result.stdout
    assert "3 of 3 probe messages accepted" in result.stdout
    assert "doctor: no problems found" in result.stderr
    assert "Traceback" not in result.stderr
    # The probes went out on the agent's own topics, at QoS 1, under a client id of its own.
    log = broker.log_text()
    assert "plant/l1/press-1" in log
    assert "edge-agent-gw-doc-doctor" in log


def test_invalid_config_exits_2_with_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("agent: {id: gw}\nmqtt: {prot: 1}\ndevices: []\n", encoding="utf-8")
    result = _doctor(path)
    assert result.returncode == 2
    assert result.stdout.startswith(f"FAIL  config {path}: 2 problems found:")
    assert "unknown key 'prot'" in result.stdout


def test_dead_device_and_no_broker_are_two_fail_lines_with_what_to_do(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on: bound, not listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        mqtt = f"mqtt: {{host: 127.0.0.1, port: {port}}}\n"
        result = _doctor(_config(tmp_path, mqtt=mqtt, device_port=port))
    assert result.returncode == 1
    fails = _lines(result, "FAIL")
    assert fails == [
        f"FAIL  device press-1: connection refused (127.0.0.1:{port}) — check host and port, "
        "and that the device (or its protocol server) is on",
        f"FAIL  broker 127.0.0.1:{port}: connection refused — check mqtt.host and mqtt.port "
        "(TLS usually 8883), and that the broker runs",
    ]
    assert "doctor: 2 problems found" in result.stderr


def test_silent_device_fails_within_its_timeout(tmp_path: Path, broker: MosquittoBroker) -> None:
    with socket.socket() as silent:  # accepts TCP (backlog), never answers Modbus
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        path = _config(tmp_path, mqtt=_plain_mqtt(broker), device_port=silent.getsockname()[1])
        result = _doctor(path)
    assert result.returncode == 1
    (fail,) = _lines(result, "FAIL")
    assert fail.startswith("FAIL  device press-1: ")
    assert "check the address, the network path and firewalls" in fail


def test_silent_broker_fails_within_the_timeout(tmp_path: Path, modbus_port: int) -> None:
    with socket.socket() as silent:  # accepts TCP (backlog), never sends a CONNACK
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        mqtt = f"mqtt: {{host: 127.0.0.1, port: {port}}}\n"
        started = time.monotonic()
        result = _doctor(_config(tmp_path, mqtt=mqtt, device_port=modbus_port))
        elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert _lines(result, "FAIL") == [
        f"FAIL  broker 127.0.0.1:{port}: no answer from the broker within 5 s — something "
        "accepts TCP there but does not answer MQTT: check mqtt.host and mqtt.port (a TLS "
        "port needs the tls section), and firewalls"
    ]
    assert elapsed < 30  # bounded by --timeout-s 5 (+1), not paho's or the OS's timeouts


def test_acl_denied_topic_is_named_with_reason_code_0x87(
    tmp_path: Path, broker_factory: BrokerFactory, modbus_port: int
) -> None:
    broker = broker_factory(
        users={"line4": "s3cret"},
        acl="user line4\ntopic write plant/#\ntopic read #\n",
    )
    mqtt = (
        f"mqtt: {{host: 127.0.0.1, port: {broker.port}, username: line4, "
        "password: s3cret, topic: 'plant/{line}/{device}'}\n"
    )
    result = _doctor(_config(tmp_path, mqtt=mqtt, device_port=modbus_port))
    assert result.returncode == 1
    fails = _lines(result, "FAIL")
    # Data topic allowed; the two status topics (edge-status/...) are not.
    assert fails == [
        f"FAIL  broker 127.0.0.1:{broker.port}: publish to {topic} refused: Not authorized "
        f"(0x87) — the broker's ACL must let line4 publish to {topic}"
        for topic in ("edge-status/gw-doc", "edge-status/gw-doc/press-1")
    ]
    assert "1 of 3 probe messages accepted" in result.stdout


def test_wrong_password_is_refused_at_connect(
    tmp_path: Path, broker_factory: BrokerFactory, modbus_port: int
) -> None:
    broker = broker_factory(users={"line4": "s3cret"})
    mqtt = f"mqtt: {{host: 127.0.0.1, port: {broker.port}, username: line4, password: nope}}\n"
    result = _doctor(_config(tmp_path, mqtt=mqtt, device_port=modbus_port))
    assert result.returncode == 1
    (fail,) = _lines(result, "FAIL")
    assert fail.startswith(f"FAIL  broker 127.0.0.1:{broker.port}: broker refused: ")
    assert fail.endswith("— check mqtt.username and the password (env file or password_file)")


def test_tls_broker_with_a_wrong_ca_is_refused_without_fallback(
    tmp_path: Path, modbus_port: int
) -> None:
    pki = TestPki.create(tmp_path / "pki")
    tls = TlsListener(
        certfile=pki.server_cert, keyfile=pki.server_key, cafile=pki.ca, require_certificate=False
    )
    with MosquittoBroker(binary=require_mosquitto(), tls=tls) as broker:
        port = broker.tls_port
        mqtt = f"mqtt: {{host: 127.0.0.1, port: {port}, tls: {{ca_file: {pki.other_ca}}}}}\n"
        result = _doctor(_config(tmp_path, mqtt=mqtt, device_port=modbus_port))
        assert result.returncode == 1
        (fail,) = _lines(result, "FAIL")
        assert fail.startswith(
            f"FAIL  broker 127.0.0.1:{broker.tls_port}: the broker's certificate is not "
            "signed by a trusted CA"
        )
        assert "check tls.ca_file" in fail
        assert fail.endswith("— fix the TLS settings in mqtt.tls (the sentence says which)")

        good = f"mqtt: {{host: 127.0.0.1, port: {broker.tls_port}, tls: {{ca_file: {pki.ca}}}}}\n"
        ok = _doctor(_config(tmp_path, mqtt=good, device_port=modbus_port, name="good.yaml"))
        assert ok.returncode == 0, ok.stdout
        assert "connected (MQTT 5, TLS)" in ok.stdout


def test_buffer_larger_than_the_free_disk_space(
    tmp_path: Path, broker: MosquittoBroker, modbus_port: int
) -> None:
    free = shutil.disk_usage(tmp_path).free
    max_bytes = free * 2
    buffer = f"buffer: {{path: {tmp_path / 'buffer.db'}, max_bytes: {max_bytes}}}\n"
    result = _doctor(
        _config(tmp_path, mqtt=_plain_mqtt(broker), device_port=modbus_port, buffer=buffer)
    )
    assert result.returncode == 1
    (fail,) = _lines(result, "FAIL")
    assert fail.startswith(f"FAIL  buffer {tmp_path / 'buffer.db'}: the disk has ")
    assert "(1.3 × max_bytes + 8.0 MiB)" in fail
    assert "— free disk space, or set buffer.max_bytes to at most " in fail


# ------------------------------------------------------------------ checks one by one


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


def test_a_full_small_disk_fails_the_buffer_check(tmp_path: Path) -> None:
    """A real small file system (a 4 MiB tmpfs) filled up, when this test may mount one."""
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "4m"):
        pytest.skip("cannot mount a tmpfs here (needs root); the free-space test covers it")
    try:
        (disk / "filler").write_bytes(b"\0" * (3 << 20))
        path = disk / "buffer.db"
        config = load_config_text(MODBUS_DEVICE.format(port=1)).model_copy(
            update={
                "buffer": load_config_text(MODBUS_DEVICE.format(port=1)).buffer.model_copy(
                    update={"path": str(path), "max_bytes": 1 << 20}
                )
            }
        )
        (finding,) = check_buffer(config)
        assert finding.level == "FAIL"
        assert finding.text.startswith("the disk has 1.0 MiB free (+0 B in the buffer)")
        (disk / "filler").unlink()
        (ok,) = check_buffer(config)
        assert ok.level == "FAIL"  # 4 MiB cannot hold 1.3 MiB + the 8 MiB margin either
    finally:
        subprocess.run(["umount", str(disk)], check=False, capture_output=True)


def test_a_relative_buffer_path_is_a_warning() -> None:
    config = load_config_text(MODBUS_DEVICE.format(port=1))  # default path data/buffer.db
    findings = check_buffer(config)
    assert findings[0] == Finding(
        "warn",
        f"buffer {Path.cwd() / 'data' / 'buffer.db'}",
        "buffer.path 'data/buffer.db' is relative to the working directory",
        "use an absolute path, e.g. /var/lib/edge-agent/buffer.db",
    )


def test_a_clock_before_2024_fails() -> None:
    (finding,) = check_clock(now=1_262_304_000.0)  # 2010-01-01
    assert finding.line() == (
        "FAIL  clock: this machine's clock says 2010-01-01T00:00:00Z — set the time "
        "(timedatectl set-time, or NTP: systemd-timesyncd); TLS certificates and every "
        "timestamp depend on it"
    )
    assert check_clock()[0].level == "ok"


def test_probe_topics_are_the_agent_topics() -> None:
    config = load_config_text(MODBUS_DEVICE.format(port=1))
    assert [m.topic for m in probe_messages(config)] == [
        "edge/gw-doc/press-1",
        "edge-status/gw-doc",
        "edge-status/gw-doc/press-1",
    ]
    assert all(m.qos == 1 and not m.retain for m in probe_messages(config))
    compact = config.model_copy(
        update={"mqtt": config.mqtt.model_copy(update={"layout": "compact"})}
    )
    assert [m.topic for m in probe_messages(compact)] == [
        "edge/gw-doc/press-1",
        "edge-meta/gw-doc/press-1/doctor-probe",  # the retained metadata's topics
        "edge-status/gw-doc",
        "edge-status/gw-doc/press-1",
    ]


# ------------------------------------------------------------------ OPC UA through the driver


def _oven(tmp_path: Path) -> Config:
    text = (ROOT / "configs" / "opcua-oven.yaml").read_text(encoding="utf-8")
    text = text.replace("cert_dir: pki", f"cert_dir: {tmp_path / 'pki'}")
    path = tmp_path / "oven.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(path)


async def test_opcua_device_security_login_and_trust(tmp_path: Path) -> None:
    async with simulators(_oven(tmp_path)) as simulated:
        oven = simulated.devices[0]
        (ok, *rest) = await check_device(oven, 15)
        assert ok.level == "ok", ok.line()
        assert ok.text.startswith(f"{getattr(oven, 'endpoint', '?')} answered; ")
        assert all(f.level != "FAIL" for f in rest), [f.line() for f in rest]

        untrusted = oven.model_copy(update={"server_certificate_thumbprint": None})
        (fail,) = await check_device(untrusted, 15)
        assert fail.level == "FAIL"
        assert fail.text.startswith("untrusted server certificate (")
        assert "edge-agent opcua trust" in fail.text
        assert fail.fix == "trust it as the line says, after checking the thumbprint"

        from pydantic import SecretStr

        wrong = oven.model_copy(update={"password": SecretStr("wrong")})
        (denied,) = await check_device(wrong, 15)
        assert denied.level == "FAIL"
        assert denied.text.startswith("BadUserAccessDenied")
        assert denied.fix == "check username and password (or the env file that sets them)"


async def test_modbus_tag_the_device_refuses_is_named(tmp_path: Path) -> None:
    config = load_config_text(MODBUS_DEVICE.format(port=1))
    async with simulators(config) as simulated:
        device = simulated.devices[0]
        assert isinstance(device, ModbusDevice)
        bad_tag = device.tags[0].model_copy(update={"name": "ghost", "address": 9000})
        wrong = device.model_copy(update={"tags": [*device.tags, bad_tag]})
        findings = await check_device(wrong, 15)
    assert [f.level for f in findings] == ["FAIL"], [f.line() for f in findings]
    assert findings[0].text.startswith(
        "1 of 3 tags of group default read bad: ghost (modbus exception 2"
    )


async def test_units_on_a_serial_line_are_checked_through_the_shared_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The example line in simulator mode (a pty pair with real RTU framing) answers on
    every unit; a line whose port does not exist fails each unit with one line that says
    what to do."""
    from agent.config import load_config
    from agent.doctor import diagnose
    from agent.simulate import simulators

    root = ROOT_DIR
    monkeypatch.setenv("EDGE_BUFFER", str(tmp_path / "buffer.db"))
    monkeypatch.setenv("MQTT_PORT", "9")  # no broker: only the device lines matter here
    config = load_config(root / "configs" / "modbus-serial-line.yaml", simulate=True)
    async with simulators(config) as simulated:
        findings = await diagnose(simulated, timeout_s=10)
    devices = [f for f in findings if f.subject.startswith("device ")]
    assert len(devices) == 8
    assert {f.level for f in devices} == {"ok"}, [f.line() for f in devices]
    monkeypatch.setenv("SERIAL_PORT", str(tmp_path / "ttyNOPE"))
    missing = load_config(root / "configs" / "modbus-serial-line.yaml", simulate=False)
    findings = await diagnose(missing, timeout_s=5)
    devices = [f for f in findings if f.subject.startswith("device ")]
    assert {f.level for f in devices} == {"FAIL"}
    assert all("ttyNOPE" in f.line() for f in devices), [f.line() for f in devices]
    assert all("group dialout" in f.line() for f in devices)
