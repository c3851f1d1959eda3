"""`edge-agent doctor CONFIG`: the commissioning check.

Checks, in this order, what a running agent needs from the plant, and prints one line per
check: ``ok``, ``warn`` (worth knowing, not a fault) or ``FAIL`` with what to do::

    FAIL  device press-1: connection refused (192.168.10.21:502) — check host and port, ...

- **config**: the file loads and validates (otherwise every problem is printed, as by
  `validate`, and nothing else is tried: exit 2).
- **devices**: each enabled device, through its real driver (`agent.runtime.make_driver`;
  units on a shared serial line or device server through one shared link, so the serial
  port is opened as the agent opens it):
  connect (TCP, or the OPC UA endpoint with its security policy, login and certificate
  trust), then one read of its first poll group that has tags; tags read with bad quality
  are named with their reasons. Source timestamps in the future flag a clock difference.
- **broker**: one connection with the configured TLS and credentials, then one QoS 1 probe
  message on each topic the agent publishes to (`agent.publish.probe`), judged by the MQTT 5
  PUBACK reason code (0x87: the broker's ACL denies the topic). The probe payload is a small
  JSON object ``{"edge_agent_doctor": "probe", ...}`` (empty for Sparkplug topics), not
  retained; consumers of those topics see it once.
- **buffer**: the disk of `buffer.path` has room for the buffer's plan, ``1.3 × max_bytes +
  8 MiB`` (agent/buffer/sqlite.py explains the margin), counting what the file already holds.
- **clock**: this machine's clock is not before 2024 (certificates and timestamps depend on
  it).

Exit code: 0 no FAIL, 1 at least one FAIL, 2 invalid config.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from agent import __version__
from agent.config import Config
from agent.publish import Message
from drivers.base import DeviceCommon, DriverContext

Level = Literal["ok", "warn", "FAIL"]

#: The buffer's disk plan: counted bytes × 1.3 + 8 MiB (page rounding, B-tree slack, WAL).
DISK_FACTOR = 1.3
DISK_MARGIN_BYTES = 8 << 20
#: A device timestamp further ahead of this machine's clock than this is a clock problem.
FUTURE_TOLERANCE_S = 2.0
MIN_YEAR = 2024


@dataclass(frozen=True, slots=True)
class Finding:
    level: Level
    subject: str
    text: str
    fix: str | None = None

    def line(self) -> str:
        fix = f" — {self.fix}" if self.fix else ""
        return f"{self.level:<5} {self.subject}: {self.text}{fix}"


# ----------------------------------------------------------------------------- devices


def _endpoint(device: DeviceCommon) -> str:
    endpoint = getattr(device, "endpoint", None)
    if endpoint:
        return str(endpoint)
    return f"{getattr(device, 'host', '?')}:{getattr(device, 'port', '?')}"


_DEVICE_FIXES: tuple[tuple[str, str], ...] = (
    (
        "port unavailable",
        "check the link's serial port (ls -l /dev/serial/by-id/), that the adapter is "
        "plugged in, and that the service user may open it (group dialout)",
    ),
    (
        "connection refused",
        "check host and port, and that the device (or its protocol server) is on",
    ),
    (
        "timeout",
        "no answer: check the address, the network path and firewalls; a slow device needs a "
        "larger timeout_s",
    ),
    ("untrusted server certificate", "trust it as the line says, after checking the thumbprint"),
    ("security policy not offered", "set security_policy/security_mode to one the server offers"),
    ("BadUserAccessDenied", "check username and password (or the env file that sets them)"),
    (
        "BadSecurityChecksFailed",
        "trust the agent's certificate on the server (edge-agent opcua cert prints it)",
    ),
    ("BadCertificateUntrusted", "trust the agent's certificate on the server"),
    ("BadTooManySessions", "wait for the server's session timeout, or free a session"),
)


def _device_fix(reason: str) -> str:
    for needle, fix in _DEVICE_FIXES:
        if needle.lower() in reason.lower():
            return fix
    return "see the device's protocol README (drivers/<protocol>/README.md, troubleshooting)"


def _first_group(device: DeviceCommon) -> str | None:
    groups = [str(getattr(t, "group", "default")) for t in getattr(device, "tags", [])]
    if not groups:
        return None
    polled = [g for g in groups if g not in device.subscribe_groups()]
    return (polled or groups)[0]


async def check_device(
    device: DeviceCommon, timeout_s: float, context: DriverContext | None = None
) -> list[Finding]:
    """Connect to one device through its driver and read its first group once (a unit on
    a shared link: the serial port or device server is opened through `context`, which
    lends the config's links)."""
    from agent.runtime import make_driver
    from drivers.base import DriverError

    subject = f"device {device.name}"
    where = _endpoint(device)
    group = _first_group(device)
    if group is None:
        return [Finding("warn", subject, "has no tags; nothing to read")]
    try:
        driver = make_driver(device, context)
    except Exception as exc:  # an unknown protocol, a driver that cannot be built
        return [Finding("FAIL", subject, f"no driver: {exc}", "check the device's protocol")]
    try:
        async with asyncio.timeout(timeout_s):
            await driver.connect()
            readings = await driver.read(group)
    except TimeoutError:
        return [
            Finding(
                "FAIL",
                subject,
                f"no answer within {timeout_s:g} s ({where})",
                _device_fix("timeout"),
            )
        ]
    except DriverError as exc:
        detail = exc.detail or where
        return [Finding("FAIL", subject, f"{exc.reason} ({detail})", _device_fix(exc.reason))]
    except Exception as exc:  # a driver bug must still be one line, not a traceback
        return [
            Finding(
                "FAIL",
                subject,
                f"unexpected {type(exc).__name__}: {exc} ({where})",
                "report this with the config (a driver should map every error)",
            )
        ]
    finally:
        await driver.close()
    findings: list[Finding] = []
    bad = [r for r in readings if r.quality == "bad"]
    if bad:
        names = ", ".join(f"{r.tag} ({r.reason or 'bad'})" for r in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        findings.append(
            Finding(
                "FAIL",
                subject,
                f"{len(bad)} of {len(readings)} tags of group {group} read bad: {names}{more}",
                "check these tags' addresses, node ids and types against the device",
            )
        )
    else:
        uncertain = sum(1 for r in readings if r.quality == "uncertain")
        note = f", {uncertain} uncertain" if uncertain else ""
        findings.append(
            Finding(
                "ok", subject, f"{where} answered; {len(readings)} tags of group {group} read{note}"
            )
        )
    stamps = [r.ts_source for r in readings if r.ts_source is not None]
    if stamps:
        now = time.time()
        ahead = max(ts.timestamp() for ts in stamps) - now
        if ahead > FUTURE_TOLERANCE_S:
            findings.append(
                Finding(
                    "FAIL",
                    f"clock {device.name}",
                    f"the device's timestamps are {ahead:.1f} s ahead of this machine's clock",
                    "synchronise both clocks (NTP: systemd-timesyncd on the gateway, the "
                    "PLC's time server setting)",
                )
            )
        elif min(ts.year for ts in stamps) < MIN_YEAR:
            findings.append(
                Finding(
                    "warn",
                    f"clock {device.name}",
                    f"the device sends timestamps before {MIN_YEAR} ({min(stamps).isoformat()})",
                    "set the PLC's clock, or use timestamp: agent for this device",
                )
            )
    return findings


# ----------------------------------------------------------------------------- broker


def probe_messages(config: Config) -> list[Message]:
    """One probe message per distinct topic the agent publishes to."""
    agent = config.agent
    mqtt = config.mqtt
    fields = {"agent": agent.id, "site": agent.site, "area": agent.area, "line": agent.line}
    payload = orjson.dumps(
        {"edge_agent_doctor": "probe", "agent": agent.id, "version": __version__, "ts": time.time()}
    )
    topics: list[tuple[str, bytes]] = []
    devices = [d for d in config.devices if d.enabled]
    if mqtt.layout == "sparkplug" and mqtt.sparkplug is not None:
        node = mqtt.sparkplug.edge_node_id or agent.id
        prefix = f"spBv1.0/{mqtt.sparkplug.group_id}"
        topics.append((f"{prefix}/NDATA/{node}", b""))
        topics += [(f"{prefix}/DDATA/{node}/{d.name}", b"") for d in devices]
    else:
        for d in devices:
            if mqtt.layout == "tag":
                tags = getattr(d, "tags", [])
                if tags:
                    topics.append(
                        (mqtt.topic_tag.format(**fields, device=d.name, tag=tags[0].name), payload)
                    )
            else:
                topics.append((mqtt.topic.format(**fields, device=d.name), payload))
            if mqtt.layout == "compact":
                # The retained metadata the data needs (an ACL may cover edge/ only).
                meta = mqtt.topic_meta.format(**fields, device=d.name, meta="doctor-probe")
                topics.append((meta, payload))
        topics.append((mqtt.status_topic.format(**fields), payload))
        if devices:
            topics.append(
                (mqtt.device_status_topic.format(**fields, device=devices[0].name), payload)
            )
    seen: set[str] = set()
    out = []
    for topic, body in topics:
        if topic not in seen:
            seen.add(topic)
            out.append(Message(topic, body, qos=1, retain=False))
    return out


def _broker_fix(reason: str) -> str:
    lowered = reason.lower()
    if "not authorized" in lowered or "bad user name or password" in lowered:
        return "check mqtt.username and the password (env file or password_file)"
    if "refused" in lowered and "broker refused" not in lowered:
        return "check mqtt.host and mqtt.port (TLS usually 8883), and that the broker runs"
    if "certificate" in lowered or "tls" in lowered or "ca_file" in lowered:
        return "fix the TLS settings in mqtt.tls (the sentence says which)"
    if "no answer" in lowered or "no connack" in lowered:
        return (
            "something accepts TCP there but does not answer MQTT: check mqtt.host and "
            "mqtt.port (a TLS port needs the tls section), and firewalls"
        )
    if "resolve" in lowered:
        return "check mqtt.host, and DNS or /etc/hosts on this machine"
    return "check the mqtt section against the broker's settings, and the broker's log"


async def check_broker(config: Config, timeout_s: float) -> list[Finding]:
    from agent.publish.probe import probe

    mqtt = config.mqtt
    subject = f"broker {mqtt.host}:{mqtt.port}"
    messages = probe_messages(config)
    result = await probe(
        mqtt, mqtt.resolved_client_id(config.agent.id), messages, timeout_s=timeout_s
    )
    if result.connect_error is not None:
        return [Finding("FAIL", subject, result.connect_error, _broker_fix(result.connect_error))]
    how = f"MQTT {mqtt.protocol}" + (", TLS" if mqtt.tls is not None else "")
    who = f", user {mqtt.username}" if mqtt.username else ""
    findings: list[Finding] = []
    refused = [(t, r) for t, r in result.results if not r.ok]
    for topic, r in refused:
        code = f" ({r.code:#04x})" if r.code is not None else ""
        if r.code == 0x87:
            fix = f"the broker's ACL must let {mqtt.username or 'this client'} publish to {topic}"
        else:
            fix = "see the broker's log for why it did not accept the message"
        findings.append(
            Finding("FAIL", subject, f"publish to {topic} refused: {r.reason}{code}", fix)
        )
    ok = len(result.results) - len(refused)
    findings.insert(
        0,
        Finding(
            "ok",
            subject,
            f"connected ({how}{who}); {ok} of {len(result.results)} probe messages accepted",
        ),
    )
    if not result.acl_visible:
        findings.append(
            Finding(
                "warn",
                subject,
                "MQTT 3.1.1 acknowledges publishes the ACL denies: the probe cannot see them",
                "use mqtt.protocol '5' where the broker supports it",
            )
        )
    return findings


# ----------------------------------------------------------------------------- buffer, clock


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def check_buffer(config: Config) -> list[Finding]:
    buf = config.buffer
    if buf.kind != "sqlite":
        return [
            Finding(
                "warn",
                "buffer",
                "kind memory: buffered data is lost on every restart",
                "use kind sqlite in production",
            )
        ]
    path = os.path.abspath(buf.path)
    subject = f"buffer {path}"
    findings: list[Finding] = []
    if not os.path.isabs(buf.path):
        findings.append(
            Finding(
                "warn",
                subject,
                f"buffer.path {buf.path!r} is relative to the working directory",
                "use an absolute path, e.g. /var/lib/edge-agent/buffer.db",
            )
        )
    folder = os.path.dirname(path)
    existing = folder
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    try:
        free = shutil.disk_usage(existing).free
    except OSError as exc:
        return [*findings, Finding("FAIL", subject, f"cannot read the disk's free space: {exc}")]
    held = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(OSError):
            held += os.path.getsize(path + suffix)
    need = int(buf.max_bytes * DISK_FACTOR) + DISK_MARGIN_BYTES
    room = free + held
    if room < need:
        fits = max(0, int((room - DISK_MARGIN_BYTES) / DISK_FACTOR))
        findings.append(
            Finding(
                "FAIL",
                subject,
                f"the disk has {_size(free)} free (+{_size(held)} in the buffer); "
                f"max_bytes {_size(buf.max_bytes)} needs {_size(need)} "
                f"({DISK_FACTOR} × max_bytes + {_size(DISK_MARGIN_BYTES)})",
                f"free disk space, or set buffer.max_bytes to at most {fits}",
            )
        )
    else:
        findings.append(
            Finding(
                "ok",
                subject,
                f"{_size(free)} free, max_bytes {_size(buf.max_bytes)} needs {_size(need)}",
            )
        )
    if os.path.isdir(folder) and not os.access(folder, os.W_OK):
        findings.append(
            Finding(
                "warn",
                subject,
                f"{folder} is not writable by this user",
                "fine if the service runs as another user who may write it (edge-agent)",
            )
        )
    return findings


def check_clock(now: float | None = None) -> list[Finding]:
    t = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    stamp = t.strftime("%Y-%m-%dT%H:%M:%SZ")
    if t.year < MIN_YEAR:
        return [
            Finding(
                "FAIL",
                "clock",
                f"this machine's clock says {stamp}",
                "set the time (timedatectl set-time, or NTP: systemd-timesyncd); TLS "
                "certificates and every timestamp depend on it",
            )
        ]
    return [Finding("ok", "clock", f"{stamp} (UTC)")]


# ----------------------------------------------------------------------------- all


async def diagnose(config: Config, *, timeout_s: float = 15.0) -> list[Finding]:
    """Every check except the config itself (already loaded); devices run concurrently."""
    devices = [d for d in config.devices if d.enabled]
    context = DriverContext(config.links)
    device_checks = [check_device(d, timeout_s, context) for d in devices]
    try:
        results: Sequence[Any] = await asyncio.gather(
            *device_checks, check_broker(config, timeout_s), return_exceptions=True
        )
    finally:
        await context.aclose()
    findings: list[Finding] = []
    for subject, result in zip(
        [f"device {d.name}" for d in devices] + ["broker"], results, strict=True
    ):
        if isinstance(result, BaseException):
            if isinstance(result, asyncio.CancelledError):
                raise result
            findings.append(
                Finding("FAIL", subject, f"check failed: {type(result).__name__}: {result}")
            )
        else:
            findings.extend(result)
    for d in config.devices:
        if not d.enabled:
            findings.append(Finding("warn", f"device {d.name}", "disabled; not checked"))
    findings += check_buffer(config)
    findings += check_clock()
    return findings


__all__ = [
    "Finding",
    "check_broker",
    "check_buffer",
    "check_clock",
    "check_device",
    "diagnose",
    "probe_messages",
]


def run(path: str, *, timeout_s: float = 15.0) -> int:
    """The `doctor` command: print every finding, one line each; the exit code."""
    import sys

    from agent.config import ConfigError, load_config

    try:
        config = load_config(path)
    except ConfigError as exc:
        n = len(exc.problems)
        print(f"FAIL  config {path}: {n} problem{'s' if n != 1 else ''} found:")
        for problem in exc.problems:
            print(f"  {problem}")
        return 2
    tags = sum(len(getattr(d, "tags", [])) for d in config.devices)
    print(f"ok    config {path}: valid ({len(config.devices)} devices, {tags} tags)", flush=True)
    findings = asyncio.run(diagnose(config, timeout_s=timeout_s))
    for finding in findings:
        print(finding.line(), flush=True)
    problems = sum(1 for f in findings if f.level == "FAIL")
    if problems:
        print(f"doctor: {problems} problem{'s' if problems != 1 else ''} found", file=sys.stderr)
        return 1
    print("doctor: no problems found", file=sys.stderr)
    return 0
