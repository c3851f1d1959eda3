"""The example messages of docs/layouts.md, made by the real encoders from one poll.

    .venv/bin/python -m tests.support.layout_examples --write docs/layouts.md

rewrites every block between ``<!-- example: NAME -->`` and ``<!-- /example -->`` in the
file; tests/unit/test_layouts_doc.py fails when one is stale.
"""

from __future__ import annotations

import argparse
import re
import struct
from pathlib import Path

import orjson

from agent.buffer import Gap, Record
from agent.config import AgentSection, MqttConfig
from agent.payload import PayloadEncoder
from agent.publish import Message

AGENT = AgentSection(id="gw-line4", site="plant-a", area="assembly", line="line-4")
EPOCH = "3f2a9c0d4b5e6f708192a3b4c5d6e7f8"
TS = "2026-12-01T08:00:00.100000Z"
_BLOCK = re.compile(r"(<!-- example: (\S+) -->\n)(.*?)(<!-- /example -->)", re.S)


def _f32(x: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


def poll() -> Record:
    """One poll of a press: a float32 power meter, a counter, a running bit, a
    temperature whose read timed out, and a float32 register holding NaN."""
    base: dict[str, object] = {
        "device": "press-1",
        "reason": None,
        "code": None,
        "ts_source": None,
        "ts_agent": TS,
    }
    samples = [
        {**base, "tag": "power_kw", "value": _f32(50.02), "quality": "good", "unit": "kW"},
        {**base, "tag": "pieces", "value": 48213, "quality": "good", "unit": None},
        {**base, "tag": "running", "value": True, "quality": "good", "unit": None},
        {
            **base,
            "tag": "temperature",
            "value": None,
            "quality": "bad",
            "reason": "timeout",
            "unit": "degC",
        },
        {
            **base,
            "tag": "flow",
            "value": None,
            "quality": "bad",
            "reason": "not a number",
            "unit": "l/min",
            "value_text": "NaN",
        },
    ]
    s: dict[str, object]
    for i, s in enumerate(samples):
        s["seq"] = 1001 + i
    return Record(1, "press-1", 1001, 1005, 5, 0.0, orjson.dumps(samples), epoch=EPOCH)


def _json(m: Message) -> str:
    return orjson.dumps(orjson.loads(m.payload), option=orjson.OPT_INDENT_2).decode()


def examples() -> dict[str, str]:
    """Block name → its Markdown (a fenced block with the topic as a comment line)."""
    record = poll()
    gaps = [Gap(990, 994, 5, "drop_oldest", EPOCH)]
    out: dict[str, str] = {}
    for layout in ("lean", "compact", "device", "tag"):
        enc = PayloadEncoder(AGENT, MqttConfig(layout=layout), epoch=EPOCH)
        pre = enc.preamble(record)
        messages = enc.encode(record, historical=True, gaps=gaps)
        if layout == "compact":
            [meta] = pre
            out["compact-meta"] = _fence(meta)
        out[layout] = _fence(messages[0])
    return out


def _fence(m: Message) -> str:
    retained = ", retained" if m.retain else ""
    return f"topic `{m.topic}`{retained}:\n\n```json\n{_json(m)}\n```\n"


def render(text: str) -> str:
    made = examples()

    def sub(match: re.Match[str]) -> str:
        name = match.group(2)
        if name not in made:
            raise KeyError(f"docs example {name!r}: no such example (have {sorted(made)})")
        return match.group(1) + made[name] + match.group(4)

    return _BLOCK.sub(sub, text)


def main() -> int:
    parser = argparse.ArgumentParser(description="rewrite the example blocks of a docs page")
    parser.add_argument("--write", type=Path, required=True)
    args = parser.parse_args()
    path: Path = args.write
    path.write_text(render(path.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
