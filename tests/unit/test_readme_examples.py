"""Every YAML example in the README and the docs is a valid (part of a) config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.config import parse_config

ROOT = Path(__file__).parents[2]
DOCS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "drivers").glob("*/README.md")),
]
BASE = {
    "agent": "agent: {id: gw-doc, site: s, area: a, line: l}\n",
    "devices": (
        "devices:\n  - {name: doc-plc, protocol: modbus, host: 127.0.0.1, "
        "tags: [{name: t, address: 0}]}\n"
    ),
}
ENV = {
    "MQTT_PASSWORD": "x",
    "OVEN_PASSWORD": "x",
    "KEY_PASS": "x",
    "MQTT_HOST": "127.0.0.1",
    "MQTT_PORT": "1883",
}


def examples() -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", text, re.S)):
            out.append((f"{doc.relative_to(ROOT)}#{i}", block))
    return out


@pytest.mark.parametrize(("where", "block"), examples(), ids=[w for w, _ in examples()])
def test_yaml_example_validates(where: str, block: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    top = {line.split(":", 1)[0] for line in block.splitlines() if re.match(r"^\w", line)}
    text = block + "".join(part for key, part in BASE.items() if key not in top)
    parse_config(text, where)
