"""`edge-agent deadletter list|replay` on a store written by the forwarder's DeadLetters."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from agent.buffer import Record
from agent.cli import build_parser
from agent.publish.deadletter import DeadLetters

DEVICE = """\
devices:
  - name: press
    protocol: modbus
    host: 127.0.0.1
    port: 502
    tags:
      - {name: t, address: 0, type: int16}
"""


def main(argv: list[str]) -> int:
    """The CLI without agent.cli.main's logging set-up (which would bind structlog to the
    captured stdout of this test, closed once it ends)."""
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


def _config(tmp_path: Path, buffer: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(f"agent: {{id: gw}}\nbuffer: {buffer}\n{DEVICE}")
    return path


def _fill(path: str) -> None:
    async def fill() -> None:
        store = DeadLetters(path)
        for i, (device, code) in enumerate([("press", 0x87), ("oven", 0x97), ("press", None)]):
            record = Record(i, device, 10 * i + 1, 10 * i + 3, 3, 0.0, b"[]")
            reason = "cannot encode: ValueError: bad" if code is None else "Not authorized"
            await store.add(record, reason, code, 1)
        store.close()

    asyncio.run(fill())


def test_list_prints_a_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, f"{{path: {tmp_path / 'b.db'}}}")
    _fill(f"{tmp_path / 'b.db'}.deadletter.sqlite")
    assert main(["deadletter", "list", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "ID", "DEVICE", "SEQS", "COUNT", "CODE", "TRIES", "MOVED_AT", "STATE", "REASON"
    ]  # fmt: skip
    assert lines[1].split()[:6] == ["1", "press", "1-3", "3", "0x87", "1"]
    assert lines[1].split()[-3:] == ["dead", "Not", "authorized"]
    assert lines[3].split()[4] == "-"
    assert lines[-1].startswith("3 dead letters, 9 samples (")
    assert main(["deadletter", "list", str(config), "--json", "--device", "press"]) == 0
    rows = orjson.loads(capsys.readouterr().out)
    assert [(r["id"], r["first_seq"], r["last_seq"], r["state"]) for r in rows] == [
        (1, 1, 3, "dead"),
        (3, 21, 23, "dead"),
    ]


def test_replay_marks_the_chosen_entries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, f"{{path: {tmp_path / 'b.db'}}}")
    _fill(f"{tmp_path / 'b.db'}.deadletter.sqlite")
    assert main(["deadletter", "replay", str(config), "2"]) == 0
    assert capsys.readouterr().out.startswith("1 dead letter queued for replay;")
    assert main(["deadletter", "replay", str(config), "--device", "press"]) == 0
    assert capsys.readouterr().out.startswith("2 dead letters queued for replay;")
    assert main(["deadletter", "replay", str(config), "--all"]) == 0  # nothing left to queue
    assert capsys.readouterr().out.startswith("0 dead letters queued")
    main(["deadletter", "list", str(config), "--json"])
    assert {r["state"] for r in orjson.loads(capsys.readouterr().out)} == {"replay queued"}


def test_replay_needs_a_choice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, f"{{path: {tmp_path / 'b.db'}}}")
    assert main(["deadletter", "replay", str(config)]) == 2
    assert "give --all, --device NAME or dead-letter IDs" in capsys.readouterr().err
    assert main(["deadletter", "replay", str(config), "1", "--all"]) == 2


def test_no_store_yet_is_not_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, f"{{path: {tmp_path / 'b.db'}}}")
    assert main(["deadletter", "list", str(config)]) == 0
    assert capsys.readouterr().out.startswith("no dead letters (")
    assert not (tmp_path / "b.db.deadletter.sqlite").exists()  # listing creates nothing


def test_memory_buffer_has_no_store_to_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, "{kind: memory}")
    assert main(["deadletter", "list", str(config)]) == 1
    assert "buffer.kind is memory" in capsys.readouterr().err


def test_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("agent: {id: gw}\nmqtt: {port: 0}\n" + DEVICE)
    assert main(["deadletter", "list", str(path)]) == 2
    assert "problem" in capsys.readouterr().err
