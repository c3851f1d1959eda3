"""Poison records against the real broker and the real agent: a device the ACL denies among
healthy ones, a batch above the broker's Maximum Packet Size, a topic paho rejects, an
encoder that raises; `edge-agent deadletter list|replay` after the ACL was fixed."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from datetime import datetime
from pathlib import Path

import orjson
import pytest

from agent.buffer import Record
from agent.buffer.memory import MemoryBuffer
from agent.config import AgentSection, BufferConfig, MqttConfig
from agent.forwarder import Forwarder
from agent.layouts.decode import Decoded, Decoder
from agent.payload import PayloadEncoder
from agent.publish import Message, packet_size
from agent.publish.mqtt import MqttPublisher
from tests.support.agent_proc import (
    AgentProcess,
    cli,
    counter_device,
    last_seq_logged,
    wait_until,
)
from tests.support.broker import MosquittoBroker, require_mosquitto
from tests.support.payloads import decoded
from tests.support.samples import wire_sample
from tests.support.subscriber import Received, Subscriber

pytestmark = pytest.mark.integration

WAIT_S = 20.0
HEALTHY = [f"d{i}" for i in range(1, 10)]


def _config(tmp: Path, broker: MosquittoBroker, devices: str, *, agent: str = "gw") -> Path:
    path = tmp / "agent.yaml"
    path.write_text(
        f"""\
agent:
  id: {agent}
mqtt:
  host: 127.0.0.1
  port: {broker.port}
  topic: "edge/{{agent}}/{{device}}"
  reconnect_min_s: 0.2
  reconnect_max_s: 1
buffer:
  path: {tmp / "buffer.db"}
logging:
  level: info
  format: json
devices:
{devices}"""
    )
    return path


def _by_device(messages: list[Received]) -> dict[str, list[dict[str, object]]]:
    """Data messages by device, each as {"samples", "gaps"} (reference decoder)."""
    out: dict[str, list[dict[str, object]]] = {}
    decoder = Decoder()
    for m in messages:
        if m.topic.startswith("edge-status/"):
            continue
        d = decoder.decode(m.payload)
        if d.kind == "data":
            out.setdefault(str(d.device), []).append({"samples": d.samples, "gaps": d.gaps})
    return out


def _newest_lag_s(bodies: list[dict[str, object]]) -> float:
    newest = max(
        datetime.fromisoformat(str(s["ts_agent"])).timestamp()
        for b in bodies
        for s in b["samples"]  # type: ignore[attr-defined]
    )
    return time.time() - newest


def _acl(allowed: list[str]) -> str:
    return (
        "topic write edge-status/#\n"
        + "".join(f"topic write {t}\n" for t in allowed)
        + ("topic read #\n")
    )


def test_one_denied_device_does_not_slow_nine_others_and_is_replayed_after_the_fix(
    tmp_path: Path,
) -> None:
    acl = _acl([f"edge/gw/{d}" for d in HEALTHY])
    devices = "".join(counter_device(d, 0.5) for d in ["d0", *HEALTHY])
    with MosquittoBroker(binary=require_mosquitto(), acl=acl) as broker:
        config = _config(tmp_path, broker, devices)
        with (
            Subscriber(broker.host, broker.port, "edge/gw/#") as sub,
            AgentProcess(tmp_path / "agent.log", "run", str(config), "--simulate") as agent,
        ):
            wait_until(
                lambda: set(_by_device(sub.messages())) >= set(HEALTHY), WAIT_S, "data", agent
            )
            # For 6 s, every healthy device's newest sample is fresh: no device waits
            # for the denied one (the old forwarder backed off as a whole, up to 10 s).
            lags: list[float] = []
            for _ in range(12):
                time.sleep(0.5)
                got = _by_device(sub.messages())
                lags.append(max(_newest_lag_s(got[d]) for d in HEALTHY))
            assert max(lags) < 3.0, lags
            got = _by_device(sub.messages())
            assert "d0" not in got
            # A gap notice announced d0's dead letters on some other device's message.
            notices = [
                g
                for bodies in got.values()
                for b in bodies
                for g in b.get("gaps") or []  # type: ignore[attr-defined]
                if g["reason"] == "dead_letter"
            ]
            assert notices
            listed = cli("deadletter", "list", str(config), "--json")
            assert listed.returncode == 0, listed.stderr
            letters = orjson.loads(listed.stdout)
            assert letters
            assert {d["device"] for d in letters} == {"d0"}
            assert {(d["code"], d["tries"], d["reason"]) for d in letters} == {
                (0x87, 1, "Not authorized")
            }
            # Fix the ACL (mosquitto re-reads it on SIGHUP), then replay d0's letters.
            (broker.log_path.parent / "acl").write_text(
                _acl([f"edge/gw/{d}" for d in ["d0", *HEALTHY]]), encoding="utf-8"
            )
            assert broker.pid is not None
            os.kill(broker.pid, signal.SIGHUP)
            time.sleep(0.5)
            replay = cli("deadletter", "replay", str(config), "--device", "d0")
            assert replay.returncode == 0, replay.stderr
            assert "queued for replay" in replay.stdout
            replayed = {s for d in letters for s in range(d["first_seq"], d["last_seq"] + 1)}

            def d0_seqs() -> set[int]:
                return {
                    int(s["seq"])
                    for b in _by_device(sub.messages()).get("d0", [])
                    for s in b["samples"]  # type: ignore[attr-defined]
                }

            wait_until(lambda: replayed <= d0_seqs(), WAIT_S, "replayed seqs", agent)
            assert agent.terminate() == 0
        log = agent.log()
        # One connection for the whole run: a refusal never costs the connection.
        assert broker.log_text().count(" as edge-agent-gw ") == 1, broker.log_text()[-2000:]
        assert log.count('"forward.dead_letter"') == 1  # once per device and reason
        assert '"mqtt.disconnected"' not in log
        left = orjson.loads(cli("deadletter", "list", str(config), "--json").stdout)
        assert not {d["id"] for d in left} & {d["id"] for d in letters}


def _big_device(name: str, tags: int, interval_s: float) -> str:
    lines = [
        f"""\
  - name: {name}
    protocol: modbus
    host: 127.0.0.1
    port: 0
    interval_s: {interval_s}
    tags:
"""
    ]
    lines += [
        f"      - {{name: t{i}, address: {i}, type: uint16, simulate: {{generator: counter}}}}\n"
        for i in range(tags)
    ]
    return "".join(lines)


@pytest.mark.parametrize("layout", ["lean", "compact", "device"])
def test_a_2000_tag_device_on_a_16_kib_broker_delivers_everything_beside_a_small_one(
    tmp_path: Path, layout: str
) -> None:
    """mosquitto with max_packet_size 16384 (announced in the CONNACK): every record of
    the 2,000-tag device goes out in parts that fit, with exact seqs, none is lost or
    refused; the small device beside it keeps its rate (twice the big one's polls)."""
    devices = _big_device("big", 2000, 1.0) + counter_device("small", 0.5)
    with MosquittoBroker(
        binary=require_mosquitto(), extra_config=["max_packet_size 16384"]
    ) as broker:
        config = _config(tmp_path, broker, devices)
        text = config.read_text().replace("mqtt:\n", f"mqtt:\n  layout: {layout}\n", 1)
        config.write_text(text)
        decoder = Decoder()
        got: dict[str, list[Decoded]] = {}
        meta_topics: set[str] = set()
        seen = 0

        def take() -> dict[str, list[Decoded]]:
            nonlocal seen
            messages = sub.messages()
            for m in messages[seen:]:
                assert packet_size(Message(m.topic, m.payload)) <= 16384
                if m.topic.startswith("edge-status/"):
                    continue
                d = decoder.decode(m.payload)
                if d.kind == "data":
                    got.setdefault(str(d.device), []).append(d)
                else:
                    meta_topics.add(m.topic)
            seen = len(messages)
            return got

        def polls(device: str) -> int:
            return len({s["ts_agent"] for d in take().get(device, []) for s in d.samples})

        with (
            Subscriber(broker.host, broker.port, "#") as sub,
            AgentProcess(tmp_path / "agent.log", "run", str(config), "--simulate") as agent,
        ):
            wait_until(lambda: polls("big") >= 3, WAIT_S, "three big polls", agent)
            assert agent.terminate() == 0
        take()
        log = agent.log()
    big = [s for d in got["big"] for s in d.samples]
    small = [s for d in got["small"] for s in d.samples]
    # Everything the agent produced arrived (it drains its buffer at a clean stop).
    seqs = sorted({int(s["seq"]) for s in big + small})
    assert seqs == list(range(1, last_seq_logged(agent) + 1))
    big_polls = len({s["ts_agent"] for s in big})
    if layout == "compact":
        # ≈ 6 B per counter: a poll fits one message; its 2,000-entry metadata does not.
        assert len({t for t in meta_topics if t.startswith("edge-meta/gw/big/")}) > 1
    else:
        # In parts: more than one message per big poll, each a slice with exact seqs.
        assert len(got["big"]) > big_polls
    for d in got["big"]:
        assert [s["seq"] for s in d.samples] == list(
            range(d.samples[0]["seq"], d.samples[0]["seq"] + len(d.samples))
        )
    assert len({s["ts_agent"] for s in small}) >= 1.5 * big_polls - 2
    assert '"forward.dead_letter"' not in log
    assert "Packet too large" not in log


async def test_bad_topic_and_raising_encoder_are_dead_lettered_while_others_flow(
    tmp_path: Path,
) -> None:
    class Encoder(PayloadEncoder):
        def encode(
            self, record: Record, *, historical: bool = False, gaps: object = ()
        ) -> list[Message]:
            if record.device == "crash":
                raise ValueError("year 0 is out of range")
            return super().encode(record, historical=historical, gaps=gaps)  # type: ignore[arg-type]

    with MosquittoBroker(binary=require_mosquitto()) as broker:
        mqtt = MqttConfig.model_validate(
            {"host": broker.host, "port": broker.port, "topic": "edge/gw/{device}"}
        )
        buffer = MemoryBuffer(BufferConfig.model_validate({"kind": "memory"}))
        await buffer.open()
        publisher = MqttPublisher(mqtt, "poison-test")
        forwarder = Forwarder(buffer, publisher, Encoder(AgentSection(id="gw"), mqtt))
        with Subscriber(broker.host, broker.port, "edge/gw/#") as sub:
            await publisher.start()
            try:
                async with asyncio.timeout(WAIT_S):
                    await publisher.wait_connected()
                await buffer.append("a+b", [wire_sample("a+b", 1)])
                await buffer.append("crash", [wire_sample("crash", 2)])
                await buffer.append("ok", [wire_sample("ok", 3)])
                await forwarder.forward_once()
                await buffer.append("ok", [wire_sample("ok", 4)])
                await forwarder.forward_once()
                assert publisher.connected  # neither cost the connection
            finally:
                await publisher.close()
            received = await asyncio.to_thread(sub.wait_count, 2)
        bodies = decoded(m.payload for m in received)
        assert [b.samples[0]["seq"] for b in bodies] == [3, 4]
        assert [(g["first_seq"], g["reason"]) for g in bodies[1].gaps] == [
            (1, "dead_letter"),
            (2, "dead_letter"),
        ]
        letters = await forwarder.dead_letters.all()
        assert [(d.device, d.tries) for d in letters] == [("a+b", 1), ("crash", 1)]
        assert letters[0].reason.startswith("invalid message:")
        assert letters[1].reason == "cannot encode: ValueError: year 0 is out of range"
        assert buffer.stats().records == 0
        await buffer.close()


async def test_tag_layout_with_one_tag_denied_by_the_acl_delivers_the_others() -> None:
    acl = "topic write edge/gw/d/ok1\ntopic write edge/gw/d/ok2\ntopic read #\n"
    with MosquittoBroker(binary=require_mosquitto(), acl=acl) as broker:
        mqtt = MqttConfig.model_validate(
            {
                "host": broker.host,
                "port": broker.port,
                "layout": "tag",
                "topic_tag": "edge/gw/{device}/{tag}",
            }
        )
        buffer = MemoryBuffer(BufferConfig.model_validate({"kind": "memory"}))
        await buffer.open()
        publisher = MqttPublisher(mqtt, "tag-acl-test")
        forwarder = Forwarder(buffer, publisher, PayloadEncoder(AgentSection(id="gw"), mqtt))
        with Subscriber(broker.host, broker.port, "edge/gw/#") as sub:
            await publisher.start()
            try:
                async with asyncio.timeout(WAIT_S):
                    await publisher.wait_connected()
                    samples = [
                        wire_sample("d", 1, tag="ok1"),
                        wire_sample("d", 2, tag="denied"),
                        wire_sample("d", 3, tag="ok2"),
                    ]
                    await buffer.append("d", samples)
                    while buffer.stats().records:
                        await forwarder.forward_once()
            finally:
                await publisher.close()
            received = await asyncio.to_thread(sub.wait_count, 4)  # ok1, ok2 twice
        assert {m.topic for m in received} == {"edge/gw/d/ok1", "edge/gw/d/ok2"}
        letters = await forwarder.dead_letters.all()
        assert [(d.first_seq, d.count, d.code) for d in letters] == [(2, 1, 0x87)]
        await buffer.close()
