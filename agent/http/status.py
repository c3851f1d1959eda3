"""The agent's state as one JSON-ready dict: `/api/status`, `/readyz` and `edge-agent
status` all show this (the status page draws it).

Everything here reads figures the pipeline already keeps (DeviceStatus, AgentStatus,
buffer.stats(), forwarder.stats, publisher.stats()); nothing is counted on the hot path
for it. Building it costs O(devices + tags) and is done only when asked.
"""

from __future__ import annotations

import os
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__

if TYPE_CHECKING:
    from agent.runtime import Agent


def publisher_stats(agent: Agent) -> Any | None:
    """The publisher's stats() (MqttPublisher has one; a test publisher may not)."""
    stats = getattr(agent.current_publisher, "stats", None)
    return stats() if callable(stats) else None


def buffer_writable(agent: Agent) -> tuple[bool, str | None]:
    """Whether the buffer can take data: no failed append since the last good one, and
    (for the SQLite buffer) a writable folder."""
    if agent.status.buffer_error is not None:
        return False, agent.status.buffer_error
    cfg = agent.config.buffer
    if cfg.kind == "sqlite":
        folder = Path(cfg.path).resolve().parent
        if not os.access(folder, os.W_OK):
            return False, f"{folder} is not writable"
    return True, None


def readiness(agent: Agent) -> tuple[bool, list[str]]:
    """(ready, reasons it is not). Ready means: config loaded and inputs running, and the
    buffer writable. A disconnected broker or a device down does NOT make the agent
    unready: the agent is doing its job (buffering), and a restart would not help."""
    reasons = []
    if not agent.status.ready:
        reasons.append("not running (starting or stopping)")
    ok, why = buffer_writable(agent)
    if not ok:
        reasons.append(f"buffer not writable: {why}")
    return not reasons, reasons


def _age(ts: Any, now: float) -> float | None:
    if isinstance(ts, datetime):
        return round(max(0.0, now - ts.timestamp()), 3)
    return None


def _iso(ts: Any) -> str | None:
    if isinstance(ts, datetime):
        return ts.isoformat().replace("+00:00", "Z")
    return None if ts is None else str(ts)


def _value(v: Any) -> Any:
    # Values are JSON types already (bool, int, float, str, lists of them); anything else
    # (a driver returning bytes, say) is shown, not allowed to break the endpoint.
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, list):
        return [_value(x) for x in v]
    return repr(v)


def snapshot(agent: Agent) -> dict[str, Any]:
    """The whole status as plain JSON types."""
    now = time.time()
    cfg = agent.config
    b = agent.buffer.stats()
    f = agent.forwarder.stats if agent.forwarder is not None else None
    p = publisher_stats(agent)
    ready, not_ready = readiness(agent)
    writable, _ = buffer_writable(agent)
    devices = []
    for name, run in agent.devices.items():
        st = run.poller.status
        tags = []
        for tag, s in agent.latest.get(name, {}).items():
            tags.append(
                {
                    "tag": tag,
                    "value": _value(s.get("value")),
                    "quality": s.get("quality"),
                    "reason": s.get("reason"),
                    "unit": s.get("unit"),
                    "ts_agent": _iso(s.get("ts_agent")),
                    "age_s": _age(s.get("ts_agent"), now),
                    "seq": s.get("seq"),
                }
            )
        devices.append(
            {
                "name": name,
                "protocol": st.protocol,
                "state": st.state,
                "reason": st.reason,
                "since": round(st.since, 3),
                "polls": st.polls,
                "failed_polls": st.failed_polls,
                "skipped_polls": st.skipped_polls,
                "connects": st.connects,
                "last_poll_duration_s": round(st.last_poll_duration_s, 6),
                "errors_by_reason": dict(st.errors_by_reason),
                "tags": tags,
            }
        )
    connected = agent.current_publisher is not None and agent.current_publisher.connected
    return {
        "agent": {
            "id": cfg.agent.id,
            "site": cfg.agent.site,
            "area": cfg.agent.area,
            "line": cfg.agent.line,
            "version": __version__,
            "pid": os.getpid(),
            "started": round(agent.status.started, 3),
            "uptime_s": round(now - agent.status.started, 1),
            "config": str(agent.config_path) if agent.config_path else None,
            "ready": ready,
            "not_ready": not_ready,
            "reloads_ok": agent.status.reloads_ok,
            "reloads_failed": agent.status.reloads_failed,
            "last_reload_error": agent.status.last_reload_error,
        },
        "mqtt": {
            "state": "connected" if connected else "disconnected",
            "broker": f"{cfg.mqtt.host}:{cfg.mqtt.port}",
            "connects": p.connects if p else None,
            "disconnects": p.disconnects if p else None,
            "inflight": p.inflight if p else None,
            "failed_by_reason": dict(p.failed) if p else {},
            "last_latency_s": None
            if f is None or f.last_latency_s is None
            else round(f.last_latency_s, 3),
            "last_delivery": f.last_delivery if f else None,
        },
        "buffer": {
            "kind": cfg.buffer.kind,
            "writable": writable,
            "records": b.records,
            "samples": b.samples,
            "bytes": b.bytes,
            "max_bytes": b.max_bytes,
            "fill": round(b.bytes / b.max_bytes, 6) if b.max_bytes else 0.0,
            "oldest_age_s": None
            if b.oldest_created is None
            else round(max(0.0, now - b.oldest_created), 3),
            "last_seq": b.last_seq,
        },
        "samples": {
            "produced": agent.status.samples_produced,
            "delivered": f.samples_delivered if f else 0,
            "dropped": {
                "buffer_full": b.dropped_samples,
                "buffer_error": agent.status.samples_dropped_on_error,
            },
        },
        "devices": devices,
        "rates": {"interval_s": agent.rates.interval_s, "points": agent.rates.rates()},
    }
