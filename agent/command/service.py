"""Commands in the running agent: one supervised task (``commands``) that takes requests
from the agent's MQTT session, carries each out (agent.command.handler) and publishes its
result and the audit records.

- Requests arrive on `commands.topic` (MQTT 5 JSON) and, with the Sparkplug layout, on
  ``spBv1.0/{group}/DCMD/{edge node}/+``. paho's callback only queues them; the task runs
  each request as a task of its own (a slow device never holds up a write to another),
  at most `max_pending` at a time (more are refused with ``busy``).
- The result goes to the request's response topic (else `commands.result_topic`) with its
  correlation data, QoS 1; the audit records to `commands.audit_topic`, QoS 1. A result
  that cannot be published (broker gone) is logged; the audit log on disk has it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import structlog

from agent.command.audit import AuditRecord, encode_record
from agent.command.guards import Refusal
from agent.command.handler import CommandHandler, WriteResult
from agent.command.request import WriteRequest, parse_dcmd, parse_mqtt
from agent.publish import Incoming, Message, PublishResult

log = structlog.get_logger()

#: Requests queued (not yet started) per `commands.max_pending`; more are dropped.
QUEUE_PER_PENDING = 10


class _Publisher(Protocol):
    async def publish(self, messages: Sequence[Message]) -> list[PublishResult]: ...


class CommandService:
    """See the module docstring. `subscribe(topic_filter, callback)` is the publisher's
    subscription with properties (MqttPublisher.subscribe_incoming)."""

    def __init__(
        self,
        handler: CommandHandler,
        publisher: _Publisher,
        *,
        agent_id: str,
        alias_name: Callable[[str, int], str | None] = lambda _d, _a: None,
    ) -> None:
        self.handler = handler
        self.publisher = publisher
        commands = handler.commands
        self.topic = commands.expand(commands.topic, agent_id)
        self.result_topic = commands.expand(commands.result_topic, agent_id)
        self.audit_topic = commands.expand(commands.audit_topic, agent_id)
        self._alias_name = alias_name
        # Beyond max_pending running, requests are refused `busy`; this bounds what waits
        # for that refusal (a flood from a publisher the ACL lets through).
        self._queue: asyncio.Queue[WriteRequest] = asyncio.Queue(
            maxsize=QUEUE_PER_PENDING * commands.max_pending
        )
        self.dropped = 0
        self._audit_out: asyncio.Queue[AuditRecord] = asyncio.Queue(maxsize=10_000)
        self._tasks: set[asyncio.Task[None]] = set()
        self.received = 0
        self.finished = 0
        self.audit_dropped = 0
        self.audit_unpublished = 0
        self._audit_failing = False
        handler.audit.on_record = self._on_audit

    # ------------------------------------------------------------------ paho side

    def on_request(self, msg: Incoming) -> None:
        """A message on the command topic (runs on the event loop; never blocks)."""
        self.received += 1
        req = parse_mqtt(msg)
        req.received_at = time.time()
        self._enqueue(req)

    def on_dcmd(self, msg: Incoming) -> None:
        """A Sparkplug DCMD: one request per metric."""
        for req in parse_dcmd(msg.topic, msg.payload, self._alias_name):
            self.received += 1
            req.received_at = time.time()
            self._enqueue(req)

    def _enqueue(self, req: WriteRequest) -> None:
        try:
            self._queue.put_nowait(req)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error(
                    "command.dropped",
                    dropped=self.dropped,
                    note="more requests than commands.max_pending x 10 are waiting; "
                    "these get no result and no audit record",
                )

    def _on_audit(self, record: AuditRecord) -> None:
        try:
            self._audit_out.put_nowait(record)
        except asyncio.QueueFull:
            self.audit_dropped += 1
            if self.audit_dropped == 1:
                log.error("command.audit_topic.dropped", note="the audit log on disk has it")

    # ------------------------------------------------------------------ the task

    async def run(self) -> None:
        audit = asyncio.create_task(self._publish_audit(), name="commands.audit-topic")
        try:
            while True:
                req = await self._queue.get()
                if len(self._tasks) >= self.handler.commands.max_pending:
                    req.problem = req.problem or Refusal(
                        "busy",
                        f"{len(self._tasks)} requests are being handled "
                        "(commands.max_pending); try again",
                    )
                task = asyncio.create_task(self._one(req), name="commands.request")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            for task in [*self._tasks, audit]:
                task.cancel()
            await asyncio.gather(*self._tasks, audit, return_exceptions=True)

    async def _one(self, req: WriteRequest) -> None:
        try:
            result = await self.handler.handle(req)
        except Exception:  # a bug must not leave the requester without an answer
            log.exception("command.handler.bug", device=req.device, tag=req.tag)
            result = WriteResult(
                "failed",
                req.device,
                req.tag,
                req.value,
                reason="internal_error",
                detail="the agent failed handling this request (see its log)",
                correlation=req.correlation.hex() if req.correlation else None,
            )
        try:
            if req.origin.channel != "sparkplug":  # Sparkplug has no responses
                await self._respond(req, result)
        finally:
            self.finished += 1

    @property
    def pending(self) -> int:
        """Requests being handled now."""
        return len(self._tasks)

    async def _respond(self, req: WriteRequest, result: WriteResult) -> None:
        payload = json.dumps(result.as_dict(), default=repr).encode()
        msg = Message(
            req.response_topic or self.result_topic,
            payload,
            qos=1,
            correlation_data=req.correlation,
            content_type="application/json",
        )
        try:
            (sent,) = await self.publisher.publish([msg])
        except ValueError:  # a response topic paho refuses (wildcards)
            sent = PublishResult(ok=False, reason="invalid response topic")
        if not sent.ok:
            log.warning(
                "command.result.unpublished",
                device=req.device,
                tag=req.tag,
                topic=msg.topic,
                reason=sent.reason,
            )

    async def _publish_audit(self) -> None:
        while True:
            record = await self._audit_out.get()
            payload = encode_record(record).rstrip(b"\n")
            try:
                (sent,) = await self.publisher.publish(
                    [Message(self.audit_topic, payload, qos=1, content_type="application/json")]
                )
            except Exception as exc:
                sent = PublishResult(ok=False, reason=f"{type(exc).__name__}: {exc}")
            if not sent.ok:
                self.audit_unpublished += 1
                if not self._audit_failing:  # a transition, not every record
                    log.warning(
                        "command.audit_topic.unpublished",
                        reason=sent.reason,
                        note="the audit log on disk has every record",
                    )
                self._audit_failing = True
            elif self._audit_failing:
                self._audit_failing = False
                log.info("command.audit_topic.recovered", unpublished=self.audit_unpublished)


def describe(service: CommandService) -> dict[str, Any]:
    """Counters for status and tests."""
    return {
        "received": service.received,
        "pending": service.pending,
        "finished": service.finished,
        "results": dict(service.handler.counts),
        "audit_dropped": service.audit_dropped,
        "dropped": service.dropped,
    }
