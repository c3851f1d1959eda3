"""The read model: a plain, immutable snapshot of the agent's state.

`/api/status`, `/readyz`, `/healthz`, `/metrics`, the status page and `edge-agent status`
read an `AgentSnapshot`, never the runtime's objects: `take_snapshot(agent)` copies the
figures the pipeline keeps anyway (DeviceStatus, AgentStatus, BufferStats, ForwarderStats,
the publisher's stats, the supervisor's task states and the heartbeats' stalls) into frozen
dataclasses. Building one costs O(devices + tags) and is done only when asked.

`readiness()` and `health()` are pure functions of a snapshot:

- healthy: no supervised task is stalled (work waiting, no progress for its deadline) and
  none has failed for good;
- ready: healthy, the inputs run, the buffer is writable, and no task is waiting to be
  restarted. A degraded buffer (disk failing, records held in memory) stays ready — the
  agent still does its job — but is shown (`buffer.health`, `agent.degraded`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.buffer import BufferStats
from agent.forwarder import PoisonSnapshot

if TYPE_CHECKING:
    from agent.runtime.pipeline import Agent
    from agent.runtime.supervisor import Stall


@dataclass(frozen=True, slots=True)
class TagView:
    tag: str
    value: Any
    quality: str | None
    reason: str | None
    unit: str | None
    ts_agent: datetime | None
    seq: int | None


@dataclass(frozen=True, slots=True)
class DeviceView:
    name: str
    protocol: str
    state: str
    reason: str | None
    code: int | None
    since: float
    polls: int
    failed_polls: int
    skipped_polls: int
    connects: int
    down_reports: int
    last_poll_duration_s: float
    errors_by_reason: tuple[tuple[str, int], ...]
    tags: tuple[TagView, ...]
    #: The derive stage's counts (agent.derive.stage.DeviceDerive.counts); () without one.
    derived: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class TaskView:
    name: str
    phase: str  # running, restarting, done, failed
    starts: int
    restarts: int
    failures: int
    last_error: str | None
    last_failure: float | None
    stalled: str | None  # why, when its heartbeat says it is stalled


@dataclass(frozen=True, slots=True)
class StallView:
    task: str
    reason: str
    for_s: float
    deadline_s: float


@dataclass(frozen=True, slots=True)
class MqttView:
    connected: bool
    broker: str
    connects: int | None
    disconnects: int | None
    inflight: int | None
    failed_by_reason: tuple[tuple[str, int], ...]
    sent: int | None
    acked: int | None


@dataclass(frozen=True, slots=True)
class ForwarderView:
    records_sent: int
    samples_delivered: int
    last_latency_s: float | None
    last_delivery: float | None
    failures_by_reason: tuple[tuple[str, int], ...]
    dead_lettered_records: int
    dead_lettered_samples: int
    #: records set aside, splits, replays and per-device backoff (None before start)
    poison: PoisonSnapshot | None = None


@dataclass(frozen=True, slots=True)
class AgentSnapshot:
    taken: float  # epoch seconds
    agent_id: str
    site: str | None
    area: str | None
    line: str | None
    config_path: str | None
    started: float
    inputs_running: bool
    reloads_ok: int
    reloads_failed: int
    last_reload_error: tuple[str, ...]
    samples_produced: int
    samples_dropped_on_error: int
    buffer_kind: str
    buffer: BufferStats
    buffer_writable: bool
    buffer_not_writable: str | None
    mqtt: MqttView
    forwarder: ForwarderView
    devices: tuple[DeviceView, ...]
    tasks: tuple[TaskView, ...]
    stalled: tuple[StallView, ...]
    failure: str | None  # the task failure that stops the agent, once there is one
    rates_interval_s: float
    rates: tuple[dict[str, float], ...]


def _pairs(d: dict[str, int]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(d.items()))


def _writable(agent: Agent) -> tuple[bool, str | None]:
    if agent.status.buffer_error is not None:
        return False, agent.status.buffer_error
    cfg = agent.config.buffer
    if cfg.kind == "sqlite":
        folder = Path(cfg.path).resolve().parent
        if not os.access(folder, os.W_OK):
            return False, f"{folder} is not writable"
    return True, None


def _stall(s: Stall) -> StallView:
    return StallView(s.task, s.reason, s.for_s, s.deadline_s)


def take_snapshot(agent: Agent) -> AgentSnapshot:
    """Copy the agent's state into an AgentSnapshot (see the module doc)."""
    cfg = agent.config
    status = agent.status
    b = agent.buffer.stats()
    f = agent.forwarder.stats if agent.forwarder is not None else None
    publisher = agent.current_publisher
    stats_fn = getattr(publisher, "stats", None)
    p = stats_fn() if callable(stats_fn) else None
    stalled = tuple(_stall(s) for s in agent.heartbeats.stalled)
    stalled_by_task = {s.task: s.reason for s in stalled}
    devices = []
    for name, run in agent.devices.items():
        st = run.poller.status
        tags = tuple(
            TagView(
                tag=tag,
                value=s.get("value"),
                quality=s.get("quality"),
                reason=s.get("reason"),
                unit=s.get("unit"),
                ts_agent=s.get("ts_agent"),
                seq=s.get("seq"),
            )
            for tag, s in list(agent.latest.get(name, {}).items())
        )
        devices.append(
            DeviceView(
                name=name,
                protocol=st.protocol,
                state=st.state,
                reason=st.reason,
                code=st.code,
                since=st.since,
                polls=st.polls,
                failed_polls=st.failed_polls,
                skipped_polls=st.skipped_polls,
                connects=st.connects,
                down_reports=st.down_reports,
                last_poll_duration_s=st.last_poll_duration_s,
                errors_by_reason=_pairs(st.errors_by_reason),
                tags=tags,
                derived=tuple(run.derive.counts().items()) if run.derive is not None else (),
            )
        )
    tasks = tuple(
        TaskView(
            name=t.name,
            phase=t.phase,
            starts=t.starts,
            restarts=t.restarts,
            failures=t.failures,
            last_error=t.last_error,
            last_failure=t.last_failure,
            stalled=stalled_by_task.get(t.name),
        )
        for t in list(agent.supervisor.states.values())
    )
    writable, why = _writable(agent)
    failure = agent.supervisor.failure
    return AgentSnapshot(
        taken=time.time(),
        agent_id=cfg.agent.id,
        site=cfg.agent.site,
        area=cfg.agent.area,
        line=cfg.agent.line,
        config_path=str(agent.config_path) if agent.config_path else None,
        started=status.started,
        inputs_running=status.ready,
        reloads_ok=status.reloads_ok,
        reloads_failed=status.reloads_failed,
        last_reload_error=tuple(status.last_reload_error),
        samples_produced=status.samples_produced,
        samples_dropped_on_error=status.samples_dropped_on_error,
        buffer_kind=cfg.buffer.kind,
        buffer=b,
        buffer_writable=writable,
        buffer_not_writable=why,
        mqtt=MqttView(
            connected=publisher is not None and publisher.connected,
            broker=f"{cfg.mqtt.host}:{cfg.mqtt.port}",
            connects=p.connects if p else None,
            disconnects=p.disconnects if p else None,
            inflight=p.inflight if p else None,
            failed_by_reason=_pairs(dict(p.failed)) if p else (),
            sent=p.sent if p else None,
            acked=p.acked if p else None,
        ),
        forwarder=ForwarderView(
            records_sent=f.records_sent if f else 0,
            samples_delivered=f.samples_delivered if f else 0,
            last_latency_s=f.last_latency_s if f else None,
            last_delivery=f.last_delivery if f else None,
            failures_by_reason=_pairs(f.failures_by_reason) if f else (),
            dead_lettered_records=f.dead_lettered_records if f else 0,
            dead_lettered_samples=f.dead_lettered_samples if f else 0,
            poison=agent.forwarder.poison_snapshot() if agent.forwarder is not None else None,
        ),
        devices=tuple(devices),
        tasks=tasks,
        stalled=stalled,
        failure=None if failure is None else f"{failure.task}: {failure.error_text}",
        rates_interval_s=agent.rates.interval_s,
        rates=tuple(agent.rates.rates()),
    )


def health(snap: AgentSnapshot) -> tuple[bool, list[str]]:
    """(healthy, why not): no task stalled, none failed for good."""
    problems = [
        f"task {s.task} stalled: {s.reason} for {s.for_s:g} s (deadline {s.deadline_s:g} s)"
        for s in snap.stalled
    ]
    problems += [f"task {t.name} failed: {t.last_error}" for t in snap.tasks if t.phase == "failed"]
    return not problems, problems


def readiness(snap: AgentSnapshot) -> tuple[bool, list[str]]:
    """(ready, reasons it is not): see the module doc. A disconnected broker or a device
    down does NOT make the agent unready: it is doing its job (buffering)."""
    reasons = []
    if not snap.inputs_running:
        reasons.append("not running (starting or stopping)")
    if not snap.buffer_writable:
        reasons.append(f"buffer not writable: {snap.buffer_not_writable}")
    reasons += [
        f"task {t.name} restarting after: {t.last_error}"
        for t in snap.tasks
        if t.phase == "restarting"
    ]
    reasons += health(snap)[1]
    return not reasons, reasons


def degraded(snap: AgentSnapshot) -> list[str]:
    """What works but not as it should (shown, without making the agent unready)."""
    out = []
    if snap.buffer.degraded:
        out.append(f"buffer degraded: {snap.buffer.degraded_reason or 'disk failing'}")
    out += [
        f"task {t.name} restarted {t.restarts} times, last error: {t.last_error}"
        for t in snap.tasks
        if t.restarts and t.phase == "running"
    ]
    return out


__all__ = [
    "AgentSnapshot",
    "DeviceView",
    "ForwarderView",
    "MqttView",
    "StallView",
    "TagView",
    "TaskView",
    "degraded",
    "health",
    "readiness",
    "take_snapshot",
]
