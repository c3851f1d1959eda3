"""`edge-agent watch` connects as the agent does: over mutual TLS with the config's CA,
client certificate and key; a missing client certificate is one clear line, exit 1."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.agent_proc import AgentProcess, cli, wait_until
from tests.support.broker import MosquittoBroker, TlsListener, require_mosquitto
from tests.support.certs import TestPki

pytestmark = pytest.mark.integration

WAIT_S = 20.0
BATCH = (
    b'{"schema":"edge-agent/batch/1","agent":"gw","device":"plc1","samples":[{"device":"plc1",'
    b'"tag":"temp","value":21.5,"quality":"good","seq":7}]}'
)


@pytest.fixture
def pki(tmp_path: Path) -> TestPki:
    return TestPki.create(tmp_path / "pki")


@pytest.fixture
def tls_broker(pki: TestPki) -> Iterator[MosquittoBroker]:
    listener = TlsListener(certfile=pki.server_cert, keyfile=pki.server_key, cafile=pki.ca)
    with MosquittoBroker(binary=require_mosquitto(), tls=listener) as broker:
        yield broker


def _config(tmp: Path, broker: MosquittoBroker, tls: str) -> Path:
    path = tmp / "agent.yaml"
    path.write_text(
        f"""\
agent: {{id: gw}}
mqtt:
  host: 127.0.0.1
  port: {broker.tls_port}
  tls:
{tls}
devices:
  - name: plc1
    protocol: modbus
    host: 127.0.0.1
    port: 502
    tags:
      - {{name: temp, address: 0, type: int16}}
"""
    )
    return path


def _publish_plain(broker: MosquittoBroker) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish("edge/gw/plc1", BATCH, qos=1).wait_for_publish(timeout=10)
    finally:
        client.loop_stop()
        client.disconnect()


def test_watch_uses_the_configs_mutual_tls(
    tmp_path: Path, pki: TestPki, tls_broker: MosquittoBroker
) -> None:
    config = _config(
        tmp_path,
        tls_broker,
        f"    ca_file: {pki.ca}\n    cert_file: {pki.client_cert}\n"
        f"    key_file: {pki.client_key}\n    min_version: '1.2'",
    )
    args = ("watch", str(config), "--topic", "edge/#", "--count", "1", "--seconds", "20")
    with AgentProcess(tmp_path / "watch.log", *args) as watch:
        wait_until(lambda: "watching edge/#" in watch.log(), WAIT_S, "subscribed", watch)
        _publish_plain(tls_broker)
        line = watch.read_line(timeout_s=WAIT_S)
        assert line == "seq       7  plc1/temp = 21.5  [good]"
        assert watch.proc is not None
        assert watch.proc.wait(timeout=WAIT_S) == 0


def test_watch_without_the_client_certificate_fails_in_one_line(
    tmp_path: Path, pki: TestPki, tls_broker: MosquittoBroker
) -> None:
    config = _config(tmp_path, tls_broker, f"    ca_file: {pki.ca}")
    started = time.monotonic()
    done = cli("watch", str(config), "--count", "1", "--seconds", "5", timeout_s=30)
    assert time.monotonic() - started < 30
    assert done.stdout == ""
    # The broker refuses the handshake (certificate required) or closes at once.
    assert done.returncode == 1, done.stderr
    where = f"127.0.0.1:{tls_broker.tls_port}"
    assert done.stderr.startswith((f"cannot connect to {where}: ", f"cannot watch {where}: "))
    assert done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr


def test_watch_with_a_missing_ca_file_says_so(tmp_path: Path, tls_broker: MosquittoBroker) -> None:
    config = _config(tmp_path, tls_broker, f"    ca_file: {tmp_path / 'nope.pem'}")
    done = cli("watch", str(config), "--count", "1", "--seconds", "5", timeout_s=30)
    assert done.returncode == 1
    assert done.stderr.strip() == f"TLS: tls.ca_file {tmp_path / 'nope.pem'}: no such file"
