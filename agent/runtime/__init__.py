"""The runtime: builds the pipeline from a valid Config, supervises it, runs it until a
signal.

- `agent.runtime.pipeline`: the Agent (start and stop order, devices, reload wiring);
- `agent.runtime.supervisor`: task supervision (restart with backoff, exit when a task
  keeps failing) and heartbeats (stalled tasks fail /healthz);
- `agent.runtime.writer`: the buffer writer task (readings → samples → buffer);
- `agent.runtime.reload`: what a reload changes, decided before anything is touched;
- `agent.runtime.snapshot`: the read model the HTTP layer shows;
- `agent.runtime.signals`: SIGINT/SIGTERM/SIGHUP.

The names below stay importable from `agent.runtime`.
"""

from __future__ import annotations

from agent.runtime.pipeline import (
    Agent,
    AgentStatus,
    DeviceBuildError,
    DeviceRun,
    RateHistory,
    device_tags,
    drain_eta,
    make_driver,
)
from agent.runtime.reload import RESTART_SECTIONS, ReloadResult
from agent.runtime.signals import run_until_signal, wait_for_signal
from agent.runtime.snapshot import AgentSnapshot, take_snapshot
from agent.runtime.supervisor import SupervisionPolicy, Supervisor, TaskFailed
from agent.runtime.writer import WRITE_BATCH_MAX, WRITE_QUEUE_MAX, BufferWriter

__all__ = [
    "RESTART_SECTIONS",
    "WRITE_BATCH_MAX",
    "WRITE_QUEUE_MAX",
    "Agent",
    "AgentSnapshot",
    "AgentStatus",
    "BufferWriter",
    "DeviceBuildError",
    "DeviceRun",
    "RateHistory",
    "ReloadResult",
    "SupervisionPolicy",
    "Supervisor",
    "TaskFailed",
    "device_tags",
    "drain_eta",
    "make_driver",
    "run_until_signal",
    "take_snapshot",
    "wait_for_signal",
]
