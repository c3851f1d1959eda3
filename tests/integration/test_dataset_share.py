"""The consumer side with a real mosquitto: two collectors in one shared subscription
split the messages and export joins their folders without a duplicate or a hole;
`export --broker` writes a dataset straight from a subscription; a collector started
against a broker that is not there says so and exits 1."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import pandas as pd
from paho.mqtt.enums import CallbackAPIVersion

from agent.dataset.collector import data_files, read_samples
from tests.support.agent_proc import AgentProcess, cli
from tests.support.broker import MosquittoBroker, free_port


def batch(first_seq: int, shot: int) -> bytes:
    ts = f"2026-12-01T10:{shot // 60 % 60:02d}:{shot % 60:02d}Z"
    samples = [
        {"device": "imm-1", "tag": "shot_count", "value": shot, "quality": "good",
         "seq": first_seq, "ts_agent": ts},
        {"device": "imm-1", "tag": "cushion", "value": 4.0 + shot / 1000, "quality": "good",
         "unit": "mm", "seq": first_seq + 1, "ts_agent": ts},
    ]  # fmt: skip
    head = {"schema": "edge-agent/batch/1", "agent": "gw", "epoch": "e1", "device": "imm-1"}
    return orjson.dumps({**head, "samples": samples})


def publish(broker: MosquittoBroker, payloads: list[bytes], topic: str = "edge/gw/imm-1") -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        infos = [client.publish(topic, p, qos=1) for p in payloads]
        for info in infos:
            info.wait_for_publish(timeout=30)
    finally:
        client.disconnect()
        client.loop_stop()


def seqs_in(folder: Path) -> list[int]:
    return [s["seq"] for f in data_files(folder, include_open=True) for s in read_samples(f)]


def wait_for(predicate: object, timeout_s: float, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_two_collectors_share_the_load_and_export_joins_them(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    folders = [tmp_path / "a", tmp_path / "b"]
    procs = [
        AgentProcess(tmp_path / f"collect-{i}.log", "collect", "--broker",
                     f"127.0.0.1:{broker.port}", "--topic", "edge/#", "--share", "historian",
                     "--client-id", f"collector-{i}", "--out", str(folder)).start()
        for i, folder in enumerate(folders)
    ]  # fmt: skip
    try:
        wait_for(
            lambda: broker.log_text().count("$share/historian/edge/#") >= 2, 60, "2 subscriptions"
        )
        payloads = [batch(2 * k + 1, k + 1) for k in range(200)]
        publish(broker, payloads[:120])
        publish(broker, payloads[100:])  # 20 messages a second time (a resend)
        wait_for(lambda: len(set(seqs_in(folders[0]) + seqs_in(folders[1]))) >= 400, 60, "400")
        for p in procs:
            assert p.terminate() == 0
    finally:
        for p in procs:
            p.close()
    parts = [seqs_in(f) for f in folders]
    assert all(parts)  # each member got a share
    for part in parts:  # no duplicate within a member's folder
        assert len(part) == len(set(part))
    assert set(parts[0]) | set(parts[1]) == set(range(1, 401))  # no hole
    out = tmp_path / "shots.csv"
    done = cli("export", "--from", str(folders[0]), "--from", str(folders[1]), "--include-open",
               "--shape", "cycle", "--counter", "shot_count", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    df = pd.read_csv(out)
    assert df["cycle"].tolist() == list(range(1, 201))  # a resend that reached the other
    assert df["gap_before"].sum() == 0  # member is dropped at export


def test_export_straight_from_a_subscription(tmp_path: Path, broker: MosquittoBroker) -> None:
    out = tmp_path / "live.parquet"
    export = AgentProcess(tmp_path / "export.log", "export", "--broker",
                          f"127.0.0.1:{broker.port}", "--count", "12", "--out", str(out),
                          "--shape", "cycle", "--counter", "shot_count").start()  # fmt: skip
    try:
        wait_for(lambda: "subscribed to edge/#" in export.log(), 60, "the subscription")
        junk = [b"not json", b'{"schema": "edge-agent/other/1"}']
        publish(broker, [batch(2 * k + 1, k + 1) for k in range(10)] + junk)
        assert export.proc is not None
        assert export.proc.wait(timeout=60) == 0, export.log()
    finally:
        export.close()
    log = export.log()
    assert "skipped a message on edge/gw/imm-1: not JSON" in log
    assert "2 message(s) skipped in all" in log
    df = pd.read_parquet(out)
    assert df["cycle"].tolist() == list(range(1, 11))
    assert df["cushion"].tolist() == [4.0 + k / 1000 for k in range(1, 11)]


def test_collect_without_a_broker_exits_1(tmp_path: Path) -> None:
    port = free_port()
    done = cli("collect", "--broker", f"127.0.0.1:{port}", "--out", str(tmp_path / "c"))
    assert done.returncode == 1
    assert f"cannot connect to 127.0.0.1:{port}" in done.stderr
    bad = cli("collect", "--broker", "nohost", "--out", str(tmp_path / "c"))
    assert bad.returncode == 2
    assert "--broker must be HOST:PORT" in bad.stderr
