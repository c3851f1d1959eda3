"""The agent's state as one JSON-ready dict: `/api/status`, `/readyz` and `edge-agent
status` all show this (the status page draws it).

Everything here reads an `AgentSnapshot` (agent.runtime.snapshot), the read model the
runtime builds on request from the figures it keeps anyway; nothing is counted on the hot
path for it.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any

from agent import __version__
from agent.buffer import Salvage
from agent.forwarder import PoisonSnapshot
from agent.runtime.snapshot import AgentSnapshot, degraded, health, readiness


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


def health_json(snap: AgentSnapshot) -> dict[str, Any]:
    """The body of a failing /healthz: which task and why."""
    healthy, problems = health(snap)
    return {
        "healthy": healthy,
        "problems": problems,
        "stalled": [
            {"task": s.task, "reason": s.reason, "for_s": s.for_s, "deadline_s": s.deadline_s}
            for s in snap.stalled
        ],
        "failed": [
            {"task": t.name, "error": t.last_error} for t in snap.tasks if t.phase == "failed"
        ],
    }


def status_json(snap: AgentSnapshot) -> dict[str, Any]:
    """The whole status as plain JSON types."""
    now = snap.taken
    b = snap.buffer
    f = snap.forwarder
    m = snap.mqtt
    ready, not_ready = readiness(snap)
    healthy, unhealthy = health(snap)
    devices = [
        {
            "name": d.name,
            "protocol": d.protocol,
            "state": d.state,
            "reason": d.reason,
            "code": d.code,
            "since": round(d.since, 3),
            "polls": d.polls,
            "failed_polls": d.failed_polls,
            "skipped_polls": d.skipped_polls,
            "connects": d.connects,
            "down_reports": d.down_reports,
            "last_poll_duration_s": round(d.last_poll_duration_s, 6),
            "errors_by_reason": dict(d.errors_by_reason),
            **({"derived": dict(d.derived)} if d.derived else {}),
            "tags": [
                {
                    "tag": t.tag,
                    "value": _value(t.value),
                    "quality": t.quality,
                    "reason": t.reason,
                    "unit": t.unit,
                    "ts_agent": _iso(t.ts_agent),
                    "age_s": _age(t.ts_agent, now),
                    "seq": t.seq,
                }
                for t in d.tags
            ],
        }
        for d in snap.devices
    ]
    return {
        "agent": {
            "id": snap.agent_id,
            "site": snap.site,
            "area": snap.area,
            "line": snap.line,
            "version": __version__,
            "pid": os.getpid(),
            "started": round(snap.started, 3),
            "uptime_s": round(now - snap.started, 1),
            "config": snap.config_path,
            "ready": ready,
            "not_ready": not_ready,
            "healthy": healthy,
            "unhealthy": unhealthy,
            "degraded": degraded(snap),
            "reloads_ok": snap.reloads_ok,
            "reloads_failed": snap.reloads_failed,
            "last_reload_error": list(snap.last_reload_error),
        },
        "mqtt": {
            "state": "connected" if m.connected else "disconnected",
            "broker": m.broker,
            "connects": m.connects,
            "disconnects": m.disconnects,
            "inflight": m.inflight,
            "failed_by_reason": dict(m.failed_by_reason),
            "last_latency_s": None if f.last_latency_s is None else round(f.last_latency_s, 3),
            "last_delivery": f.last_delivery,
        },
        "buffer": {
            "kind": snap.buffer_kind,
            "writable": snap.buffer_writable,
            "health": b.health,
            "degraded_reason": b.degraded_reason,
            "memory_records": b.memory_records,
            "records": b.records,
            "samples": b.samples,
            "bytes": b.bytes,
            "max_bytes": b.max_bytes,
            "fill": round(b.bytes / b.max_bytes, 6) if b.max_bytes else 0.0,
            "oldest_age_s": None
            if b.oldest_created is None
            else round(max(0.0, now - b.oldest_created), 3),
            "last_seq": b.last_seq,
            "epoch": b.epoch,
            "leased_seq": b.leased_seq,
            "lease_ok": b.lease_ok,
            "memory_fallback": b.memory_fallback,
            "memory_bytes": b.memory_bytes,
            "damaged_files": b.damaged_files,
            "last_salvage": None if b.last_salvage is None else _salvage(b.last_salvage),
        },
        "samples": {
            "produced": snap.samples_produced,
            "delivered": f.samples_delivered,
            "dropped": {
                "buffer_full": b.dropped_samples,
                "buffer_error": snap.samples_dropped_on_error,
                "by_reason": dict(b.dropped_by_reason),
            },
            "dead_lettered": f.dead_lettered_samples,
        },
        "dead_letters": None if f.poison is None else _poison(f.poison),
        "tasks": [
            {
                "name": t.name,
                "state": "stalled"
                if t.stalled and t.phase in ("running", "restarting")
                else t.phase,
                "restarts": t.restarts,
                "failures": t.failures,
                "last_error": t.last_error,
                "stalled": t.stalled,
            }
            for t in snap.tasks
        ],
        "devices": devices,
        "rates": {"interval_s": snap.rates_interval_s, "points": list(snap.rates)},
    }


__all__ = ["health_json", "status_json"]


def _salvage(s: Salvage) -> dict[str, Any]:
    return {
        "at": s.at,
        "at_start": s.at_start,
        "moved_to": s.moved_to,
        "error": s.error,
        "recovered_records": s.recovered_records,
        "recovered_samples": s.recovered_samples,
        "lost_samples": s.lost_samples,
        "lost_seq_ranges": list(s.lost_seq_ranges),
    }


def _poison(p: PoisonSnapshot) -> dict[str, Any]:
    return {
        "records": p.dead_lettered_records,
        "samples": p.dead_lettered_samples,
        "by_reason": dict(p.dead_lettered_by_reason),
        "split_records": p.split_records,
        "split_parts": p.split_parts,
        "replayed_records": p.replayed_records,
        "replayed_samples": p.replayed_samples,
        "backing_off": {
            device: {"reason": reason, "code": code, "refusals": refusals, "retry_in_s": wait}
            for device, (reason, code, refusals, wait) in sorted(p.backing_off.items())
        },
        "store": {
            "path": p.store_path,
            "entries": p.store.entries,
            "samples": p.store.samples,
            "bytes": p.store.bytes,
            "max_bytes": p.store.max_bytes,
            "replay_pending": p.store.replay_pending,
            "dropped_records": p.store.dropped_records,
            "dropped_samples": p.store.dropped_samples,
        },
    }
