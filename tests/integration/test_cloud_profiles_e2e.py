"""The cloud profiles against mosquitto stand-ins configured to each platform's limits.

No cloud account is reachable from here: these brokers only imitate what AWS IoT Core and
Azure IoT Hub document (docs/cloud.md says exactly what is and is not covered).

- AWS IoT Core stand-in: TLS listener that requires a client certificate and takes its
  CN as the user name, max_qos 1, max_packet_size 128,000, an ACL that lets a client
  publish only under its own client id (as an AWS policy with
  ``${iot:Connection.Thing.ThingName}`` does).
- Azure IoT Hub stand-in: TLS listener, a password file holding the SAS token for the
  device's user name ``{hub}/{device}/?api-version=...``, retain_available false
  (a retained PUBLISH gets the client disconnected), max_qos 1, max_packet_size 256,000,
  and an ACL that allows only ``devices/{client id}/messages/events/...``.

The agent runs in-process (Agent + Modbus simulator) through each one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import orjson
import pytest

from agent.config import Config, MqttConfig, parse_config
from agent.layouts.decode import decode
from agent.publish import Message, PublishResult, cloud, packet_size
from agent.publish.mqtt import MqttPublisher
from agent.runtime import Agent
from agent.simulate import simulators
from tests.support.agent_proc import seqs
from tests.support.broker import MosquittoBroker, TlsListener, require_mosquitto
from tests.support.certs import TestPki
from tests.support.payloads import decoded
from tests.support.proxy import FaultProxy
from tests.support.subscriber import Received, Subscriber

pytestmark = pytest.mark.integration

WAIT_S = 30.0
KEY = "c2VjcmV0LWRldmljZS1rZXktZm9yLXRlc3RzLW9ubHk="  # base64 of a test-only key
HUB = "hub1.azure-devices.net"
READER = ("reader", "reader-pw")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return TestPki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def brokers() -> Iterator[list[MosquittoBroker]]:
    started: list[MosquittoBroker] = []
    yield started
    for b in started:
        b.close()


def _device(tmp: Path) -> str:
    return f"""\
buffer: {{path: {tmp / "buffer.db"}}}
devices:
  - name: press-1
    protocol: modbus
    host: 127.0.0.1
    port: 0
    interval_s: 0.1
    tags:
      - {{name: strokes, address: 0, type: uint16}}
      - {{name: force, address: 1, type: uint16}}
"""


async def _run_agent(config: Config, sub: Subscriber, wanted: int) -> tuple[Agent, list[Received]]:
    async with simulators(config) as simulated:
        agent = Agent(simulated, grace_s=5)
        task = asyncio.create_task(agent.run())
        try:
            received = await asyncio.to_thread(sub.wait_count, wanted, WAIT_S)
        finally:
            agent.stop()
            await task
    # Everything polled was delivered (the stop drains the buffer within the grace time).
    produced = agent.status.samples_produced
    await asyncio.to_thread(
        sub.wait_for, lambda msgs: set(range(1, produced + 1)) <= set(seqs(msgs)), WAIT_S
    )
    return agent, received


# ------------------------------------------------------------------ AWS IoT Core


def _aws_broker(pki: TestPki, brokers: list[MosquittoBroker]) -> MosquittoBroker:
    acl = (
        "user reader\ntopic read #\n\n"
        # As an AWS policy with ${iot:Connection.Thing.ThingName}: a thing publishes only
        # under its own name (client id = thing name).
        "pattern write edge/%c/#\npattern write edge-status/%c\npattern write edge-status/%c/#\n"
    )
    listener = TlsListener(
        certfile=pki.server_cert,
        keyfile=pki.server_key,
        cafile=pki.ca,
        require_certificate=True,
        extra=("use_identity_as_username true", "max_qos 1"),
    )
    broker = MosquittoBroker(
        users=dict([READER]),
        acl=acl,
        extra_config=["max_packet_size 128000"],
        tls=listener,
        binary=require_mosquitto(),
    )
    brokers.append(broker)
    return broker.start()


def _aws_config(pki: TestPki, broker: MosquittoBroker, tmp: Path, thing: str) -> Config:
    return parse_config(
        f"""\
agent: {{id: {thing}}}
mqtt:
  profile: aws-iot-core
  host: localhost
  port: {broker.tls_port}
  client_id: {thing}
  reconnect_min_s: 0.05
  reconnect_max_s: 0.2
  tls: {{ca_file: {pki.ca}, cert_file: {pki.client_cert}, key_file: {pki.client_key}}}
"""
        + _device(tmp)
    )


async def test_aws_profile_delivers_through_the_stand_in(
    tmp_path: Path, pki: TestPki, brokers: list[MosquittoBroker]
) -> None:
    broker = _aws_broker(pki, brokers)
    config = _aws_config(pki, broker, tmp_path, "gateway-1")
    with Subscriber(broker.host, broker.port, "#", username=READER[0], password=READER[1]) as sub:
        agent, _ = await _run_agent(config, sub, 12)
    topics = [m.topic for m in sub.messages()]
    data = decoded(m.payload for m in sub.messages() if m.topic == "edge/gateway-1/press-1")
    assert len(data) >= 10
    assert all(d.device == "press-1" for d in data)
    assert "edge-status/gateway-1" in topics  # the birth (retained on AWS)
    assert "edge-status/gateway-1/press-1" in topics
    assert agent.forwarder is not None
    assert agent.forwarder.merge_records  # paced publishes: records merged per device
    assert agent.forwarder.platform_message_bytes == 128_000  # the profile's default limit
    assert agent.forwarder.max_message_bytes is None  # none configured
    stats = agent.forwarder.stats
    assert stats.dead_lettered_records == 0
    assert stats.refusals == 0
    # The connection used mutual TLS: the broker took the certificate's CN as user name.
    log = broker.log_text()
    assert "as gateway-1 (p5, c1, k30, u'gateway-1')" in log
    # The birth went out retained, QoS 1 (AWS keeps retained messages).
    assert "Received PUBLISH from gateway-1 (d0, q1, r1, m" in log


async def test_aws_backlog_after_an_outage_goes_out_in_merged_messages(
    tmp_path: Path, pki: TestPki, brokers: list[MosquittoBroker]
) -> None:
    """Paced publishes batch rather than drop: the records polled while the link was down
    leave in fewer messages than records, and every sample arrives."""
    broker = _aws_broker(pki, brokers)
    with FaultProxy(broker.host, broker.tls_port) as proxy:
        config = _aws_config(pki, broker, tmp_path, "gateway-1")
        config = config.model_copy(
            update={"mqtt": config.mqtt.model_copy(update={"port": proxy.port})}
        )
        with Subscriber(
            broker.host, broker.port, "edge/#", username=READER[0], password=READER[1]
        ) as sub:
            async with simulators(config) as simulated:
                agent = Agent(simulated, grace_s=10)
                task = asyncio.create_task(agent.run())
                try:
                    await asyncio.to_thread(sub.wait_count, 3, WAIT_S)
                    proxy.set_mode("cut")
                    mark = agent.status.samples_produced
                    async with asyncio.timeout(WAIT_S):
                        while agent.status.samples_produced < mark + 40:
                            await asyncio.sleep(0.02)
                    proxy.set_mode("pass")
                    target = agent.status.samples_produced
                    await asyncio.to_thread(
                        sub.wait_for, lambda msgs: max(seqs(msgs), default=0) >= target, WAIT_S
                    )
                finally:
                    agent.stop()
                    await task
            produced = agent.status.samples_produced
            await asyncio.to_thread(
                sub.wait_for, lambda msgs: set(range(1, produced + 1)) <= set(seqs(msgs)), WAIT_S
            )
    assert agent.forwarder is not None
    stats = agent.forwarder.stats
    assert stats.merged_records >= 2
    data = [m for m in sub.messages() if m.topic == "edge/gateway-1/press-1"]
    # One record per poll (two tags each): the backlog needed fewer messages than records.
    assert len(data) < stats.records_sent
    assert stats.dead_lettered_records == 0


async def test_aws_stand_in_refuses_another_things_topics(
    tmp_path: Path, pki: TestPki, brokers: list[MosquittoBroker]
) -> None:
    """The stand-in's ACL is real: a thing whose agent publishes under another name is
    refused (0x87), so the delivery test above cannot pass by accident."""
    broker = _aws_broker(pki, brokers)
    config = _aws_config(pki, broker, tmp_path, "gateway-1")
    mqtt = config.mqtt.model_copy(update={"client_id": "gateway-2"})
    pub = MqttPublisher(mqtt, "gateway-2")
    await pub.start()
    try:
        async with asyncio.timeout(WAIT_S):
            await pub.wait_connected()
        (result,) = await pub.publish([Message("edge/gateway-1/press-1", b"{}")])
        assert result == PublishResult(False, "Not authorized", 0x87)
        assert await pub.publish([Message("edge/gateway-2/press-1", b"{}")]) == [
            PublishResult(True)
        ]
    finally:
        await pub.close()


# ------------------------------------------------------------------ Azure IoT Hub


def _azure_broker(
    pki: TestPki, brokers: list[MosquittoBroker], token: str, device: str = "gw1"
) -> MosquittoBroker:
    acl = (
        "user reader\ntopic read #\n\n"
        # IoT Hub: a device publishes only to its own events topic (client id = device id).
        "pattern write devices/%c/messages/events/#\n"
    )
    listener = TlsListener(
        certfile=pki.server_cert,
        keyfile=pki.server_key,
        cafile=pki.ca,
        require_certificate=False,
        extra=("max_qos 1",),
    )
    broker = MosquittoBroker(
        users={cloud.azure_username(HUB, device): token, READER[0]: READER[1]},
        acl=acl,
        extra_config=["max_packet_size 256000", "retain_available false"],
        tls=listener,
        binary=require_mosquitto(),
    )
    brokers.append(broker)
    return broker.start()


def _azure_mqtt(pki: TestPki, broker: MosquittoBroker, **extra: Any) -> dict[str, Any]:
    return {
        "profile": "azure-iot-hub",
        "host": "127.0.0.1",
        "port": broker.tls_port,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.2,
        "azure": {"hub_host": HUB, "device_id": "gw1", "device_key": KEY, **extra},
        "tls": {"ca_file": str(pki.ca)},
    }


def _props(topic: str) -> dict[str, str]:
    base = "devices/gw1/messages/events/"
    assert topic.startswith(base), topic
    return dict(parse_qsl(topic[len(base) :]))


async def test_azure_profile_delivers_with_a_sas_token(
    tmp_path: Path, pki: TestPki, brokers: list[MosquittoBroker], monkeypatch: pytest.MonkeyPatch
) -> None:
    now = float(int(time.time()))
    monkeypatch.setattr(cloud, "clock", lambda: now)
    # The broker knows only the token made from the device key for this expiry.
    token = cloud.sas_token(f"{HUB}/devices/gw1", KEY, int(now) + 3600)
    broker = _azure_broker(pki, brokers, token)
    mqtt = _azure_mqtt(pki, broker)
    text = f"agent: {{id: gw1}}\nmqtt: {orjson.dumps(mqtt).decode()}\n" + _device(tmp_path)
    config = parse_config(text)
    assert config.mqtt.protocol == "3.1.1"
    with Subscriber(broker.host, broker.port, "#", username=READER[0], password=READER[1]) as sub:
        agent, _ = await _run_agent(config, sub, 12)
    messages = sub.messages()
    kinds = [_props(m.topic).get("msg-type") for m in messages]
    assert "status" in kinds  # online, published not retained
    assert "device-status" in kinds
    data = [m for m in messages if _props(m.topic).get("msg-type") == "data"]
    assert len(data) >= 10
    props = _props(data[0].topic)
    assert props == {
        "$.ct": "application/json",
        "$.ce": "utf-8",
        "agent": "gw1",
        "device": "press-1",
        "layout": "lean",  # the default layout
        "msg-type": "data",
    }
    assert decode(data[0].payload).device == "press-1"
    assert agent.forwarder is not None
    assert agent.forwarder.stats.dead_lettered_records == 0
    assert not agent.forwarder.merge_records
    assert agent.forwarder.platform_message_bytes == 256_000
    log = broker.log_text()
    # MQTT 3.1.1 (mosquitto logs it as p2), the hub's user name, never a retained message (the
    # broker would have disconnected us) and no will.
    assert f"as gw1 (p2, c1, k30, u'{HUB}/gw1/?api-version=2021-04-12')" in log
    assert "r1" not in "".join(
        line for line in log.splitlines() if "Received PUBLISH from gw1" in line
    )
    assert "Will message specified" not in log
    publisher = agent.current_publisher
    assert isinstance(publisher, MqttPublisher)
    assert publisher.stats().disconnects == 0


async def test_azure_record_above_the_hub_limit_is_split_to_fit(
    tmp_path: Path, pki: TestPki, brokers: list[MosquittoBroker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """MQTT 3.1.1 has no Maximum Packet Size in the CONNACK: the profile's 256,000 bytes
    is the limit. A 2,000-tag poll (about 300 KB as one message) is split into messages
    below it; the stand-in (max_packet_size 256000) would drop the connection otherwise."""
    now = float(int(time.time()))
    monkeypatch.setattr(cloud, "clock", lambda: now)
    token = cloud.sas_token(f"{HUB}/devices/gw1", KEY, int(now) + 3600)
    broker = _azure_broker(pki, brokers, token)
    # Layout device (every sample in full, ≈ 300 KB a poll): lean would fit one message.
    mqtt = {**_azure_mqtt(pki, broker), "layout": "device"}
    tags = "\n".join(
        f"      - {{name: register_{i:04d}, address: {i}, type: uint16}}" for i in range(2000)
    )
    text = (
        f"agent: {{id: gw1}}\nmqtt: {orjson.dumps(mqtt).decode()}\n"
        f"buffer: {{path: {tmp_path / 'buffer.db'}}}\n"
        "devices:\n  - name: wide\n    protocol: modbus\n    host: 127.0.0.1\n    port: 0\n"
        f"    interval_s: 1.0\n    tags:\n{tags}\n"
    )
    config = parse_config(text)
    with Subscriber(broker.host, broker.port, "#", username=READER[0], password=READER[1]) as sub:
        async with simulators(config) as simulated:
            agent = Agent(simulated, grace_s=10)
            task = asyncio.create_task(agent.run())
            try:
                await asyncio.to_thread(
                    sub.wait_for, lambda msgs: len(set(seqs(msgs))) >= 4000, WAIT_S
                )
            finally:
                agent.stop()
                await task
        produced = agent.status.samples_produced
        await asyncio.to_thread(
            sub.wait_for, lambda msgs: set(range(1, produced + 1)) <= set(seqs(msgs)), WAIT_S
        )
    data = [m for m in sub.messages() if _props(m.topic).get("msg-type") == "data"]
    assert all(packet_size(Message(m.topic, m.payload)) <= 256_000 for m in data)
    assert agent.forwarder is not None
    assert agent.forwarder.stats.split_records >= 2
    assert agent.forwarder.stats.dead_lettered_records == 0
    publisher = agent.current_publisher
    assert isinstance(publisher, MqttPublisher)
    assert publisher.stats().disconnects == 0


async def test_azure_refuses_a_token_the_broker_does_not_know(
    pki: TestPki, brokers: list[MosquittoBroker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stand-in really checks the password: a token of another expiry is refused."""
    now = float(int(time.time()))
    monkeypatch.setattr(cloud, "clock", lambda: now)
    broker = _azure_broker(pki, brokers, cloud.sas_token(f"{HUB}/devices/gw1", KEY, 1))
    pub = MqttPublisher(MqttConfig.model_validate(_azure_mqtt(pki, broker)), "gw1")
    await pub.start()
    try:
        async with asyncio.timeout(WAIT_S):
            while pub.stats().connect_failures < 2:
                await asyncio.sleep(0.02)
        assert not pub.connected
    finally:
        await pub.close()


async def test_azure_token_is_renewed_by_reconnecting_before_it_expires(
    pki: TestPki, brokers: list[MosquittoBroker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first token's renewal time comes one second after the connection is up. The
    broker accepts only the first token until the renewal, then (after the publisher
    failed to log in again: it no longer offers the old token) only the second, so the
    publisher is connected again only if it logged in with the fresh one. (Swapping the
    broker's password while connected would disconnect us: mosquitto re-checks
    connected clients when it reloads.)"""
    ttl = 3600
    t1 = float(int(time.time()))
    t2 = t1 + 600
    calls = [0]

    def clock() -> float:
        calls[0] += 1
        if calls[0] == 1:
            return t1  # the first login
        if calls[0] == 2:
            return t1 + cloud.RENEW_FRACTION * ttl - 1.0  # renewal due in one second
        return t2  # every later login and wait

    monkeypatch.setattr(cloud, "clock", clock)
    first = cloud.sas_token(f"{HUB}/devices/gw1", KEY, int(t1) + ttl)
    second = cloud.sas_token(f"{HUB}/devices/gw1", KEY, int(t2) + ttl)
    assert first != second
    broker = _azure_broker(pki, brokers, first)
    pub = MqttPublisher(MqttConfig.model_validate(_azure_mqtt(pki, broker)), "gw1")
    await pub.start()
    try:
        async with asyncio.timeout(WAIT_S):
            await pub.wait_connected()
            while pub.stats().renewals < 1 or pub.stats().connect_failures < 1:
                await asyncio.sleep(0.02)
        assert not pub.connected  # the old token is not offered again
        broker.reload_users({cloud.azure_username(HUB, "gw1"): second, READER[0]: READER[1]})
        async with asyncio.timeout(WAIT_S):
            await pub.wait_connected()
        stats = pub.stats()
        assert stats.disconnects == 0  # a planned reconnect, not a lost connection
        assert stats.renewals == 1
        topic = cloud.azure_events("gw1") + "msg-type=data"
        assert await pub.publish([Message(topic, b"{}")]) == [PublishResult(True)]
    finally:
        await pub.close()


async def test_publishes_are_paced_by_the_connection_bucket(
    broker: MosquittoBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """max_publishes_per_s (the AWS profile's 90/s by default): each message handed to
    paho takes a token, and publish() waits whenever the bucket is empty; all are
    delivered. The bucket's clock is fake, so this shows the pacing, not a speed."""
    t = [0.0]
    made: list[cloud.TokenBucket] = []
    waits: list[float] = []

    class FakeClockBucket(cloud.TokenBucket):
        def __init__(self, rate: float, burst: int) -> None:
            super().__init__(rate, burst, now=lambda: t[0])
            made.append(self)

        def delay(self) -> float:
            wait = super().delay()
            if wait > 0:
                waits.append(wait)
                t[0] += wait  # the publisher sleeps this long: let the fake time pass
            return wait

    monkeypatch.setattr("agent.publish.mqtt.TokenBucket", FakeClockBucket)
    config = MqttConfig.model_validate(
        {"host": broker.host, "port": broker.port, "max_publishes_per_s": 20}
    )
    pub = MqttPublisher(config, "paced")
    await pub.start()
    try:
        async with asyncio.timeout(WAIT_S):
            await pub.wait_connected()
        results = await pub.publish([Message("t/x", b"%d" % i) for i in range(30)])
    finally:
        await pub.close()
    assert results == [PublishResult(True)] * 30
    (bucket,) = made
    assert (bucket.rate, bucket.burst) == (20, 2)
    # The burst goes at once, every later message waited for its token (1/20 s each).
    assert len(waits) == 30 - 2
    assert all(w == pytest.approx(0.05) for w in waits)
