"""Setpoints from an MQTT 5 client through the real agent process (`edge-agent run
--simulate`) into the simulator of every protocol (Modbus, OPC UA, MELSEC, S7, XGT), read
back exactly: by the agent (the result's `holds`) and by third-party clients (pymodbus,
asyncua, pymcprotocol, python-snap7, pyXGTClient) that decode on their own."""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from asyncua.client.client import Client

from tests.support.agent_proc import AgentProcess, wait_until
from tests.support.broker import MosquittoBroker, free_port
from tests.support.commander import Commander
from tests.support.readback import registers

pytestmark = pytest.mark.integration


def f32(x: float) -> float:
    return float(struct.unpack(">f", struct.pack(">f", x))[0])


def plant_config(tmp: Path, broker: MosquittoBroker, ports: dict[str, int]) -> Path:
    path = tmp / "plant.yaml"
    path.write_text(
        f"""\
agent: {{id: gw-e2e}}
mqtt: {{port: {broker.port}, reconnect_min_s: 0.2, reconnect_max_s: 1}}
buffer: {{path: {tmp / "buffer.db"}}}
logging: {{level: info, format: json}}
commands:
  enabled: true
  audit: {{path: {tmp / "audit.jsonl"}}}
devices:
  - name: press
    protocol: modbus
    host: 127.0.0.1
    port: {ports["modbus"]}
    interval_s: 0.5
    tags:
      - {{name: pressure_sp, address: 10, type: float32, byte_order: CDAB, unit: bar,
          writable: true}}
      - {{name: speed_sp, address: 12, type: uint16, scale: 0.5, writable: true,
          write: {{max: 1000}}}}
  - name: oven
    protocol: opcua
    endpoint: opc.tcp://127.0.0.1:{ports["opcua"]}/oven
    interval_s: 0.5
    tags:
      - {{name: temp_sp, node_id: "ns=2;s=Oven.TempSp", type: Float, writable: true}}
      - {{name: zone, node_id: "ns=2;s=Oven.Zone", type: Int16, writable: true}}
      - {{name: heater_on, node_id: "ns=2;s=Oven.HeaterOn", type: Boolean, writable: true}}
      - {{name: recipe, node_id: "ns=2;s=Oven.Recipe", type: String, writable: true}}
      - {{name: energy, node_id: "ns=2;s=Oven.Energy", type: Double, scale: 0.001,
          writable: true}}
  - name: fx
    protocol: melsec
    series: q
    host: 127.0.0.1
    port: {ports["melsec"]}
    interval_s: 0.5
    tags:
      - {{name: flow_sp, address: D200, type: float32, writable: true}}
      - {{name: level_sp, address: D210, type: int16, scale: 0.1, writable: true}}
      - {{name: pump, address: M10, type: bool, writable: true}}
      - {{name: mode_bit, address: D220.3, writable: true}}
  - name: s7
    protocol: s7
    host: 127.0.0.1
    port: {ports["s7"]}
    interval_s: 0.5
    tags:
      - {{name: feed_sp, address: DB1.DBD0, type: real, writable: true}}
      - {{name: count_sp, address: DB1.DBW4, type: int, scale: 0.5, writable: true}}
      - {{name: enable, address: DB1.DBX6.2, type: bool, writable: true}}
  - name: xgt
    protocol: xgt
    host: 127.0.0.1
    port: {ports["xgt"]}
    cpu: XGK
    interval_s: 0.5
    tags:
      - {{name: torque_sp, address: "%MD50", type: float32, writable: true}}
      - {{name: batch, address: "%MW104", type: int16, writable: true}}
      - {{name: lamp, address: "%MX1683", writable: true}}
"""
    )
    return path


async def opcua_values(port: int, nodes: list[str]) -> list[Any]:
    async with Client(f"opc.tcp://127.0.0.1:{port}/oven") as client:
        return [await client.get_node(n).read_value() for n in nodes]


def melsec_read(port: int) -> tuple[list[int], list[int]]:
    """D200..D220 and M10 with pymcprotocol (a third-party SLMP 3E client)."""
    import pymcprotocol

    client = pymcprotocol.Type3E(plctype="Q")
    client.connect("127.0.0.1", port)
    try:
        words = client.batchread_wordunits("D200", 21)
        bits = client.batchread_bitunits("M10", 1)
    finally:
        client.close()
    return [w & 0xFFFF for w in words], list(bits)


def s7_read(port: int) -> bytes:
    """DB1.DBB0..6 with python-snap7's client."""
    import snap7

    client = snap7.Client()
    client.connect("127.0.0.1", 0, 1, port)
    try:
        return bytes(client.db_read(1, 0, 7))
    finally:
        client.disconnect()


def xgt_read(port: int) -> tuple[bytes, list[int]]:
    """%MD50, %MW104 (as bytes) and %MX1683 with pyXGTClient."""
    from pyXGTClient.client import XGTClient

    client = XGTClient(host="127.0.0.1", port=port, timeout=5.0)
    assert client.open()
    try:
        # Only configured bytes are served: %MD50 is bytes 200-203, %MW104 bytes 208-209.
        mem = bytes(client.readContinuousData("%MB200", 4)) + bytes(
            client.readContinuousData("%MB208", 2)
        )
        return mem, client.readData(["%MX1683"])
    finally:
        client.close()


def test_setpoints_through_the_agent_process(tmp_path: Path, broker: MosquittoBroker) -> None:
    ports = {p: free_port() for p in ("modbus", "opcua", "melsec", "s7", "xgt")}
    modbus_port, opcua_port, melsec_port = ports["modbus"], ports["opcua"], ports["melsec"]
    config = plant_config(tmp_path, broker, ports)
    commander = Commander(
        broker.host,
        broker.port,
        command_topic="edge-cmd/gw-e2e/write",
        audit_topic="edge-audit/gw-e2e",
    )
    try:
        with AgentProcess(tmp_path / "agent.log", "run", str(config), "--simulate") as agent:
            wait_until(lambda: "command.enabled" in agent.log(), 60, "commands", agent)
            wait_until(
                lambda: agent.log().count('"device.connected"') >= 5, 60, "devices up", agent
            )
            wait_until(lambda: '"mqtt.connected"' in agent.log(), 60, "broker", agent)
            cases: list[tuple[str, str, object, object]] = [
                ("press", "pressure_sp", 12.345, f32(12.345)),
                ("press", "speed_sp", 480.5, 480.5),
                ("oven", "temp_sp", 182.7, f32(182.7)),
                ("oven", "zone", -3, -3),
                ("oven", "heater_on", True, True),
                ("oven", "recipe", "PA6-GF30", "PA6-GF30"),
                ("oven", "energy", 1234.5, 1234.5),
                ("fx", "flow_sp", -0.125, -0.125),
                ("fx", "level_sp", -12.3, -12.3),
                ("fx", "pump", True, True),
                ("fx", "mode_bit", True, True),
                ("s7", "feed_sp", 0.3, f32(0.3)),
                ("s7", "count_sp", -250.5, -250.5),
                ("s7", "enable", True, True),
                ("xgt", "torque_sp", 55.55, f32(55.55)),
                ("xgt", "batch", -7, -7),
                ("xgt", "lamp", True, True),
            ]
            for device, tag, value, holds in cases:
                result = commander.request({"device": device, "tag": tag, "value": value})
                assert result["result"] == "done", (tag, result, agent.log()[-3000:])
                assert result["verified"] is True
                assert result["holds"] == holds, (tag, result)
            refused = commander.request({"device": "oven", "tag": "zone", "value": 40000})
            assert (refused["result"], refused["reason"]) == ("refused", "out_of_range")
            # Third-party read-back, decoded independently.
            regs = asyncio.run(registers(modbus_port, 10, 3))
            cdab = struct.pack(">HH", regs[1], regs[0])
            assert struct.unpack(">f", cdab)[0] == f32(12.345)
            assert regs[2] == 961  # 480.5 / 0.5
            values = asyncio.run(
                opcua_values(
                    opcua_port,
                    [
                        "ns=2;s=Oven.TempSp",
                        "ns=2;s=Oven.Zone",
                        "ns=2;s=Oven.HeaterOn",
                        "ns=2;s=Oven.Recipe",
                        "ns=2;s=Oven.Energy",
                    ],
                )
            )
            assert values == [f32(182.7), -3, True, "PA6-GF30", 1234500.0]
            words, bits = melsec_read(melsec_port)
            assert struct.unpack("<f", struct.pack("<HH", words[0], words[1]))[0] == -0.125
            assert struct.unpack("<h", struct.pack("<H", words[10]))[0] == -123
            assert words[20] & 0b1000
            assert bits == [1]
            db = s7_read(ports["s7"])
            assert struct.unpack(">f", db[0:4])[0] == f32(0.3)
            assert struct.unpack(">h", db[4:6])[0] == -501
            assert db[6] & 0b100
            mem, lamp = xgt_read(ports["xgt"])
            assert struct.unpack("<f", mem[0:4])[0] == f32(55.55)
            assert struct.unpack("<h", mem[4:6])[0] == -7
            assert lamp == [1]
            audits = commander.wait_audits(2 * len(cases) + 1)
            assert agent.terminate() == 0
    finally:
        commander.close()
    assert sum(1 for a in audits if a["event"] == "accepted") == len(cases)
    log = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(a["event"], a.get("result")) for a in log] == [
        (a["event"], a.get("result")) for a in audits
    ]
