"""The collector's files: exactly once by (agent, epoch, seq) through redeliveries and
restarts, hourly rotation by rename, torn tails, disk full, bad messages."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from agent.dataset.collector import (
    STATE,
    Collector,
    CollectorError,
    data_files,
    part_path,
    read_samples,
)
from agent.dataset.store import SeenSeqs

HOUR = 3600.0
T0 = 1_796_119_200.0  # 2026-12-01T10:00:00Z


class Clock:
    def __init__(self, t: float = T0 + 60) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def message(first_seq: int, n: int = 2, *, epoch: str = "e1", shot: int = 1) -> bytes:
    samples = [
        {
            "device": "imm-1",
            "tag": f"t{i}",
            "value": shot,
            "quality": "good",
            "seq": first_seq + i,
            "ts_agent": f"2026-12-01T10:00:{shot % 60:02d}Z",
        }
        for i in range(n)
    ]
    body = {"schema": "edge-agent/batch/1", "agent": "gw", "epoch": epoch, "device": "imm-1"}
    return orjson.dumps({**body, "samples": samples})


def all_seqs(folder: Path) -> list[tuple[str, int]]:
    return sorted(
        (s["epoch"], s["seq"])
        for f in data_files(folder, include_open=True)
        for s in read_samples(f)
    )


def opened(folder: Path, clock: Clock, **kw: Any) -> Collector:
    c = Collector(folder, clock=clock, **kw)
    c.open()
    return c


def test_redelivered_messages_are_written_once(tmp_path: Path) -> None:
    c = opened(tmp_path, Clock())
    assert c.offer("edge/gw/imm-1", message(1)) == 2
    assert c.offer("edge/gw/imm-1", message(1)) == 0  # QoS 1 redelivery
    assert c.offer("edge/gw/imm-1", message(2, 3)) == 2  # overlaps: seq 2 known
    assert c.offer("edge/gw/imm-1", message(1, epoch="e2")) == 2  # other epoch: new
    c.close()
    assert all_seqs(tmp_path) == [("e1", 1), ("e1", 2), ("e1", 3), ("e1", 4), ("e2", 1), ("e2", 2)]
    assert c.counts["duplicates"] == 3


def test_nothing_is_visible_under_a_final_name_before_the_hour_is_over(tmp_path: Path) -> None:
    clock = Clock()
    c = opened(tmp_path, clock)
    c.offer("t", message(1))
    c.flush()
    assert data_files(tmp_path) == []  # only the hidden part
    assert part_path(tmp_path, "20261201T10Z").exists()
    clock.t = T0 + HOUR + 1
    assert c.rotate() is True
    c.offer("t", message(3))
    c.close()
    assert [f.name for f in data_files(tmp_path)] == ["samples-20261201T10Z.jsonl"]
    assert [s["seq"] for s in read_samples(data_files(tmp_path)[0])] == [1, 2]
    state = orjson.loads((tmp_path / STATE).read_bytes())
    assert SeenSeqs.from_json(state["seen"]).ranges("gw", "e1") == [(1, 2)]
    assert all_seqs(tmp_path) == [("e1", 1), ("e1", 2), ("e1", 3), ("e1", 4)]


def test_a_restart_mid_hour_continues_the_part_and_drops_redeliveries(tmp_path: Path) -> None:
    clock = Clock()
    c = opened(tmp_path, clock)
    c.offer("t", message(1, 4))
    c.close()
    clock.t += 600  # same hour
    again = opened(tmp_path, clock)
    assert again.offer("t", message(1, 4)) == 0  # the broker re-sent what was not acked
    assert again.offer("t", message(5)) == 2
    again.close()
    assert [s for _, s in all_seqs(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert data_files(tmp_path) == []


def test_a_restart_in_a_later_hour_finishes_the_old_part(tmp_path: Path) -> None:
    clock = Clock()
    c = opened(tmp_path, clock)
    c.offer("t", message(1))
    c.close()
    clock.t += 2 * HOUR
    again = opened(tmp_path, clock)
    assert [f.name for f in data_files(tmp_path)] == ["samples-20261201T10Z.jsonl"]
    assert again.offer("t", message(1)) == 0
    again.close()


def test_a_torn_last_line_is_cut_at_start(tmp_path: Path) -> None:
    clock = Clock()
    c = opened(tmp_path, clock)
    c.offer("t", message(1))
    c.close()
    part = part_path(tmp_path, "20261201T10Z")
    whole = part.read_bytes()
    with part.open("ab") as f:  # a crash in the middle of writing seqs 3 and 4
        f.write(b'{"device":"imm-1","tag":"t0","seq":3,"ag')
    with capture_logs() as logs:
        again = opened(tmp_path, clock)
    assert part.read_bytes() == whole
    assert any(e["event"] == "collect.part.repaired" for e in logs)
    assert again.offer("t", message(3)) == 2  # seq 3 was never written: accepted now
    again.close()
    assert [s for _, s in all_seqs(tmp_path)] == [1, 2, 3, 4]


def test_disk_full_leaves_only_whole_lines_and_acknowledges_nothing(tmp_path: Path) -> None:
    calls = {"n": 0}

    def fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    clock = Clock()
    c = opened(tmp_path, clock, fsync=fsync)
    c.offer("t", message(1))
    c.flush()  # fsync 1: fine
    c.offer("t", message(3))
    with pytest.raises(CollectorError, match="No space left on device"):
        c.flush()
    with pytest.raises(CollectorError, match="reopened"):
        c.offer("t", message(5))  # seen no longer matches the files: refused
    c.close()
    part = part_path(tmp_path, "20261201T10Z")
    assert [s["seq"] for s in read_samples(part)] == [1, 2]
    assert part.read_bytes().endswith(b"\n")
    again = opened(tmp_path, clock)  # the restart after the operator made room
    assert again.offer("t", message(3)) == 2  # redelivered: not lost
    again.close()
    assert [s for _, s in all_seqs(tmp_path)] == [1, 2, 3, 4]


def test_a_folder_that_cannot_be_written_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CollectorError, match="cannot open collector folder"):
        Collector(blocker / "sub").open()


def test_bad_messages_are_counted_skipped_and_logged_once_per_kind(tmp_path: Path) -> None:
    c = opened(tmp_path, Clock())
    with capture_logs() as logs:
        for _ in range(3):
            assert c.offer("t", b"\xff not json") == 0
            assert c.offer("t", b'{"schema": "other/1"}') == 0
        assert c.offer("t", message(1)) == 2
    c.close()
    skipped = [e for e in logs if e["event"] == "collect.message.skipped"]
    assert [e["kind"] for e in skipped] == ["malformed", "unknown_layout"]
    assert (c.counts["malformed"], c.counts["unknown_layout"], c.counts["samples"]) == (3, 3, 2)
    assert [s for _, s in all_seqs(tmp_path)] == [1, 2]


@pytest.mark.parametrize(
    "damage", [b"", b"{broken", b'{"version": 7}', b'{"version": 1, "seen": 3}']
)
def test_a_lost_or_damaged_state_is_rebuilt_from_the_files(tmp_path: Path, damage: bytes) -> None:
    clock = Clock()
    c = opened(tmp_path, clock)
    c.offer("t", message(1))
    clock.t += HOUR
    c.rotate()
    c.close()
    if damage:
        (tmp_path / STATE).write_bytes(damage)
    else:
        (tmp_path / STATE).unlink()
    with capture_logs() as logs:
        again = opened(tmp_path, clock)
    assert any(e["event"] == "collect.state.rebuilt" for e in logs)
    assert again.offer("t", message(1)) == 0
    again.close()


@given(st.lists(st.tuples(st.sampled_from(["e1", "e2"]), st.integers(1, 60)), max_size=200))
def test_seen_seqs_is_a_set_of_triples(items: list[tuple[str, int]]) -> None:
    seen = SeenSeqs()
    model: set[tuple[str, int]] = set()
    for epoch, seq in items:
        assert seen.add("gw", epoch, seq) == ((epoch, seq) not in model)
        model.add((epoch, seq))
        assert ("gw", epoch, seq) in seen
    back = SeenSeqs.from_json(orjson.loads(orjson.dumps(seen.to_json())))
    for epoch in ("e1", "e2"):
        got = {s for a, b in back.ranges("gw", epoch) for s in range(a, b + 1)}
        assert got == {s for e, s in model if e == epoch}
        present = sorted(s for e, s in model if e == epoch)
        missing = {
            g
            for gap in seen.gaps()
            if gap["epoch"] == epoch
            for g in range(gap["first_seq"], gap["last_seq"] + 1)
        }
        if present:
            assert missing == set(range(present[0], present[-1] + 1)) - set(present)


def test_a_decoder_that_breaks_its_contract_costs_one_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lead may point `decode` at another layout's decoder: whatever it raises or
    returns for one message, that message alone is skipped."""
    import agent.dataset.collector as collector_module

    real = collector_module.decode  # type: ignore[attr-defined]

    def decode(topic: str, payload: bytes) -> list[dict[str, Any]]:
        if topic == "raises":
            raise KeyError("samples")
        if topic == "garbage":
            return [{"tag": "x"}]  # no agent, epoch, seq
        return real(topic, payload)

    monkeypatch.setattr(collector_module, "decode", decode)
    c = opened(tmp_path, Clock())
    with capture_logs() as logs:
        assert c.offer("raises", message(1)) == 0
        assert c.offer("garbage", message(1)) == 0
        assert c.offer("edge/gw/imm-1", message(1)) == 2
    c.close()
    assert c.counts["malformed"] == 2
    skipped = [e for e in logs if e["event"] == "collect.message.skipped"]
    assert len(skipped) == 1
    assert "KeyError" in skipped[0]["reason"]
    assert [s for _, s in all_seqs(tmp_path)] == [1, 2]
