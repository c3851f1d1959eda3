"""The real agent process over mutual TLS: retained birth/offline status, device status,
the will after SIGKILL; and a topic the broker's ACL denies (refused, counted, dead-lettered).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from agent.buffer.memory import MemoryBuffer
from agent.config import AgentSection, BufferConfig, MqttConfig
from agent.forwarder import Forwarder
from agent.payload import PayloadEncoder
from agent.publish.mqtt import MqttPublisher
from tests.support.agent_proc import AgentProcess, samples_of
from tests.support.broker import MosquittoBroker, TlsListener, require_mosquitto
from tests.support.certs import TestPki
from tests.support.samples import wire_sample
from tests.support.subscriber import Received, Subscriber

pytestmark = pytest.mark.integration

WAIT_S = 20.0


@pytest.fixture
def pki(tmp_path: Path) -> TestPki:
    return TestPki.create(tmp_path / "pki")


@pytest.fixture
def tls_broker(pki: TestPki) -> Iterator[MosquittoBroker]:
    broker = MosquittoBroker(
        binary=require_mosquitto(),
        tls=TlsListener(certfile=pki.server_cert, keyfile=pki.server_key, cafile=pki.ca),
    )
    with broker:
        yield broker


def _config(tmp: Path, broker: MosquittoBroker, pki: TestPki) -> Path:
    path = tmp / "agent.yaml"
    path.write_text(
        f"""\
agent:
  id: gw-tls
mqtt:
  host: 127.0.0.1
  port: {broker.tls_port}
  keepalive_s: 5
  reconnect_min_s: 0.2
  reconnect_max_s: 1
  tls:
    ca_file: {pki.ca}
    cert_file: {pki.client_cert}
    key_file: {pki.client_key}
buffer:
  path: {tmp / "buffer.db"}
logging:
  level: debug
  format: json
devices:
  - name: plc1
    protocol: modbus
    host: 127.0.0.1
    port: 0
    interval_s: 0.2
    tags:
      - {{name: counter, address: 0, type: uint16, simulate: {{generator: counter}}}}
"""
    )
    return path


def _json(m: Received) -> dict[str, object]:
    body = orjson.loads(m.payload)
    assert isinstance(body, dict)
    return body


def test_agent_over_mtls_birth_device_status_and_will_after_sigkill(
    tmp_path: Path, tls_broker: MosquittoBroker, pki: TestPki
) -> None:
    config = _config(tmp_path, tls_broker, pki)
    # The test's subscriber uses the plain listener of the same broker.
    with Subscriber(tls_broker.host, tls_broker.port, "#") as sub:
        agent = AgentProcess(tmp_path / "agent.log", "run", str(config), "--simulate")
        with agent:
            status = sub.wait_for(
                lambda ms: any(
                    m.topic == "edge-status/gw-tls" and _json(m)["state"] == "online" for m in ms
                ),
                timeout_s=WAIT_S,
            )
            online = next(_json(m) for m in status if m.topic == "edge-status/gw-tls")
            assert online["schema"] == "edge-agent/status/1"
            assert isinstance(online["config_hash"], str)
            assert online["version"]
            sub.wait_for(
                lambda ms: any(m.topic == "edge/gw-tls/plc1" for m in ms), timeout_s=WAIT_S
            )
            sub.wait_for(
                lambda ms: any(
                    m.topic == "edge-status/gw-tls/plc1" and _json(m)["state"] == "up" for m in ms
                ),
                timeout_s=WAIT_S,
            )
            assert samples_of([m for m in sub.messages() if m.topic == "edge/gw-tls/plc1"])
            agent.kill()
            got = sub.wait_for(
                lambda ms: any(
                    m.topic == "edge-status/gw-tls" and _json(m)["state"] == "offline" for m in ms
                ),
                timeout_s=WAIT_S,
            )
        offline = [_json(m) for m in got if m.topic == "edge-status/gw-tls"][-1]
        assert offline["reason"] == "connection lost"
    # A subscriber arriving later gets the retained offline status at once.
    with Subscriber(tls_broker.host, tls_broker.port, "edge-status/gw-tls") as late:
        retained = late.wait_count(1, timeout_s=WAIT_S)
        assert retained[0].retain
        assert _json(retained[0])["state"] == "offline"


def test_clean_stop_publishes_offline_shutdown(
    tmp_path: Path, tls_broker: MosquittoBroker, pki: TestPki
) -> None:
    config = _config(tmp_path, tls_broker, pki)
    with Subscriber(tls_broker.host, tls_broker.port, "edge-status/gw-tls") as sub:
        with AgentProcess(tmp_path / "agent.log", "run", str(config), "--simulate") as agent:
            sub.wait_for(
                lambda ms: any(_json(m)["state"] == "online" for m in ms), timeout_s=WAIT_S
            )
            assert agent.terminate() == 0
        got = sub.wait_for(
            lambda ms: any(_json(m)["state"] == "offline" for m in ms), timeout_s=WAIT_S
        )
    assert [_json(m)["reason"] for m in got if _json(m)["state"] == "offline"] == ["shutdown"]


async def test_acl_refusal_is_counted_and_dead_lettered_without_blocking_others(
    tmp_path: Path,
) -> None:
    acl = "topic readwrite edge/gw/ok\ntopic read edge/gw/denied\n"
    with MosquittoBroker(binary=require_mosquitto(), acl=acl) as broker:
        mqtt = MqttConfig.model_validate(
            {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.05}
        )
        buffer = MemoryBuffer(BufferConfig.model_validate({"kind": "memory"}))
        await buffer.open()
        publisher = MqttPublisher(mqtt, "acl-test")
        forwarder = Forwarder(
            buffer,
            publisher,
            PayloadEncoder(
                AgentSection(id="gw"), mqtt.model_copy(update={"topic": "edge/gw/{device}"})
            ),
            max_refusals=2,
        )
        forwarder._backoff.min_s = forwarder._backoff.max_s = 0.01
        with Subscriber(broker.host, broker.port, "edge/gw/#") as sub:
            await publisher.start()
            try:
                async with asyncio.timeout(WAIT_S):
                    await publisher.wait_connected()
                await buffer.append("denied", [wire_sample("denied", 1)])
                await buffer.append("ok", [wire_sample("ok", 2)])
                async with asyncio.timeout(WAIT_S):
                    while buffer.stats().records:
                        await forwarder.forward_once()
            finally:
                await publisher.close()
            received = await asyncio.to_thread(sub.wait_count, 1)
        assert [m.topic for m in received] == ["edge/gw/ok"]
        assert forwarder.stats.refusals == 1  # permanent: dead-lettered at the first refusal
        assert forwarder.stats.refusals_by_reason == {"Not authorized": 1}
        assert forwarder.stats.dead_lettered_records == 1
        letters = await forwarder.dead_letters.all()
        assert [(d.device, d.first_seq, d.code, d.tries) for d in letters] == [
            ("denied", 1, 0x87, 1)
        ]
        await buffer.close()
