"""JSON Schemas generated from the pydantic models (`edge-agent schema`).

The copies in this folder are the published ones; a test fails when they are stale.
Regenerate with `edge-agent schema --out agent/schemas`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def write_schemas(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in schemas().items():
        path = out / name
        path.write_text(render(schema), encoding="utf-8")
        written.append(path)
    return written
