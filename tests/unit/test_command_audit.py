"""The audit log: JSON lines, fsync'ed, rotated, one writer; and the service that
publishes results and audit records (with a fake publisher)."""

from __future__ import annotations

import asyncio
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from agent.command.audit import AuditLocked, AuditLog, AuditUnavailable
from agent.command.config import AuditConfig, CommandsConfig
from agent.command.handler import CommandHandler
from agent.command.service import CommandService
from agent.publish import Incoming
from agent.publish.fake import FakePublisher


def log_at(tmp_path: Path, **kw: Any) -> AuditLog:
    audit = AuditLog(AuditConfig(path=str(tmp_path / "a" / "audit.jsonl"), **kw))
    audit.open()
    return audit


def test_records_are_json_lines_and_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    audit = log_at(tmp_path)
    audit.append({"event": "result", "value": math.nan, "raw": b"\x01", "n": 1})
    audit.append({"event": "result", "value": "Zoë", "n": 2})
    lines = (tmp_path / "a" / "audit.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [
        {"event": "result", "value": "nan", "raw": "01", "n": 1},
        {"event": "result", "value": "Zoë", "n": 2},
    ]
    assert len(synced) == 2
    assert oct((tmp_path / "a" / "audit.jsonl").stat().st_mode & 0o777) == "0o600"
    audit.close()


def test_rotation_keeps_every_record(tmp_path: Path) -> None:
    audit = log_at(tmp_path, max_bytes=4096, keep=3)
    for n in range(200):
        audit.append({"n": n, "pad": "x" * 80})
    base = tmp_path / "a" / "audit.jsonl"
    files = [base, *(Path(f"{base}.{i}") for i in (1, 2, 3))]
    assert not Path(f"{base}.4").exists()
    kept = [json.loads(line)["n"] for f in reversed(files) for line in f.read_text().splitlines()]
    assert kept == list(range(200 - len(kept), 200))  # the newest, in order, no gap
    assert all(f.stat().st_size <= 4096 for f in files)
    assert [r["n"] for r in audit.recent(5)] == [195, 196, 197, 198, 199]
    audit.close()


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    first = log_at(tmp_path)
    second = AuditLog(AuditConfig(path=str(tmp_path / "a" / "audit.jsonl")))
    with pytest.raises(AuditLocked, match="is held by another process"):
        second.open()
    first.close()
    second.open()
    second.close()


def test_a_failing_disk_is_reported_and_may_recover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit = log_at(tmp_path)
    real_write = os.write

    def enospc(_fd: int, _data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", enospc)
    with pytest.raises(AuditUnavailable, match="No space left on device"):
        audit.append({"n": 1})
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[: len(data) // 2]))
    with pytest.raises(AuditUnavailable, match="short write"):
        audit.append({"n": 2})
    monkeypatch.setattr(os, "write", real_write)
    audit.append({"n": 3})
    # The torn half line is skipped when the log is read back.
    assert [r["n"] for r in audit.recent(10)] == [3]
    assert audit.failures == 2
    audit.close()


def test_unwritable_folder(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    audit = AuditLog(AuditConfig(path=str(tmp_path / "file" / "audit.jsonl")))
    with pytest.raises(AuditUnavailable, match="cannot open"):
        audit.open()


# ---------------------------------------------------------------------- the service


async def test_results_go_to_the_response_topic_and_records_to_the_audit_topic(
    tmp_path: Path,
) -> None:
    audit = log_at(tmp_path)
    commands = CommandsConfig(enabled=True)
    handler = CommandHandler(commands, lambda: {}, lambda _n: None, audit)
    publisher = FakePublisher()
    await publisher.start()
    service = CommandService(handler, publisher, agent_id="a1")
    task = asyncio.create_task(service.run())
    service.on_request(
        Incoming(
            service.topic,
            b'{"device": "nope", "tag": "t", "value": 1}',
            response_topic="platform/r/7",
            correlation_data=b"id-7",
        )
    )
    service.on_request(Incoming(service.topic, b"not json", correlation_data=b"id-8"))
    while len(publisher.published) < 4:
        await asyncio.sleep(0.005)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    by_topic: dict[str, list[Any]] = {}
    for msg in publisher.published:
        by_topic.setdefault(msg.topic, []).append(msg)
    (r7,) = by_topic["platform/r/7"]
    assert r7.correlation_data == b"id-7"
    assert r7.content_type == "application/json"
    body = json.loads(r7.payload)
    assert (body["result"], body["reason"], body["detail"]) == (
        "refused",
        "unknown_device",
        "no device 'nope'",
    )
    (r8,) = by_topic["edge-cmd/a1/result"]  # no response topic: the default result topic
    assert json.loads(r8.payload)["reason"] == "invalid_request"
    audits = [json.loads(m.payload) for m in by_topic["edge-audit/a1"]]
    assert sorted(a["correlation"] for a in audits) == [b"id-7".hex(), b"id-8".hex()]
    audit.close()


async def test_more_requests_than_max_pending_are_refused_busy(tmp_path: Path) -> None:
    audit = log_at(tmp_path)
    commands = CommandsConfig(enabled=True, max_pending=1)
    gate = asyncio.Event()

    class Slow:
        def exclusive(self) -> Any:
            raise AssertionError

    handler = CommandHandler(commands, lambda: {}, lambda _n: Slow(), audit)
    real = handler.handle

    async def slow_handle(req: Any) -> Any:
        if req.correlation == b"1":
            await gate.wait()
        return await real(req)

    handler.handle = slow_handle  # type: ignore[method-assign]
    publisher = FakePublisher()
    await publisher.start()
    service = CommandService(handler, publisher, agent_id="a1")
    task = asyncio.create_task(service.run())
    body = b'{"device": "d", "tag": "t", "value": 1}'
    service.on_request(Incoming(service.topic, body, correlation_data=b"1"))
    await asyncio.sleep(0.01)
    service.on_request(Incoming(service.topic, body, correlation_data=b"2"))
    while not any(m.correlation_data == b"2" for m in publisher.published):
        await asyncio.sleep(0.005)
    gate.set()
    while not any(m.correlation_data == b"1" for m in publisher.published):
        await asyncio.sleep(0.005)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    results = {
        m.correlation_data: json.loads(m.payload)
        for m in publisher.published
        if m.topic == "edge-cmd/a1/result"
    }
    assert results[b"2"]["reason"] == "busy"
    assert results[b"2"]["detail"] == (
        "1 requests are being handled (commands.max_pending); try again"
    )
    assert results[b"1"]["reason"] == "unknown_device"
    audit.close()


async def test_a_result_the_broker_does_not_take_is_logged_and_kept_on_disk(
    tmp_path: Path,
) -> None:
    from structlog.testing import capture_logs

    audit = log_at(tmp_path)
    handler = CommandHandler(CommandsConfig(enabled=True), lambda: {}, lambda _n: None, audit)
    publisher = FakePublisher()
    await publisher.start()
    publisher.fail_next(2, "not connected")
    service = CommandService(handler, publisher, agent_id="a1")
    with capture_logs() as logs:
        task = asyncio.create_task(service.run())
        service.on_request(
            Incoming(
                service.topic, b'{"device": "d", "tag": "t", "value": 1}', correlation_data=b"q"
            )
        )
        while len(publisher.attempts) < 2:
            await asyncio.sleep(0.005)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    events = {e["event"] for e in logs}
    assert "command.result.unpublished" in events
    assert "command.audit_topic.unpublished" in events
    assert audit.recent(5)[-1]["reason"] == "unknown_device"
    audit.close()


async def test_a_flood_beyond_the_queue_is_dropped_and_logged(tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    audit = log_at(tmp_path)
    handler = CommandHandler(
        CommandsConfig(enabled=True, max_pending=1), lambda: {}, lambda _n: None, audit
    )
    service = CommandService(handler, FakePublisher(), agent_id="a1")  # not running
    body = b'{"device": "d", "tag": "t", "value": 1}'
    with capture_logs() as logs:
        for n in range(12):
            service.on_request(Incoming(service.topic, body, correlation_data=bytes([n])))
    assert service.dropped == 2
    assert [e["event"] for e in logs] == ["command.dropped"]
    audit.close()
