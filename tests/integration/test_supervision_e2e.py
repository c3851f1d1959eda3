"""Supervision on the real agent process (simulator mode, real mosquitto): a fault injected
into the buffer under the forwarder is logged with its traceback, the forwarder is
restarted and delivery resumes with no sample lost; a fault that never stops makes the
agent exit 1 with one `agent.failed` line naming the task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.agent_proc import (
    assert_continuous,
    counter_device,
    last_seq_logged,
    seqs,
    wait_until,
)
from tests.support.broker import MosquittoBroker
from tests.support.faulty_agent import FaultyAgentProcess
from tests.support.subscriber import Subscriber

pytestmark = pytest.mark.integration


def write_config(tmp: Path, broker: MosquittoBroker) -> Path:
    path = tmp / "agent.yaml"
    path.write_text(
        f"agent: {{id: gw-sup}}\nmqtt: {{port: {broker.port}}}\n"
        f"buffer: {{path: {tmp / 'buffer.db'}}}\n"
        "supervision: {max_failures: 3, window_s: 60}\n"
        f"devices:\n{counter_device('plc')}"
    )
    return path


def events(log: str, name: str) -> list[dict[str, object]]:
    out = []
    for line in log.splitlines():
        if f'"{name}"' in line:
            out.append(json.loads(line))
    return out


def test_a_forwarder_fault_is_restarted_and_delivery_resumes_without_loss(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    config = write_config(tmp_path, broker)
    with (
        Subscriber("127.0.0.1", broker.port, "edge/#") as sub,
        FaultyAgentProcess(
            tmp_path / "agent.log", "take:30:2", "run", str(config), "--simulate"
        ) as agent,
    ):
        wait_until(lambda: len(events(agent.log(), "task.failed")) == 2, 60, "2 faults", agent)
        after = max(seqs(sub.messages()) or [0])
        wait_until(lambda: max(seqs(sub.messages()) or [0]) > after + 20, 60, "delivery", agent)
        assert agent.terminate() == 0
        produced = last_seq_logged(agent)
        wait_until(lambda: max(seqs(sub.messages())) >= produced, 30, "the last sample", agent)
    log = agent.log()
    failed = events(log, "task.failed")
    assert [(e["task"], e["action"]) for e in failed] == [("forwarder", "restarting")] * 2
    assert all("Input/output error (injected)" in str(e["error"]) for e in failed)
    assert all(str(e["exception"]).startswith("Traceback") for e in failed)
    assert not events(log, "agent.failed")
    assert_continuous(seqs(sub.messages()))


def test_a_forwarder_that_keeps_failing_exits_1_with_one_line(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    config = write_config(tmp_path, broker)
    with FaultyAgentProcess(
        tmp_path / "agent.log", "take:5:inf", "run", str(config), "--simulate"
    ) as agent:
        assert agent.proc is not None
        code = agent.proc.wait(timeout=60)
    log = agent.log()
    assert code == 1, log
    (line,) = events(log, "agent.failed")
    assert line["task"] == "forwarder"
    assert line["error"] == "OSError: [Errno 5] Input/output error (injected)"
    assert len(events(log, "task.failed")) == 3
    assert events(log, "agent.stopped")  # stopped in order, buffer closed
