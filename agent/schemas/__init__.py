"""JSON Schemas generated from the pydantic models (`edge-agent schema`).

The copies in this folder are the published ones; a test fails when they are stale.
Regenerate with `edge-agent schema --out agent/schemas --reference docs/configuration.md`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from agent.config import config_model
from agent.schema import BatchPayload, CompactPayload, LeanPayload, MetaPayload, SamplePayload


def schemas() -> dict[str, dict[str, Any]]:
    """File name → JSON Schema."""
    return {
        "config.schema.json": config_model().model_json_schema(),
        "batch.schema.json": BatchPayload.model_json_schema(by_alias=True),
        "sample.schema.json": SamplePayload.model_json_schema(by_alias=True),
        "lean.schema.json": LeanPayload.model_json_schema(by_alias=True),
        "compact.schema.json": CompactPayload.model_json_schema(by_alias=True),
        "meta.schema.json": MetaPayload.model_json_schema(by_alias=True),
    }


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write_schemas(out: Path, reference: Path | None = None) -> list[Path]:
    """Write the JSON Schemas into `out`, and the Markdown reference to `reference`."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in schemas().items():
        path = out / name
        path.write_text(render(schema), encoding="utf-8")
        written.append(path)
    if reference is not None:
        reference.parent.mkdir(parents=True, exist_ok=True)
        reference.write_text(reference_markdown(), encoding="utf-8")
        written.append(reference)
    return written


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    if text is None:
        text = str(annotation)
    text = re.sub(r"\b(?:typing|pydantic\.types|drivers(?:\.\w+)*)\.", "", text)
    return text.replace("|", "\\|")


def _default(field: Any) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:
            return "(default)"
        if isinstance(value, BaseModel):
            return "(see below)"
        return f"`{value!r}`"
    return f"`{field.default!r}`"


def reference_markdown() -> str:
    """docs/configuration.md: every config key with type, default and meaning."""
    from agent.command.config import AuditConfig, CommandsConfig, SigningConfig
    from agent.config import (
        AgentSection,
        AzureIotHub,
        BufferConfig,
        HttpConfig,
        LoggingConfig,
        MqttConfig,
        SupervisionConfig,
    )
    from agent.derive.config import CycleConfig, CycleTrigger, ReportConfig, WindowConfig
    from drivers.base import PollGroup, SimulateSpec, WriteSpec
    from drivers.links import Rs485Settings, RtuOverTcpLink, SerialLink, TcpGatewayLink

    sections: list[tuple[str, type[BaseModel], str]] = [
        ("agent", AgentSection, "Who this agent is."),
        ("buffer", BufferConfig, "The durable store-and-forward buffer."),
        ("mqtt", MqttConfig, "The broker samples are published to."),
        ("mqtt.azure", AzureIotHub, "Azure IoT Hub login (profile azure-iot-hub; docs/cloud.md)."),
        ("logging", LoggingConfig, "Logging (to stderr)."),
        ("http", HttpConfig, "The metrics, health and status endpoint (off when absent)."),
        (
            "supervision",
            SupervisionConfig,
            "How the agent treats a task that fails or stops making progress.",
        ),
        (
            "commands",
            CommandsConfig,
            "Writes from the platform, off unless enabled ([commands.md](commands.md)).",
        ),
        ("commands.signing", SigningConfig, "HMAC signatures on requests (off when absent)."),
        ("commands.audit", AuditConfig, "The local audit log of every request."),
        ("links.NAME (type: serial)", SerialLink, "An RS-485/RS-232 line on a serial port."),
        ("links.NAME.rs485", Rs485Settings, "Linux RS-485 mode (adapters switched by RTS)."),
        ("links.NAME (type: rtu_over_tcp)", RtuOverTcpLink, "A serial device server."),
        ("links.NAME (type: tcp)", TcpGatewayLink, "A Modbus/TCP gateway, many unit ids."),
        *_protocol_sections(),
        ("devices[].poll_groups.NAME", PollGroup, "A poll group."),
        ("devices[].tags[].simulate", SimulateSpec, "Simulated value (simulator mode)."),
        (
            "devices[].tags[].write",
            WriteSpec,
            "Guards and read-back of writes to a `writable: true` tag "
            "([commands.md](commands.md)); limits in engineering units.",
        ),
        (
            "devices[].report, devices[].poll_groups.NAME.report, devices[].tags[].report",
            ReportConfig,
            "Report by exception ([docs/derive.md](derive.md)).",
        ),
        ("devices[].cycles[]", CycleConfig, "A cycle snapshot ([docs/derive.md](derive.md))."),
        ("devices[].cycles[].trigger", CycleTrigger, "What starts a cycle."),
        ("devices[].windows[]", WindowConfig, "Window features ([docs/derive.md](derive.md))."),
    ]
    out = [
        "# Configuration reference",
        "",
        "Generated from the config models by `edge-agent schema --out agent/schemas "
        "--reference docs/configuration.md` "
        "(do not edit by hand; a test fails when it is stale). Unknown keys are errors. "
        "`${VAR}` and `${VAR:-default}` are replaced from the environment.",
        "",
    ]
    out += _CHECKS.splitlines()
    for title, model, blurb in sections:
        out += [
            f"## `{title}`",
            "",
            blurb,
            "",
            "| key | type | default | meaning |",
            "|---|---|---|---|",
        ]
        for name, field in model.model_fields.items():
            desc = (field.description or "").replace("|", "\\|")
            out.append(
                f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {desc} |"
            )
        out.append("")
    out += PROFILES_SECTION.splitlines()
    out.append("")
    return "\n".join(out)


_CHECKS = """\
## Checks beyond the keys

`edge-agent validate` (and `run`, which loads the file the same way before it starts
anything) also makes every check that starting the agent would otherwise meet, each
reported with file:line and exit code 2:

- **Each device's own checks.** Modbus: the request plan is made as the driver makes it
  (a value larger than `max_registers_per_request`, e.g. a float64 with 2, is an error at
  the tag's `type`, or `length` for strings); `host` must be an IP address or a host name;
  in simulator mode (`--simulate`) every `simulate` section must be one the simulator
  can produce (a text constant for a number tag is an error).
- **Names that go into MQTT topics**, wherever they do with the configured layout:
  `agent.site`/`area`/`line` when a topic template uses them, device names, tag names with
  `layout: tag`, Sparkplug's `group_id`, `edge_node_id` (or `agent.id`) and device names.
  Not allowed in them: `+`, `#`, `/`, NUL, control characters (U+0001..U+001F,
  U+007F..U+009F), noncharacters and lone surrogates; an empty name. The templates
  (`topic`, `topic_tag`, `status_topic`, `device_status_topic`) may hold no `+` or `#`,
  may not start with `$` (also not through their first field), and every topic they
  expand to must fit MQTT's 65,535 bytes. With `layout: device` tag names only appear in
  the JSON body and may be any text. `mqtt.client_id` and `username` must be valid MQTT
  strings.
- **Cloud profiles** (`mqtt.profile`, docs/cloud.md): `aws-iot-core` needs `client_id`
  (the thing name: 1-128 letters, digits, `:`, `_`, `-`), a `tls` section with
  `cert_file`/`key_file`, a host name (not an address: SNI), topics of at most 7 `/` and
  256 bytes (every topic the layout publishes, expanded with the longest device and tag
  name), `max_message_bytes` ≤ 128,000 and `max_publishes_per_s` ≤ 100. `azure-iot-hub`
  needs the `azure` section, MQTT 3.1.1, a `tls` section, exactly one login (a base64
  `device_key`/`device_key_file`, or a TLS client certificate), no `layout: sparkplug`,
  no topic templates, `client_id`, `username`, `password` or `retain_last` of its own,
  device names (and tag names with `layout: tag`) of letters, digits and `- . _ ~` only
  (they go into the message properties) and `max_message_bytes` ≤ 256,000.
- **Port 0** (any free port) is for simulator mode only: a device `port: 0` or an OPC UA
  endpoint `opc.tcp://host:0/...` is an error for `validate` and `run`, and accepted by
  `validate --simulate`, `run --simulate` and `simulate`. (`http.port: 0` is always
  allowed: it listens on a free port, logged as `http.listening`.)
- **Hosts**: `mqtt.host` and `http.host` must be IP addresses or host names (nothing is
  resolved: loading never opens a socket).
- **Numbers**: a tag's `scale` and `offset` must be finite (`.nan`, `.inf` are errors).
- **The buffer file**: `buffer.path` may not be a directory, and no parent of it may be a
  file. A missing directory is created at start.
- **Writes** ([commands.md](commands.md)): `writable: true` on a tag its protocol cannot
  write (the device's `write_refusal`: a Modbus input register, say) or of a type that
  cannot be written; `scale: 0` on a writable number; `write` limits that contradict the
  type (`min`/`max`/`max_step`/`tolerance` on a bool or string, `allowed` values the type
  cannot hold, `min`/`max` outside what the type holds with its scale and offset); an
  `interlock` naming no tag of the device (or the tag itself); `commands.enabled` over a
  plaintext or unauthenticated broker session outside simulator mode, or with MQTT
  3.1.1 (except with the Sparkplug layout); a `commands.signing.key_file` that cannot be
  read, is readable by group or others, or holds under 16 bytes; command topics with
  wildcards or equal to each other.
- **Derived data** ([derive.md](derive.md)): every tag a cycle or a window names must be
  a tag of the device; an `edge` trigger needs a bool tag, `above`/`below` a numeric one,
  window tags must be numeric and a tag's own deadband needs a numeric tag (where the
  protocol's `type` says so); with `read: same_poll` the captured tags must be in the
  trigger's poll group; a trigger (and, with `read: at_trigger`, a captured tag) may not
  be in a subscribed group; derived names (`CYCLE`, `CYCLE.TAG`, `TAG.FEATURE`) may not
  clash with a tag or with each other.

What can change between `validate` and the start, and is therefore met at run time:

- `http.host`/`port` cannot be listened on (port in use, address not on this machine,
  name not resolvable): `run` exits 1 with one line, `agent.failed ... http: cannot
  listen on HOST:PORT: ...`.
- Another agent holds the same `buffer.path`: exits 1 with one line (`... in use`).
- The buffer's disk fails: the newest data is kept in memory
  (`buffer.memory_fallback_bytes`); when an existing buffer file cannot be read at all
  (its seq high-water mark is unknown), `run` exits 1 with one line.
- TLS files (`ca_file`, `cert_file`, `key_file` and its mode), `password_file` and
  `key_password_file` are read at every connection attempt: a missing or unreadable one
  is logged once as `mqtt.connect.failed` with the file and the reason, retried with
  backoff, and picked up once fixed (a file may be provisioned after the start).
- A broker or device host that does not resolve or answer: retried with backoff (the
  device is reported down, the broker as `mqtt.connect.failed`).
- OPC UA `cert_dir`, certificates and trust: checked when connecting; the device is
  reported down with the reason.

A reload re-reads the file with the same checks (only the mode of port 0 is not judged
there: simulator mode keeps each device's served port).
"""


PROFILES_SECTION = """\
## Profiles

A device type (protocol, tags, types, scaling, poll groups, intervals, timeouts) can be
defined once in a YAML file of its own, a *profile*, and used by many devices that give
only what differs: name, host or link, unit id. Twelve identical temperature controllers
on one line are twelve short lines (the example
[configs/temperature-line.yaml](../configs/temperature-line.yaml) uses
[configs/profiles/temperature-controller.yaml](../configs/profiles/temperature-controller.yaml)):

```text
profiles:
  tc: profiles/temperature-controller.yaml   # name → file, relative to this config file
devices:
  - { name: tc-01, profile: tc, host: 10.0.4.21, unit_id: 1 }
  - { name: tc-02, profile: tc, host: 10.0.4.21, unit_id: 2 }
  - { name: tc-03, profile: profiles/temperature-controller.yaml, host: 10.0.4.21, unit_id: 3 }
```

- `profiles` (top level) maps a name to a profile file; `profile:` in a device is either
  such a name or a file path (ending in `.yaml`/`.yml`, or containing `/`). Relative paths
  are relative to the folder of the config file, not the working directory.
- A profile file is a mapping of device keys. It cannot set `name` (each device names
  itself) or `profile` (profiles do not nest).
- The device's own keys override the profile's, key by key at the top level of the
  device: a device that gives `tags` or `poll_groups` replaces the profile's whole list
  or map; one that gives `interval_s` keeps the profile's tags.
- Profile files are read like the config file: duplicate keys, anchors and aliases are
  errors, YAML 1.2 scalars, `${VAR}` replaced from the environment.
- A problem in a profile is reported at the profile's file and line, once, with the
  devices that use it: `profiles/tc.yaml:7 tags[0].type: Input should be ... (profile of
  tc-01, tc-02, ...)`. A problem in a device's own keys is reported at the config file's
  line. A profile that cannot be read (a missing file, an unknown name) is one problem
  at the `profile:` or `profiles:` entry that names it.
- A running agent re-reads the profile files on `edge-agent reload` (or SIGHUP), like the
  config file; devices whose resulting config changed are restarted.
"""


def _protocol_sections() -> list[tuple[str, type[BaseModel], str]]:
    """A device section and a tag section per protocol registered in drivers.registry."""
    from drivers import registry

    out: list[tuple[str, type[BaseModel], str]] = []
    for name, entry in registry.protocols().items():
        blurb = f"{entry.summary}." if entry.summary else f"A {name} device."
        out.append((f"devices[] (protocol: {name})", entry.device_model, blurb))
        if entry.tag_model is not None:
            out.append((f"devices[].tags[] ({name})", entry.tag_model, f"A {name} tag."))
    return out
