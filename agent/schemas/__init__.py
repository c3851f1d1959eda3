"""JSON Schemas generated from the pydantic models (`edge-agent schema`).

The copies in this folder are the published ones; a test fails when they are stale.
Regenerate with `edge-agent schema --out agent/schemas --reference docs/configuration.md`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from agent.config import Config
from agent.schema import BatchPayload, SamplePayload


def schemas() -> dict[str, dict[str, Any]]:
    """File name → JSON Schema."""
    return {
        "config.schema.json": Config.model_json_schema(),
        "batch.schema.json": BatchPayload.model_json_schema(by_alias=True),
        "sample.schema.json": SamplePayload.model_json_schema(by_alias=True),
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
    for noise in ("typing.", "pydantic.types.", "drivers.base.", "drivers.modbus.config."):
        text = text.replace(noise, "")
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
    from agent.config import (
        AgentSection,
        BufferConfig,
        LoggingConfig,
        MqttConfig,
    )
    from drivers.base import PollGroup, SimulateSpec
    from drivers.links import Rs485Settings, RtuOverTcpLink, SerialLink, TcpGatewayLink
    from drivers.modbus.config import ModbusDevice, ModbusTag

    sections: list[tuple[str, type[BaseModel], str]] = [
        ("agent", AgentSection, "Who this agent is."),
        ("buffer", BufferConfig, "The durable store-and-forward buffer."),
        ("mqtt", MqttConfig, "The broker samples are published to."),
        ("logging", LoggingConfig, "Logging (to stderr)."),
        ("links.NAME (type: serial)", SerialLink, "An RS-485/RS-232 line on a serial port."),
        ("links.NAME.rs485", Rs485Settings, "Linux RS-485 mode (adapters switched by RTS)."),
        ("links.NAME (type: rtu_over_tcp)", RtuOverTcpLink, "A serial device server."),
        ("links.NAME (type: tcp)", TcpGatewayLink, "A Modbus/TCP gateway, many unit ids."),
        ("devices[] (protocol: modbus)", ModbusDevice, "A Modbus device (TCP or on a link)."),
        ("devices[].tags[] (modbus)", ModbusTag, "A Modbus tag."),
        ("devices[].poll_groups.NAME", PollGroup, "A poll group."),
        ("devices[].tags[].simulate", SimulateSpec, "Simulated value (simulator mode)."),
    ]
    for title, model, blurb in _extra_reference_sections():
        sections.append((title, model, blurb))
    out = [
        "# Configuration reference",
        "",
        "Generated from the config models by `edge-agent schema --out agent/schemas "
        "--reference docs/configuration.md` "
        "(do not edit by hand; a test fails when it is stale). Unknown keys are errors. "
        "`${VAR}` and `${VAR:-default}` are replaced from the environment.",
        "",
    ]
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
    return "\n".join(out)


def _extra_reference_sections() -> list[tuple[str, type[BaseModel], str]]:
    """Sections of the protocols registered besides Modbus (agent.config.DEVICE_MODELS)."""
    from agent.config import DEVICE_MODELS

    out: list[tuple[str, type[BaseModel], str]] = []
    for protocol, model in DEVICE_MODELS.items():
        if protocol == "modbus":
            continue
        out.append((f"devices[] (protocol: {protocol})", model, f"A {protocol} device."))
        tag_model = _inner_tag_model(model)
        if tag_model is not None:
            out.append((f"devices[].tags[] ({protocol})", tag_model, f"A {protocol} tag."))
    return out


def _inner_tag_model(model: type[BaseModel]) -> type[BaseModel] | None:
    field = model.model_fields.get("tags")
    args = getattr(field.annotation, "__args__", ()) if field else ()
    for arg in args:
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None
