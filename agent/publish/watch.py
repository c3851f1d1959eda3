"""`edge-agent watch`: print what arrives at the broker, one line per sample.

A tool for integrators commissioning a line: it shows exactly what consumers receive.
It connects as the agent does: the config's credentials and its `mqtt.tls` section (CA,
client certificate and key, minimum version, ALPN) through the same TLS context
(agent.publish.tls), under a client id of its own so it never takes over the agent's
session.
"""

from __future__ import annotations

import os
import queue
import ssl
import sys
import time
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import MqttConfig
from agent.layouts.decode import DecodeError, Decoder, MetaMissing
from agent.publish.tls import TlsSetupError, describe, describe_text, ssl_context


def format_message(topic: str, payload: bytes, decoder: Decoder | None = None) -> list[str]:
    """Human-readable lines for one published message. Every layout is read through the
    reference decoder (`agent.layouts.decode`); pass the same `decoder` for every message
    so that layout compact's metadata is remembered."""
    try:
        data: Any = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return [f"{topic}  <{len(payload)} bytes, not JSON>"]
    if not isinstance(data, dict):
        return [f"{topic}  {payload[:200]!r}"]
    samples: list[dict[str, Any]]
    try:
        msg = (decoder or Decoder()).decode(data)
    except MetaMissing as exc:
        return [f"{topic}  compact data of {exc.device}: waiting for its metadata {exc.meta}"]
    except DecodeError:
        # Not one of the agent's layouts (or a damaged one): show what it has.
        samples = data.get("samples", [data] if "tag" in data else [])
        if not isinstance(samples, list):
            samples = []
    else:
        if msg.kind == "meta":
            return [f"{topic}  metadata {msg.meta} of {msg.device}: {len(data['tags'])} tags"]
        samples = msg.samples
    lines = []
    for s in samples:
        if not isinstance(s, dict):
            continue
        value = s.get("value")
        shown = f"{value:.4g}" if isinstance(value, float) else repr(value)
        unit = f" {s['unit']}" if s.get("unit") else ""
        quality = s.get("quality", "?")
        why = f" ({s['reason']})" if s.get("reason") else ""
        lines.append(
            f"seq {s.get('seq', '?'):>7}  {s.get('device', '?')}/{s.get('tag', '?')}"
            f" = {shown}{unit}  [{quality}{why}]"
        )
    return lines or [f"{topic}  {payload[:200]!r}"]


def watch(
    config: MqttConfig,
    topic: str,
    *,
    count: int = 0,
    seconds: float = 0,
    raw: bool = False,
    also: tuple[str, ...] = (),
) -> int:
    """Subscribe and print until count messages / seconds have passed / Ctrl-C.
    `also`: further topic filters (layout compact's metadata)."""
    decoder = Decoder()
    inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
    version = mqtt.MQTTv5 if config.protocol == "5" else mqtt.MQTTv311
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"edge-agent-watch-{os.getpid()}",
        protocol=version,
        reconnect_on_failure=False,
    )
    if config.username is not None:
        try:
            password = config.resolved_password()
        except OSError as exc:
            print(f"cannot read password_file: {exc.strerror or exc}", file=sys.stderr)
            return 1
        client.username_pw_set(config.username, password)
    if config.tls is not None:
        try:
            client.tls_set_context(ssl_context(config.tls))
        except TlsSetupError as exc:
            print(f"TLS: {exc.reason}", file=sys.stderr)
            return 1

    where = f"{config.host}:{config.port}"
    # Set on paho's thread, read by the loop below: why the connection ended, if it did.
    ended: list[str] = []
    errors: list[str] = []

    def on_connect(c: mqtt.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
        if not reason.is_failure:
            c.subscribe(topic, qos=1)
            for other in also:
                c.subscribe(other, qos=1)
            print(f"watching {topic} on {where}", file=sys.stderr, flush=True)
        else:
            ended.append(f"broker refused: {reason}")

    def on_disconnect(c: mqtt.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
        if not ended:
            # A refused client certificate often shows only as a closed connection, with
            # the TLS alert in paho's log.
            detail = describe_text(errors[-1]) if config.tls is not None and errors else None
            ended.append(f"connection lost: {detail or reason}")

    def on_log(c: mqtt.Client, u: Any, level: int, buf: str) -> None:
        if level == mqtt.MQTT_LOG_ERR:
            errors.append(buf)

    def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        inbox.put((msg.topic, bytes(msg.payload)))

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_log = on_log
    client.on_message = on_message
    try:
        client.connect(config.host, config.port, keepalive=config.keepalive_s)
    except ssl.SSLError as exc:  # before OSError: SSLError is one
        print(
            f"cannot connect to {where}: {describe(exc, config.host)}",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
        print(f"cannot connect to {where}: {exc}", file=sys.stderr)
        return 1
    client.loop_start()
    deadline = time.monotonic() + seconds if seconds > 0 else None
    received = 0
    try:
        while count <= 0 or received < count:
            timeout = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if timeout <= 0:
                break
            try:
                t, payload = inbox.get(timeout=timeout)
            except queue.Empty:
                if ended:
                    print(f"cannot watch {where}: {ended[0]}", file=sys.stderr)
                    return 1
                continue
            received += 1
            if raw:
                print(f"{t} {payload.decode('utf-8', 'replace')}", flush=True)
            else:
                for line in format_message(t, payload, decoder):
                    print(line, flush=True)
    finally:
        client.loop_stop()
        client.disconnect()
    return 0
