"""The whole path of docs/datasets.md with real parts: the simulated moulding machine
(`edge-agent simulate configs/moulding-sim.yaml`, a real Modbus server) → the agent (cycle
snapshots) → a real mosquitto → `edge-agent collect` → `edge-agent export` → pandas.

Through a broker outage, a SIGKILL of the collector and a SIGKILL of the agent, the
dataset has one row per shot, none missing, none twice, each row exactly the simulated
machine's parameters of that shot. (Shots that end while the agent is dead cannot be
read; they are marked in `gap_before`: tests/unit/test_dataset_export.py.)"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from agent.dataset.collector import data_files, read_samples
from drivers.machines import MouldingMachine
from tests.support.agent_proc import ROOT, AgentProcess, cli
from tests.support.broker import MosquittoBroker, require_mosquitto

pytestmark = pytest.mark.integration

CONFIG = ROOT / "configs" / "moulding-sim.yaml"
#: The example's shots, slowed from 4 s to 8 s: an agent killed right after a shot is back
#: before the next one, so no shot may be missing.
PERIOD_S = 8.0
FLOAT32 = ("cycle_time", "injection_time", "cushion", "injection_pressure", "holding_pressure")
INT16_TENTHS = ("barrel_temperature_1", "mould_temperature_1", "hopper_temperature")


@pytest.fixture
def persistent_broker() -> Iterator[MosquittoBroker]:
    """A broker that keeps sessions and queued messages across its own restart."""
    broker = MosquittoBroker(binary=require_mosquitto(), persistent=True)
    try:
        yield broker.start()
    finally:
        broker.close()


def shots(folder: Path) -> list[int]:
    """Cycle ids of the shot records in the collector's files (open hour included)."""
    return [
        int(s["cycle"])
        for f in data_files(folder, include_open=True)
        for s in read_samples(f)
        if s["tag"] == "shot"
    ]


def wait_for(predicate: object, timeout_s: float, what: str, *procs: AgentProcess) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.log_path.name}\n{p.log()[-3000:]}" for p in procs)
            raise AssertionError(f"timed out waiting for {what}\n{logs}")
        time.sleep(0.2)


@pytest.mark.timeout(300)
def test_one_row_per_shot_through_outage_and_kills(
    tmp_path: Path, persistent_broker: MosquittoBroker
) -> None:
    broker = persistent_broker
    out = tmp_path / "collect"
    text = CONFIG.read_text()
    assert text.count("period_s: 4,") == 22
    config = tmp_path / "moulding.yaml"
    config.write_text(text.replace("period_s: 4,", f"period_s: {PERIOD_S:g},"))
    env = {"MQTT_PORT": str(broker.port), "EDGE_BUFFER": str(tmp_path / "buffer.db")}
    topic = "edge/gw-moulding/+"
    collect_args = ("collect", "--broker", f"127.0.0.1:{broker.port}", "--topic", topic,
                    "--out", str(out), "--client-id", "collector-1")  # fmt: skip
    with AgentProcess(tmp_path / "sim.log", "simulate", str(config), env={"IMM_PORT": "0"}) as sim:
        name, _, endpoint = sim.read_line().split("\t")
        assert name == "imm-1"
        env["IMM_PORT"] = endpoint.rsplit(":", 1)[1]
        collector = AgentProcess(tmp_path / "collect1.log", *collect_args).start()
        agent = AgentProcess(tmp_path / "agent1.log", "run", str(config), env=env).start()
        try:
            wait_for(lambda: len(shots(out)) >= 2, 90, "2 shots", agent, collector)

            broker.stop()  # outage: the agent buffers, the collector reconnects
            time.sleep(PERIOD_S)
            broker.start()
            before_outage = len(shots(out))
            wait_for(lambda: len(shots(out)) >= before_outage + 2, 90, "shots after outage",
                     agent, collector)  # fmt: skip

            collector.close()  # SIGKILL: unacknowledged messages come again
            collector = AgentProcess(tmp_path / "collect2.log", *collect_args).start()
            seen = len(shots(out))
            wait_for(lambda: len(shots(out)) > seen, 90, "a shot", agent, collector)
            agent.close()  # SIGKILL, right after a shot, and start again at once
            agent = AgentProcess(tmp_path / "agent2.log", "run", str(config), env=env).start()
            seen = len(shots(out))
            wait_for(lambda: len(shots(out)) >= seen + 2, 90, "shots after the kill",
                     agent, collector)  # fmt: skip
            assert agent.terminate() == 0
            # Everything the agent published is in the files once the count stays put.
            last = -1
            while last != len(shots(out)):
                last = len(shots(out))
                time.sleep(1.5)
            assert collector.terminate() == 0
        finally:
            agent.close()
            collector.close()

    csv_out, pq_out = tmp_path / "shots.csv", tmp_path / "shots.parquet"
    for target in (csv_out, pq_out):
        done = cli("export", "--from", str(out), "--include-open", "--shape", "cycle",
                   "--cycle", "shot", "--out", str(target))  # fmt: skip
        assert done.returncode == 0, done.stderr
    df = pd.read_csv(csv_out)
    dfp = pd.read_parquet(pq_out)
    assert list(dfp.columns) == list(df.columns)
    assert df["cycle"].tolist() == dfp["cycle"].tolist()
    assert list(df.columns[:4]) == ["cycle", "ts", "device", "gap_before"]
    for column in (*FLOAT32, *INT16_TENTHS, "pass_fail"):
        assert column in df.columns
        assert f"{column}__quality" in df.columns

    ids = df["cycle"].tolist()
    assert len(ids) >= 7
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # no shot missing, none twice
    assert (df["gap_before"] == 0).all()

    machine = MouldingMachine(period_s=PERIOD_S, seed=0)
    for _, row in df.iterrows():  # each row is the machine's shot, all columns of one shot
        expected = machine.shot(int(row["cycle"])).values
        for column in FLOAT32:
            assert row[column] == float(np.float32(expected[column])), column
        for column in INT16_TENTHS:
            assert row[column] == pytest.approx(round(float(expected[column]) * 10) / 10)
        assert bool(row["pass_fail"]) is expected["pass_fail"]
        assert row["cushion__quality"] == "good"


@pytest.mark.timeout(200)
def test_press_windows_to_a_dataset(tmp_path: Path, persistent_broker: MosquittoBroker) -> None:
    """configs/press-sim.yaml: 10 Hz vibration and current, 1 s windows at the edge, one
    row per window in the export, the features of the simulated press."""
    broker = persistent_broker
    out = tmp_path / "collect"
    env = {
        "MQTT_PORT": str(broker.port),
        "EDGE_BUFFER": str(tmp_path / "buffer.db"),
        "PRESS_PORT": "0",
    }
    config = ROOT / "configs" / "press-sim.yaml"
    collector = AgentProcess(tmp_path / "collect.log", "collect", str(config), "--out", str(out),
                             env=env).start()  # fmt: skip
    agent = AgentProcess(tmp_path / "agent.log", "run", str(config), "--simulate", env=env)
    try:
        agent.start()

        def windows() -> int:
            return sum(
                1
                for f in data_files(out, include_open=True)
                for s in read_samples(f)
                if s["tag"] == "vibration.rms"
            )

        wait_for(lambda: windows() >= 6, 90, "6 windows", agent, collector)
        assert agent.terminate() == 0
        assert collector.terminate() == 0
    finally:
        agent.close()
        collector.close()
    target = tmp_path / "press.parquet"
    done = cli("export", "--from", str(out), "--include-open", "--shape", "window",
               "--out", str(target))  # fmt: skip
    assert done.returncode == 0, done.stderr
    df = pd.read_parquet(target)
    assert list(df.columns[:3]) == ["ts", "window_start", "device"]
    for tag in ("vibration", "motor_current"):
        for feature in ("mean", "std", "rms", "min", "max", "peak_to_peak", "crest_factor",
                        "kurtosis", "good_share"):  # fmt: skip
            assert f"{tag}.{feature}" in df.columns
            assert f"{tag}.{feature}__quality" in df.columns
    assert "fault_level.max" in df.columns
    assert "stroke_count" not in df.columns  # a raw tag: not a window feature
    whole = df[df["vibration.rms__quality"] == "good"]  # the first window is partial
    assert len(whole) >= 4
    assert ((whole["ts"] - whole["window_start"]).dt.total_seconds() == 1.0).all()
    assert (whole["vibration.good_share"] == 1.0).all()
    assert (whole["vibration.rms"] > 0.5).all()  # the running frequency's amplitude ~1 mm/s
    assert (whole["motor_current.min"] > 10).all()  # the idle current
    assert (whole["fault_level.max"] == 0.0).all()  # healthy for the first 4 minutes
