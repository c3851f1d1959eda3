"""The shipped JSON Schemas and config reference match the models."""

from __future__ import annotations

from pathlib import Path

from agent.schemas import reference_markdown, render, schemas

ROOT = Path(__file__).parents[2]
HOW = "stale: run `edge-agent schema --out agent/schemas --reference docs/configuration.md`"


def test_json_schemas_are_fresh() -> None:
    for name, schema in schemas().items():
        shipped = (ROOT / "agent" / "schemas" / name).read_text(encoding="utf-8")
        assert shipped == render(schema), f"{name} is {HOW}"


def test_config_reference_is_fresh() -> None:
    shipped = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert shipped == reference_markdown(), f"docs/configuration.md is {HOW}"


def test_payload_schema_names_its_version() -> None:
    batch = schemas()["batch.schema.json"]
    assert "schema" in batch["properties"]
    assert "samples" in batch["required"]
