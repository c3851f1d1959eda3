"""Commands end to end: an MQTT 5 client (paho) sends write requests through a real
mosquitto to the agent, which writes them into the Modbus simulator; the values are read
back exactly, by the agent (the result's `holds`) and by a third-party Modbus client
(pymodbus, decoded here by hand, word order included). Also: the audit topic and the
audit log hold every request; refusals arrive as results; with signing on, an unsigned,
a tampered and a replayed request are refused or answered without a second write."""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.config import Config, parse_config
from agent.runtime import Agent
from agent.simulate import simulators
from tests.support.broker import MosquittoBroker
from tests.support.commander import Commander
from tests.support.readback import coil, registers

pytestmark = pytest.mark.integration

KEY = b"0123456789abcdef0123456789abcdef"


def config_text(tmp: Path, port: int, signing: str = "") -> str:
    return f"""\
agent: {{id: gw4}}
mqtt: {{port: {port}}}
buffer: {{path: {tmp / "buffer.db"}}}
commands:
  enabled: true
  timeout_s: 10
  audit: {{path: {tmp / "audit.jsonl"}}}
{signing}
devices:
  - name: press
    protocol: modbus
    host: 127.0.0.1
    port: 0
    interval_s: 0.2
    byte_order: ABCD
    tags:
      - {{name: permit, table: coil, address: 0, type: bool,
          simulate: {{generator: constant, value: true}}}}
      - {{name: valve, table: coil, address: 1, type: bool, writable: true}}
      - {{name: f32_cdab, address: 10, type: float32, byte_order: CDAB, writable: true,
          write: {{interlock: permit}}}}
      - {{name: temp_sp, address: 20, type: int16, scale: 0.1, unit: degC, writable: true,
          simulate: {{generator: constant, value: 20}},
          write: {{min: -50, max: 300, max_step: 100}}}}
      - {{name: count, address: 30, type: uint32, byte_order: CDAB, writable: true}}
      - {{name: f64, address: 40, type: float64, byte_order: DCBA, writable: true}}
      - {{name: recipe, address: 50, type: string, length: 4, writable: true}}
      - {{name: mode_bit, address: 60, type: bit, bit: 3, writable: true}}
      - {{name: measured, address: 70, type: float32}}
"""


@dataclass
class Running:
    agent: Agent
    config: Config
    commander: Commander
    port: int
    tmp: Path

    def audit_log(self) -> list[dict[str, Any]]:
        text = (self.tmp / "audit.jsonl").read_text()
        return [json.loads(line) for line in text.splitlines()]


def _up(agent: Agent) -> bool:
    return bool(
        agent.pollers
        and agent.pollers[0].status.state == "up"
        and agent.current_publisher is not None
        and agent.current_publisher.connected
    )


@contextlib.asynccontextmanager
async def agent_with_commander(
    config: Config,
    broker: MosquittoBroker,
    *,
    simulate: bool,
    command_topic: str = "edge-cmd/gw4/write",
    ready: Callable[[Agent], bool] = _up,
) -> AsyncIterator[tuple[Agent, Commander]]:
    """The agent running on `config` and a platform-side commander, once `ready`."""
    agent = Agent(config, grace_s=2, simulate=simulate)
    task = asyncio.create_task(agent.run())
    commander = await asyncio.to_thread(
        Commander,
        broker.host,
        broker.port,
        command_topic=command_topic,
        audit_topic="edge-audit/gw4",
    )
    try:
        async with asyncio.timeout(30):
            while not ready(agent):
                await asyncio.sleep(0.05)
        yield agent, commander
    finally:
        commander.close()
        agent.stop()
        await task


async def _running(tmp: Path, broker: MosquittoBroker, signing: str = "") -> AsyncIterator[Running]:
    config = parse_config(config_text(tmp, broker.port, signing), simulate=True)
    async with (
        simulators(config) as simulated,
        agent_with_commander(simulated, broker, simulate=True) as (agent, commander),
    ):
        port = simulated.devices[0].port  # type: ignore[attr-defined]
        yield Running(agent, simulated, commander, port, tmp)


@pytest.fixture
async def running(tmp_path: Path, broker: MosquittoBroker) -> AsyncIterator[Running]:
    async for r in _running(tmp_path, broker):
        yield r


async def request(r: Running, tag: str, value: object, **kw: Any) -> dict[str, Any]:
    body = {"device": "press", "tag": tag, "value": value}
    if "ts" in kw:
        body["ts"] = kw.pop("ts")
    return await asyncio.to_thread(r.commander.request, body, **kw)


def f32(x: float) -> float:
    return float(struct.unpack(">f", struct.pack(">f", x))[0])


async def test_setpoints_reach_the_simulator_exactly(running: Running) -> None:
    r = running
    cases: list[tuple[str, object, object]] = [
        ("f32_cdab", -1234.5678, f32(-1234.5678)),
        ("temp_sp", 72.5, 72.5),
        ("count", 3_000_000_123, 3_000_000_123),
        ("f64", 1e-300 * 3, 3e-300),
        ("recipe", "R-42", "R-42"),
        ("valve", True, True),
        ("mode_bit", True, True),
    ]
    for tag, value, holds in cases:
        result = await request(r, tag, value)
        assert result["result"] == "done", result
        assert result["verified"] is True
        assert result["holds"] == holds, (tag, result)
    # Read back by a third party, decoded by hand.
    hi_lo = await registers(r.port, 10, 2)
    cdab = struct.pack(">HH", hi_lo[1], hi_lo[0])  # CDAB: low word first
    assert struct.unpack(">f", cdab)[0] == f32(-1234.5678)
    assert struct.unpack(">h", struct.pack(">H", (await registers(r.port, 20, 1))[0]))[0] == 725
    lo, hi = await registers(r.port, 30, 2)
    assert (hi << 16) | lo == 3_000_000_123
    words = await registers(r.port, 40, 4)
    dcba = b"".join(struct.pack("<H", w) for w in reversed(words))
    assert struct.unpack(">d", dcba)[0] == 3e-300
    text = b"".join(struct.pack(">H", w) for w in await registers(r.port, 50, 4))
    assert text.rstrip(b"\0") == b"R-42"
    assert await coil(r.port, 1) is True
    assert (await registers(r.port, 60, 1))[0] & 0b1000


async def test_refusals_arrive_as_results_and_nothing_is_written(running: Running) -> None:
    r = running
    before = await registers(r.port, 20, 1)
    cases = [
        ("temp_sp", 301, "above_max", "301 is above max 300"),
        ("temp_sp", "warm", "wrong_type", "'warm' is not a number for int16"),
        ("measured", 1.0, "not_writable", "tag 'measured' is not writable: true"),
        ("nope", 1.0, "unknown_tag", "device 'press' has no tag 'nope'"),
        (
            "temp_sp",
            3276.8,
            "out_of_range",
            "3276.8 is out of range (raw 32,768): int16 holds -32,768 .. 32,767",
        ),
    ]
    for tag, value, reason, detail in cases:
        result = await request(r, tag, value)
        assert (result["result"], result["reason"], result["detail"]) == (
            "refused",
            reason,
            detail,
        )
    assert await registers(r.port, 20, 1) == before


async def test_audit_topic_and_log_hold_every_request(running: Running) -> None:
    r = running
    done = await request(r, "temp_sp", 20.0)
    refused = await request(r, "temp_sp", 999)
    failed_before = r.commander.audits
    assert done["result"] == "done"
    assert refused["result"] == "refused"
    audits = await asyncio.to_thread(r.commander.wait_audits, 3)  # accepted, result, result
    del failed_before
    events = [(a["event"], a.get("result"), a["value"]) for a in audits]
    assert events == [
        ("accepted", None, 20.0),
        ("result", "done", 20.0),
        ("result", "refused", 999),
    ]
    log = r.audit_log()
    assert [(a["event"], a.get("result")) for a in log] == [(e, res) for e, res, _ in events]
    final = log[1]
    assert final["who"] == {
        "channel": "mqtt",
        "client_id": "mes-line4",
        "user": "operator-7",
        "signer": None,
    }
    assert final["holds"] == 20.0
    assert final["previous"] is not None
    assert final["topic"] == "edge-cmd/gw4/write"


async def test_a_repeated_correlation_id_is_not_a_second_write(running: Running) -> None:
    r = running
    corr = b"order-4711"
    first = await request(r, "temp_sp", 30.0, correlation=corr)
    second = await request(r, "temp_sp", 35.0, correlation=corr, n=2)
    assert first["result"] == "done"
    assert second["duplicate"] is True
    assert second["value"] == 30.0
    assert (await registers(r.port, 20, 1))[0] == 300
    accepted = [a for a in r.audit_log() if a["event"] == "accepted"]
    assert len(accepted) == 1


@pytest.fixture
async def signed(tmp_path: Path, broker: MosquittoBroker) -> AsyncIterator[Running]:
    key = tmp_path / "platform.key"
    key.write_bytes(KEY + b"\n")
    key.chmod(0o600)
    signing = f"  signing: {{key_file: {key}, window_s: 30, signer: mes}}\n"
    async for r in _running(tmp_path, broker, signing):
        yield r


async def test_signing_refuses_unsigned_tampered_and_stale(signed: Running) -> None:
    r = signed
    now = time.time()
    ok = await request(r, "temp_sp", 40.0, ts=now, key=KEY)
    assert ok["result"] == "done", ok
    assert r.audit_log()[-1]["who"]["signer"] == "mes"
    unsigned = await request(r, "temp_sp", 41.0, ts=now)
    assert (unsigned["result"], unsigned["reason"]) == ("refused", "unsigned")
    wrong = await request(r, "temp_sp", 41.0, ts=now, key=b"x" * 32)
    assert (wrong["result"], wrong["reason"]) == ("refused", "bad_signature")
    stale = await request(r, "temp_sp", 41.0, ts=now - 120, key=KEY)
    assert (stale["result"], stale["reason"], stale["detail"][:22]) == (
        "refused",
        "expired",
        "the request was sent 1",
    )
    # A captured signed request replayed as it is: its first result, no second write.
    corr = b"captured"
    body = json.dumps(
        {"device": "press", "tag": "temp_sp", "value": 45.0, "ts": time.time()}
    ).encode()
    await asyncio.to_thread(r.commander.send, body, correlation=corr, key=KEY)
    first = await asyncio.to_thread(r.commander.wait_result, corr)
    await asyncio.to_thread(r.commander.send, body, correlation=corr, key=KEY)
    replay = await asyncio.to_thread(r.commander.wait_result, corr, n=2)
    assert first["result"] == "done"
    assert replay["duplicate"] is True
    # ... and replayed under a new correlation id, its signature no longer matches.
    from agent.command.signing import sign

    await asyncio.to_thread(
        r.commander.send, body, correlation=b"new-id", signature=sign(KEY, corr, body)
    )
    moved = await asyncio.to_thread(r.commander.wait_result, b"new-id")
    assert (moved["result"], moved["reason"]) == ("refused", "bad_signature")
    accepted = [a for a in r.audit_log() if a["event"] == "accepted"]
    assert [a["value"] for a in accepted] == [40.0, 45.0]
    assert (await registers(r.port, 20, 1))[0] == 450


async def test_sparkplug_dcmd_writes_by_name_and_alias(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    from tests.support.sparkplug import generate_bindings

    pb = generate_bindings(tmp_path)
    text = config_text(tmp_path, broker.port).replace(
        "mqtt: {port", "mqtt: {layout: sparkplug, sparkplug: {group_id: plant}, port"
    )
    config = parse_config(text, simulate=True)
    async with (
        simulators(config) as simulated,
        agent_with_commander(
            simulated,
            broker,
            simulate=True,
            command_topic="unused",
            ready=lambda a: bool(a.sparkplug and a.sparkplug.stats.device_births),
        ) as (agent, commander),
    ):
        assert agent.sparkplug is not None
        alias = next(
            m.alias for m in agent.sparkplug._devices["press"].metrics.values() if m.name == "count"
        )
        payload = pb.Payload()
        payload.timestamp = int(time.time() * 1000)
        m = payload.metrics.add()
        m.name, m.datatype, m.float_value = "f32_cdab", 9, 12.25
        m = payload.metrics.add()
        m.alias, m.datatype, m.long_value = alias, 8, 77
        import paho.mqtt.publish as publish

        await asyncio.to_thread(
            publish.single,
            "spBv1.0/plant/DCMD/gw4/press",
            payload.SerializeToString(),
            qos=1,
            hostname=broker.host,
            port=broker.port,
        )
        audits = await asyncio.to_thread(commander.wait_audits, 4)
        finals = [a for a in audits if a["event"] == "result"]
        assert sorted((a["tag"], a["result"], a["holds"]) for a in finals) == [
            ("count", "done", 77),
            ("f32_cdab", "done", 12.25),
        ]
        assert all(a["who"]["channel"] == "sparkplug" for a in finals)
        port = simulated.devices[0].port  # type: ignore[attr-defined]
        lo, hi = await registers(port, 30, 2)
        assert (hi << 16) | lo == 77


async def test_commands_over_an_authenticated_tls_session(tmp_path: Path) -> None:
    """Outside simulator mode: the agent's session is mutual TLS (its client certificate is
    what authenticates it); the platform publishes on the broker's other listener."""
    from drivers.modbus.config import ModbusDevice
    from drivers.modbus.simulator import ModbusSimulator
    from tests.support.broker import TlsListener, require_mosquitto
    from tests.support.certs import TestPki

    pki = TestPki.create(tmp_path / "pki")
    listener = TlsListener(certfile=pki.server_cert, keyfile=pki.server_key, cafile=pki.ca)
    with MosquittoBroker(tls=listener, binary=require_mosquitto()) as broker:
        probe = parse_config(config_text(tmp_path, broker.port), simulate=True)
        device = probe.devices[0]
        assert isinstance(device, ModbusDevice)
        async with ModbusSimulator([device]) as sim:
            _, port = sim.endpoints["press"]
            tls = (
                f"mqtt: {{port: {broker.tls_port}, tls: {{ca_file: {pki.ca}, "
                f"cert_file: {pki.client_cert}, key_file: {pki.client_key}}}}}"
            )
            text = (
                config_text(tmp_path, broker.port)
                .replace(f"mqtt: {{port: {broker.port}}}", tls)
                .replace("port: 0", f"port: {port}")
            )
            config = parse_config(text, simulate=False)  # validate accepts it
            async with agent_with_commander(config, broker, simulate=False) as (
                agent,
                commander,
            ):
                r = Running(agent, config, commander, port, tmp_path)
                result = await request(r, "f32_cdab", 3.5)
                assert (result["result"], result["holds"]) == ("done", 3.5)


async def test_status_and_metrics_count_the_results(running: Running) -> None:
    from agent.http.metrics import make_registry, render
    from agent.http.status import status_json

    r = running
    assert (await request(r, "temp_sp", 25.0))["result"] == "done"
    assert (await request(r, "temp_sp", 999))["result"] == "refused"
    corr = b"twice"
    await request(r, "temp_sp", 26.0, correlation=corr)
    await request(r, "temp_sp", 26.0, correlation=corr, n=2)
    assert r.agent.commands is not None
    service = r.agent.commands
    async with asyncio.timeout(10):  # the last task ends just after its result is out
        while service.pending:
            await asyncio.sleep(0.01)
    status = status_json(r.agent.snapshot())["commands"]
    assert status["results"] == {"done": 2, "refused": 1, "duplicate": 1}
    assert (status["received"], status["pending"], status["dropped"]) == (4, 0, 0)
    text = render(make_registry(r.agent.snapshot)).decode()
    assert 'edge_agent_commands_total{result="done"} 2.0' in text
    assert "edge_agent_commands_pending 0.0" in text
