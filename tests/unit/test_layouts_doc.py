"""docs/layouts.md shows messages the encoders really make, and they decode as it says."""

from __future__ import annotations

import re
from pathlib import Path

import orjson

from agent.buffer.common import record_samples
from agent.layouts.decode import Decoder
from tests.support.layout_examples import examples, poll, render

DOC = Path(__file__).resolve().parents[2] / "docs" / "layouts.md"
HOW = "stale: run `.venv/bin/python -m tests.support.layout_examples --write docs/layouts.md`"


def test_every_example_block_is_what_the_encoder_makes() -> None:
    text = DOC.read_text(encoding="utf-8")
    names = re.findall(r"<!-- example: (\S+) -->", text)
    assert sorted(names) == sorted(examples())  # every example shown, none unknown
    assert render(text) == text, f"docs/layouts.md is {HOW}"


def test_the_examples_decode_to_the_poll_they_were_made_from() -> None:
    expected = orjson.dumps(record_samples(poll().data), option=orjson.OPT_SORT_KEYS)
    made = examples()
    for layout in ("lean", "compact", "device"):
        decoder = Decoder()
        if layout == "compact":
            decoder.decode(_body(made["compact-meta"]))
        got = decoder.decode(_body(made[layout]))
        assert orjson.dumps(got.samples, option=orjson.OPT_SORT_KEYS) == expected, layout
        assert got.historical
        assert [g["reason"] for g in got.gaps] == ["drop_oldest"]


def _body(block: str) -> bytes:
    return block.split("```json\n", 1)[1].split("\n```", 1)[0].encode()
