"""`edge-agent watch`: print what arrives at the broker, one line per sample.

A tool for integrators commissioning a line: it shows exactly what consumers receive.
"""

from __future__ import annotations

import queue
import sys
import time
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import MqttConfig


def format_message(topic: str, payload: bytes) -> list[str]:
    """Human-readable lines for one published message."""
    try:
        data: Any = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return [f"{topic}  <{len(payload)} bytes, not JSON>"]
    if not isinstance(data, dict):
        return [f"{topic}  {payload[:200]!r}"]
    samples = data.get("samples", [data] if "tag" in data else [])
    lines = []
    for s in samples:
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
    config: MqttConfig, topic: str, *, count: int = 0, seconds: float = 0, raw: bool = False
) -> int:
    """Subscribe and print until count messages / seconds have passed / Ctrl-C."""
    inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
    version = mqtt.MQTTv5 if config.protocol == "5" else mqtt.MQTTv311
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=version)
    password = config.resolved_password()
    if config.username is not None:
        client.username_pw_set(config.username, password)

    def on_connect(c: mqtt.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
        if not reason.is_failure:
            c.subscribe(topic, qos=1)
            print(f"watching {topic} on {config.host}:{config.port}", file=sys.stderr, flush=True)
        else:
            print(f"broker refused: {reason}", file=sys.stderr, flush=True)

    def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        inbox.put((msg.topic, bytes(msg.payload)))

    client.on_connect = on_connect
    client.on_message = on_message
    try:
        client.connect(config.host, config.port, keepalive=config.keepalive_s)
    except OSError as exc:
        print(f"cannot connect to {config.host}:{config.port}: {exc}", file=sys.stderr)
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
                continue
            received += 1
            if raw:
                print(f"{t} {payload.decode('utf-8', 'replace')}", flush=True)
            else:
                for line in format_message(t, payload):
                    print(line, flush=True)
    finally:
        client.loop_stop()
        client.disconnect()
    return 0
