"""The command handler against fake devices behind a real poller: every refusal reason
with its exact text, the write and its read-back, idempotency, and faults at the driver
(raises, hangs, returns garbage) and at the audit log."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.command.audit import AuditLog, AuditUnavailable
from agent.command.config import AuditConfig, CommandsConfig
from agent.command.guards import Refusal
from agent.command.handler import CommandHandler, WriteResult
from agent.command.request import Origin, WriteRequest
from agent.command.signing import sign
from agent.poller import DevicePoller
from drivers.base import DriverContext, DriverError, DriverUnavailable, RawReading
from drivers.fake import FakeBench
from drivers.fake.config import FakeDevice
from drivers.fake.simulator import FakeSimulator

KEY = b"k" * 32
NOW = 1_800_000_000.0

TAGS: list[dict[str, Any]] = [
    {
        "name": "setpoint",
        "type": "float",
        "scale": 0.5,
        "simulate": {"generator": "constant", "value": 80.0},  # raw: 40.0 published
        "writable": True,
        "write": {
            "min": 0,
            "max": 100,
            "max_step": 30,
            "max_per_min": 3,
            "interlock": "permit",
        },
    },
    {"name": "permit", "type": "bool", "simulate": {"generator": "constant", "value": True}},
    {
        "name": "count",
        "type": "int",
        "simulate": {"generator": "constant", "value": 7},
        "writable": True,
        "write": {"tolerance": 1},
    },
    {
        "name": "mode",
        "type": "str",
        "simulate": {"generator": "constant", "value": "auto"},
        "writable": True,
        "write": {"allowed": ["auto", "manual"], "verify": False},
    },
    {"name": "flag", "type": "bool", "writable": True},
    {"name": "ro", "type": "float", "read_only": True, "writable": True},
    {"name": "temp", "type": "float"},
]


class Plant:
    """One fake device served in process, its poller running, and a handler."""

    def __init__(self, tmp_path: Path, **commands: Any) -> None:
        self.bench = FakeBench()
        self.tmp_path = tmp_path
        self.device = FakeDevice.model_validate(
            {
                "name": "oven",
                "protocol": "fake",
                "interval_s": 3600,
                "timeout_s": 0.2,
                "retries": 0,
                "backoff_min_s": 0.01,
                "backoff_max_s": 0.02,
                "tags": TAGS,
            }
        )
        self.commands = CommandsConfig.model_validate(
            {
                "enabled": True,
                "timeout_s": 1.0,
                "audit": {"path": str(tmp_path / "audit.jsonl")},
                **commands,
            }
        )
        self.now = NOW
        self.poller: DevicePoller | None = None
        self.transport: Refusal | None = None
        self._n = 0

    async def start(self) -> None:
        self._sim = FakeSimulator([self.device], self.bench.network)
        await self._sim.__aenter__()
        self.device = self.device.model_copy(
            update={"endpoint": self._sim.endpoints[self.device.name]}
        )
        driver = self.bench.create_driver(self.device, DriverContext())
        groups: dict[str, list[str]] = {}
        for t in self.device.tags:
            groups.setdefault(t.group, []).append(t.name)

        async def sink(_readings: Any) -> None:
            pass

        self.poller = DevicePoller(self.device, "fake", driver, groups, sink)
        self._task = asyncio.create_task(self.poller.run())
        async with asyncio.timeout(10):
            while self.poller.status.cycles < 1:
                await asyncio.sleep(0.005)
        self.audit = AuditLog(self.commands.audit)
        self.audit.open()
        self.handler = self.make_handler()

    def make_handler(self) -> CommandHandler:
        poller = self.poller
        return CommandHandler(
            self.commands,
            lambda: {self.device.name: self.device},
            lambda name: poller if name == "oven" else None,
            self.audit,
            key=KEY if self.commands.signing is not None else None,
            transport=self.transport,
            clock=lambda: self.now,
        )

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.audit.close()
        await self._sim.__aexit__(None, None, None)

    @property
    def server(self) -> Any:
        return self._sim.server("oven")

    def request(
        self, tag: str = "setpoint", value: object = 50.0, *, device: str = "oven", **kw: Any
    ) -> WriteRequest:
        self._n += 1
        kw.setdefault("correlation", f"c{self._n}".encode())
        return WriteRequest(device, tag, value, Origin("mqtt", client_id="ops"), **kw)

    async def write(self, tag: str = "setpoint", value: object = 50.0, **kw: Any) -> WriteResult:
        return await self.handler.handle(self.request(tag, value, **kw))

    def records(self) -> list[dict[str, Any]]:
        text = (self.tmp_path / "audit.jsonl").read_text()
        return [json.loads(line) for line in text.splitlines()]

    def writes(self) -> int:
        return len(self.bench.calls_of("oven", "write"))


@pytest.fixture
async def plant(tmp_path: Path) -> AsyncIterator[Plant]:
    p = Plant(tmp_path)
    await p.start()
    yield p
    await p.stop()


def refused(result: WriteResult) -> tuple[str, str | None, str | None]:
    return (result.result, result.reason, result.detail)


# ---------------------------------------------------------------------- done


async def test_a_write_is_converted_written_and_read_back(plant: Plant) -> None:
    result = await plant.write("setpoint", 55.0)
    assert result.result == "done", result
    assert result.raw == 110.0  # inverse of scale 0.5
    assert result.previous == 40.0
    assert result.holds == 55.0
    assert result.verified is True
    assert plant.server.written[("oven", "setpoint")] == 110.0
    accepted, final = plant.records()
    assert accepted["event"] == "accepted"
    assert "result" not in accepted
    assert final["event"] == "result"
    assert final["result"] == "done"
    assert final["who"] == {"channel": "mqtt", "client_id": "ops", "user": None, "signer": None}
    assert (final["previous"], final["value"], final["holds"]) == (40.0, 55.0, 55.0)
    assert final["correlation"] == b"c1".hex()


async def test_without_verification_nothing_is_read_back(plant: Plant) -> None:
    result = await plant.write("mode", "manual")
    assert (result.result, result.verified, result.holds) == ("done", None, None)
    assert plant.server.written[("oven", "mode")] == "manual"


async def test_tolerance(plant: Plant) -> None:
    plant.bench.script("oven").write(store=8)
    result = await plant.write("count", 9)  # holds 8: within tolerance 1
    assert (result.result, result.holds, result.verified) == ("done", 8, True)


# ---------------------------------------------------------------------- idempotency


async def test_a_repeated_correlation_id_gets_the_first_result_and_no_second_write(
    plant: Plant,
) -> None:
    first = await plant.write("setpoint", 55.0, correlation=b"same")
    again = await plant.write("setpoint", 60.0, correlation=b"same")
    assert plant.writes() == 1
    assert again.duplicate
    assert not first.duplicate
    assert (again.result, again.value, again.holds) == ("done", 55.0, 55.0)
    assert [r["event"] for r in plant.records()] == ["accepted", "result", "result"]
    assert plant.records()[-1]["duplicate"] is True


async def test_concurrent_requests_with_one_id_write_once(plant: Plant) -> None:
    plant.bench.script("oven").write(hang_s=0.05)
    a, b = await asyncio.gather(
        plant.write("setpoint", 55.0, correlation=b"x"),
        plant.write("setpoint", 55.0, correlation=b"x"),
    )
    assert plant.writes() == 1
    assert {a.duplicate, b.duplicate} == {True, False}
    assert a.result == b.result == "done"


async def test_idempotency_survives_a_restart_through_the_audit_log(plant: Plant) -> None:
    await plant.write("setpoint", 55.0, correlation=b"before-restart")
    fresh = plant.make_handler()
    assert fresh.restore() == 1
    plant.handler = fresh
    again = await plant.write("setpoint", 70.0, correlation=b"before-restart")
    assert again.duplicate
    assert again.value == 55.0
    assert plant.writes() == 1


# ---------------------------------------------------------------------- refusals


async def test_malformed_request(plant: Plant) -> None:
    req = plant.request()
    req.problem = Refusal("invalid_request", "'tag' is missing")
    result = await plant.handler.handle(req)
    assert refused(result) == ("refused", "invalid_request", "'tag' is missing")
    assert plant.records()[-1]["reason"] == "invalid_request"


async def test_disabled(tmp_path: Path) -> None:
    p = Plant(tmp_path, enabled=False)
    await p.start()
    try:
        result = await p.write()
        assert refused(result) == (
            "refused",
            "disabled",
            "writes are disabled (commands.enabled is false)",
        )
        assert p.writes() == 0
    finally:
        await p.stop()


async def test_insecure_session(plant: Plant) -> None:
    plant.transport = Refusal("insecure_session", "the agent's broker session is not TLS")
    plant.handler = plant.make_handler()
    result = await plant.write()
    assert refused(result) == (
        "refused",
        "insecure_session",
        "the agent's broker session is not TLS",
    )


async def test_no_correlation(plant: Plant) -> None:
    result = await plant.write(correlation=None)
    assert refused(result) == (
        "refused",
        "no_correlation",
        "the request has no correlation data (MQTT 5 property); it is the request's id",
    )


@pytest.mark.parametrize(
    ("device", "tag", "value", "reason", "detail"),
    [
        ("press", "setpoint", 1.0, "unknown_device", "no device 'press'"),
        ("oven", "nope", 1.0, "unknown_tag", "device 'oven' has no tag 'nope'"),
        ("oven", "temp", 1.0, "not_writable", "tag 'temp' is not writable: true"),
        ("oven", "setpoint", "hot", "wrong_type", "'hot' is not a number for float64"),
        ("oven", "setpoint", math.inf, "not_finite", "inf is not a finite number"),
        (
            "oven",
            "count",
            2**63,
            "out_of_range",
            "9223372036854775808 is out of range: int64 holds "
            "-9,223,372,036,854,775,808 .. 9,223,372,036,854,775,807",
        ),
        ("oven", "setpoint", -1.0, "below_min", "-1.0 is below min 0"),
        ("oven", "setpoint", 100.5, "above_max", "100.5 is above max 100"),
        (
            "oven",
            "mode",
            "off",
            "not_allowed",
            "'off' is not one of the allowed values: 'auto', 'manual'",
        ),
        ("oven", "flag", 3, "wrong_type", "3 is not a bool (true/false) for bool"),
    ],
)
async def test_refused_before_the_device(
    plant: Plant, device: str, tag: str, value: object, reason: str, detail: str
) -> None:
    reads = len(plant.bench.calls_of("oven", "read"))
    result = await plant.write(tag, value, device=device)
    assert refused(result) == ("refused", reason, detail)
    assert plant.writes() == 0
    assert len(plant.bench.calls_of("oven", "read")) == reads  # the device was not asked
    assert plant.records()[-1]["reason"] == reason


async def test_device_disabled(plant: Plant) -> None:
    plant.device = plant.device.model_copy(update={"enabled": False})
    result = await plant.write()
    assert refused(result) == ("refused", "device_disabled", "device 'oven' is disabled")


async def test_rate_limited(plant: Plant) -> None:
    for value in (45.0, 50.0, 55.0):
        assert (await plant.write("setpoint", value)).result == "done"
    result = await plant.write("setpoint", 60.0)
    assert refused(result) == (
        "refused",
        "rate_limited",
        "3 writes to this tag in the last 60 s (max_per_min 3)",
    )
    assert plant.writes() == 3


async def test_interlock_off(plant: Plant) -> None:
    plant.server.write("oven", "permit", False)
    result = await plant.write()
    assert refused(result) == (
        "refused",
        "interlock_off",
        "interlock 'permit' is not true (it reads False)",
    )
    assert plant.writes() == 0


async def test_interlock_unreadable(plant: Plant) -> None:
    plant.bench.script("oven").read({"permit": RawReading("permit", None, "bad", reason="timeout")})
    result = await plant.write()
    assert refused(result) == (
        "refused",
        "interlock_unreadable",
        "interlock 'permit' cannot be read: timeout",
    )


async def test_step_too_large(plant: Plant) -> None:
    result = await plant.write("setpoint", 75.0)  # holds 40: a step of 35 > 30
    assert refused(result) == (
        "refused",
        "step_too_large",
        "a change of 35 (from 40.0 to 75.0) is larger than max_step 30",
    )
    assert plant.writes() == 0


async def test_previous_unknown(plant: Plant) -> None:
    plant.bench.script("oven").read().read(
        {"setpoint": RawReading("setpoint", None, "bad", reason="exception 2")}
    )
    result = await plant.write("setpoint", 45.0)
    assert refused(result) == (
        "refused",
        "previous_unknown",
        "max_step needs the current value, which cannot be read: exception 2",
    )


async def test_device_not_running(plant: Plant) -> None:
    plant.handler = CommandHandler(
        plant.commands, lambda: {"oven": plant.device}, lambda _n: None, plant.audit
    )
    result = await plant.write()
    assert refused(result) == ("refused", "device_unavailable", "device 'oven' is not running")


async def test_device_down_is_refused_without_a_write(plant: Plant) -> None:
    assert plant.poller is not None
    plant.bench.script("oven").read(error=DriverUnavailable("timeout", "no answer"))
    plant.bench.script("oven").connect(error=DriverUnavailable("refused"), times=100)
    result = await plant.write()
    assert result.result == "refused"
    assert result.reason == "device_unavailable"
    assert result.detail is not None
    assert result.detail.startswith("device 'oven': ")
    assert plant.writes() == 0


async def test_driver_refused(plant: Plant) -> None:
    result = await plant.write("ro", 1.0)
    assert refused(result) == ("refused", "driver_refused", "read_only: the tag is read_only")
    assert [r["event"] for r in plant.records()] == ["accepted", "result"]


async def test_audit_unavailable_means_no_write(
    plant: Plant, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(_record: Any) -> None:
        raise AuditUnavailable("cannot append to audit.jsonl: No space left on device")

    monkeypatch.setattr(plant.audit, "append", full)
    result = await plant.write("setpoint", 45.0)
    assert refused(result) == (
        "refused",
        "audit_unavailable",
        "the audit log cannot be written: cannot append to audit.jsonl: No space left on device",
    )
    assert plant.writes() == 0


async def test_audit_disk_failing_for_real(plant: Plant, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    def enospc(_fd: int, _data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", enospc)
    result = await plant.write("setpoint", 45.0)
    assert result.reason == "audit_unavailable"
    assert result.detail is not None
    assert "No space left on device" in result.detail
    assert plant.writes() == 0


# ---------------------------------------------------------------------- signing


@pytest.fixture
async def signed(tmp_path: Path) -> AsyncIterator[Plant]:
    key = tmp_path / "key"
    key.write_bytes(KEY)
    key.chmod(0o600)
    p = Plant(tmp_path, signing={"key_file": str(key), "window_s": 30})
    await p.start()
    yield p
    await p.stop()


def signed_request(p: Plant, *, ts: float, key: bytes = KEY, corr: bytes = b"s1") -> WriteRequest:
    payload = json.dumps({"device": "oven", "tag": "setpoint", "value": 45.0, "ts": ts}).encode()
    return p.request(
        "setpoint",
        45.0,
        correlation=corr,
        payload=payload,
        sent_at=ts,
        signature=sign(key, corr, payload),
    )


async def test_signed_request_is_carried_out_and_the_signer_audited(signed: Plant) -> None:
    result = await signed.handler.handle(signed_request(signed, ts=NOW - 5))
    assert result.result == "done"
    assert signed.records()[-1]["who"]["signer"] == "platform"


@pytest.mark.parametrize(
    ("change", "reason", "detail"),
    [
        (
            "unsigned",
            "unsigned",
            "the request is not signed (signing is on: user property 'signature')",
        ),
        ("wrong key", "bad_signature", "the signature does not match the request"),
        ("tampered", "bad_signature", "the signature does not match the request"),
        ("other id", "bad_signature", "the signature does not match the request"),
        ("old", "expired", "the request was sent 31.0 s ago; the window is 30 s"),
        (
            "future",
            "from_the_future",
            "the request is dated 40.0 s ahead of the agent's clock; the window is 30 s",
        ),
        ("no ts", "no_timestamp", "a signed request needs 'ts' (the time it was sent)"),
    ],
)
async def test_signature_refusals(signed: Plant, change: str, reason: str, detail: str) -> None:
    req = signed_request(signed, ts=NOW - 1, key=b"x" * 32 if change == "wrong key" else KEY)
    if change == "unsigned":
        req.signature = None
    elif change == "tampered":
        req.payload = req.payload.replace(b"45.0", b"95.0")
    elif change == "other id":
        req.correlation = b"s2"
    elif change == "old":
        req = signed_request(signed, ts=NOW - 31)
    elif change == "future":
        req = signed_request(signed, ts=NOW + 40)
    elif change == "no ts":
        req.sent_at = None
    result = await signed.handler.handle(req)
    assert refused(result) == ("refused", reason, detail)
    assert signed.writes() == 0


async def test_a_replay_is_never_a_second_write(signed: Plant) -> None:
    first = await signed.handler.handle(signed_request(signed, ts=NOW))
    replay = await signed.handler.handle(signed_request(signed, ts=NOW))
    assert first.result == "done"
    assert replay.duplicate
    signed.now += 60  # the same captured request, later (and forgotten: a fresh handler)
    signed.handler = signed.make_handler()
    late = await signed.handler.handle(signed_request(signed, ts=NOW))
    assert refused(late) == (
        "refused",
        "expired",
        "the request was sent 60.0 s ago; the window is 30 s",
    )
    assert signed.writes() == 1


# ---------------------------------------------------------------------- faults


async def test_driver_error_fails(plant: Plant) -> None:
    plant.bench.script("oven").write(error=DriverError("exception 4", "slave device failure"))
    result = await plant.write("setpoint", 45.0)
    assert refused(result) == (
        "failed",
        "device_error",
        "the device refused the write: exception 4: slave device failure",
    )


async def test_connection_lost_during_the_write(plant: Plant) -> None:
    plant.bench.script("oven").write(error=DriverUnavailable("reset", "connection reset"))
    result = await plant.write("setpoint", 45.0)
    assert refused(result) == (
        "failed",
        "device_unavailable",
        "connection lost: reset: connection reset; the write may or may not have happened",
    )
    assert plant.poller is not None
    assert plant.poller.status.state == "down"


async def test_a_driver_bug_fails_and_is_reported(plant: Plant) -> None:
    plant.bench.script("oven").write(error=RuntimeError("boom"))
    result = await plant.write("setpoint", 45.0)
    assert refused(result) == (
        "failed",
        "driver_error",
        "driver error: RuntimeError: boom; the write may or may not have happened",
    )


async def test_a_hanging_write_times_out_and_the_connection_is_reset(plant: Plant) -> None:
    plant.bench.script("oven").write(hang_s=math.inf)
    result = await plant.write("setpoint", 45.0)
    assert refused(result) == (
        "failed",
        "timeout",
        "no answer within 1 s (commands.timeout_s); the write may or may not have happened",
    )
    assert plant.poller is not None
    # The next turn closes the connection whose state is unknown and reconnects.
    connects = plant.poller.status.connects
    await asyncio.sleep(0.05)
    again = await plant.write("count", 3)
    assert again.result == "done"
    assert plant.poller.status.connects > connects


async def test_a_hanging_read_before_the_write_is_a_refusal(plant: Plant) -> None:
    plant.bench.script("oven").read(hang_s=math.inf)
    result = await plant.write("setpoint", 45.0)
    assert refused(result) == (
        "refused",
        "timeout",
        "not carried out within 1 s (commands.timeout_s); nothing was written",
    )
    assert plant.writes() == 0


async def test_device_keeps_another_value(plant: Plant) -> None:
    plant.bench.script("oven").write(store=99.0)
    result = await plant.write("setpoint", 45.0)
    assert refused(result) == ("failed", "not_verified", "the device holds 49.5 after writing 45.0")
    assert (result.holds, result.verified) == (49.5, False)


async def test_garbage_read_back(plant: Plant) -> None:
    plant.bench.script("oven").read().read().read({"setpoint": "garbage"})
    result = await plant.write("setpoint", 45.0)
    assert refused(result) == (
        "failed",
        "not_verified",
        "the device holds 'garbage' after writing 45.0",
    )


async def test_read_back_fails(plant: Plant) -> None:
    bad = RawReading("setpoint", None, "bad", reason="exception 2")
    plant.bench.script("oven").read().read().read({"setpoint": bad})
    result = await plant.write("setpoint", 45.0)
    assert refused(result) == (
        "failed",
        "verify_unreadable",
        "written, but the read-back failed: exception 2",
    )


async def test_every_request_is_audited_once_with_its_result(plant: Plant) -> None:
    await plant.write("setpoint", 45.0)
    await plant.write("temp", 1.0)
    plant.bench.script("oven").write(error=DriverError("exception 4"))
    await plant.write("count", 1)
    finals = [r for r in plant.records() if r["event"] == "result"]
    assert [(r["tag"], r["result"]) for r in finals] == [
        ("setpoint", "done"),
        ("temp", "refused"),
        ("count", "failed"),
    ]
    for r in finals:
        assert r["received"]
        assert r["finished"]
        assert r["who"]["client_id"] == "ops"


async def test_a_write_returning_garbage_is_logged_and_verified_as_usual(plant: Plant) -> None:
    from structlog.testing import capture_logs

    assert plant.poller is not None
    driver = plant.poller.driver
    real = driver.write  # type: ignore[attr-defined]

    async def garbage(tag: str, raw: Any) -> Any:
        await real(tag, raw)
        return {"unexpected": 1}

    driver.write = garbage  # type: ignore[attr-defined]
    with capture_logs() as logs:
        result = await plant.write("setpoint", 45.0)
    assert (result.result, result.holds) == ("done", 45.0)
    assert any(e["event"] == "command.write.unexpected_return" for e in logs)


async def test_a_handler_bug_still_answers_internal_error(tmp_path: Path) -> None:
    from agent.command.service import CommandService
    from agent.publish import Incoming
    from agent.publish.fake import FakePublisher

    audit = AuditLog(AuditConfig(path=str(tmp_path / "audit.jsonl")))
    audit.open()
    handler = CommandHandler(CommandsConfig(enabled=True), lambda: {}, lambda _n: None, audit)

    async def broken(_req: Any) -> Any:
        raise RuntimeError("bug")

    handler.handle = broken  # type: ignore[method-assign,assignment]
    publisher = FakePublisher()
    await publisher.start()
    service = CommandService(handler, publisher, agent_id="a1")
    task = asyncio.create_task(service.run())
    service.on_request(Incoming(service.topic, b"{}", correlation_data=b"z"))
    while not publisher.published:
        await asyncio.sleep(0.005)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    body = json.loads(publisher.published[0].payload)
    assert (body["result"], body["reason"], body["detail"]) == (
        "failed",
        "internal_error",
        "the agent failed handling this request (see its log)",
    )
    audit.close()


async def test_an_unsigned_request_cannot_fetch_an_earlier_result(signed: Plant) -> None:
    first = await signed.handler.handle(signed_request(signed, ts=NOW, corr=b"known"))
    assert first.result == "done"
    probe = signed.request("setpoint", 45.0, correlation=b"known")  # no signature
    result = await signed.handler.handle(probe)
    assert (result.result, result.reason, result.duplicate) == ("refused", "unsigned", False)
    assert result.holds is None


async def test_a_sparkplug_write_is_unsigned_when_signing_is_on(signed: Plant) -> None:
    req = WriteRequest("oven", "setpoint", 45.0, Origin("sparkplug"))
    result = await signed.handler.handle(req)
    assert (result.result, result.reason) == ("refused", "unsigned")
    assert signed.writes() == 0


async def test_a_sparkplug_write_without_signing(plant: Plant) -> None:
    req = WriteRequest("oven", "setpoint", 45.0, Origin("sparkplug"))
    result = await plant.handler.handle(req)
    assert (result.result, result.holds, result.correlation) == ("done", 45.0, None)


async def test_a_write_waiting_for_a_stopped_poller_does_not_reconnect(plant: Plant) -> None:
    assert plant.poller is not None
    connects = plant.poller.status.connects
    plant._task.cancel()  # a reload or the shutdown stops the poller
    await asyncio.gather(plant._task, return_exceptions=True)
    result = await plant.write("setpoint", 45.0)
    assert refused(result) == (
        "refused",
        "device_unavailable",
        "device 'oven': stopped: the device's poller is not running",
    )
    assert plant.poller.status.connects == connects
    assert plant.writes() == 0
