"""Cycle snapshots: triggers, cycle ids, missed cycles, resets, chatter, the state file."""

from __future__ import annotations

import itertools
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.derive.config import CycleConfig
from agent.derive.cycles import Cycle
from agent.derive.state import DeriveState, state_path
from agent.schema import WireSample

T0 = datetime(2026, 12, 1, 11, 0, 0, tzinfo=UTC)


def s(tag: str, value: object, i: int, quality: str = "good") -> WireSample:
    return {
        "device": "imm",
        "tag": tag,
        "value": value,  # type: ignore[typeddict-item]
        "quality": quality,  # type: ignore[typeddict-item]
        "reason": None if quality == "good" else "timeout",
        "code": None,
        "ts_source": None,
        "ts_agent": T0 + timedelta(seconds=i),
        "unit": "bar" if tag == "p" else None,
        "seq": 0,
    }


def cycle(trigger: dict[str, Any], state: dict[str, Any] | None = None, **kw: Any) -> Cycle:
    cfg = CycleConfig.model_validate(
        {"name": "shot", "trigger": trigger, "tags": ["p", "ok"], **kw}
    )
    return Cycle("imm", cfg, state)


def feed(c: Cycle, triggers: list[object], start: int = 0) -> list[list[WireSample]]:
    out = []
    for k, v in enumerate(triggers):
        i = start + k
        poll = [s("n", v, i), s("p", 100.0 + i, i), s("ok", i % 2 == 0, i)]
        record = c.add(poll, float(i))
        if record is not None:
            out.append(record)
    return out


def test_a_counter_gives_one_record_per_change_with_its_value_as_id() -> None:
    c = cycle({"tag": "n", "on": "change"})
    records = feed(c, [7, 7, 8, 8, 8, 9, 10])
    assert [r[0]["value"] for r in records] == [8, 9, 10]
    head, p, ok = records[0]
    assert head["tag"] == "shot"
    assert head["cycle"] == 8
    assert head["quality"] == "good"
    assert head["ts_agent"] == T0 + timedelta(seconds=2)
    assert p["tag"] == "shot.p"
    assert p["value"] == 102.0
    assert p["cycle"] == 8
    assert p["unit"] == "bar"
    assert ok["tag"] == "shot.ok"
    assert ok["value"] is True
    assert "missed" not in head


def test_a_counter_jump_is_announced_and_a_reset_is_marked() -> None:
    c = cycle({"tag": "n", "on": "change"})
    records = feed(c, [7, 8, 11, 3, 4])
    heads = [r[0] for r in records]
    assert [h["value"] for h in heads] == [8, 11, 3, 4]
    assert heads[1]["missed"] == {"first": 9, "last": 10, "count": 2}
    assert heads[2]["quality"] == "uncertain"
    assert heads[2]["reason"] == "counter went back from 11 to 3"
    assert "missed" not in heads[2]
    assert heads[3]["quality"] == "good"


def test_bad_readings_of_the_trigger_leave_the_state_alone() -> None:
    c = cycle({"tag": "n", "on": "change"})
    c.add([s("n", 5, 0)], 0.0)
    assert c.add([s("n", None, 1, "bad")], 1.0) is None
    record = c.add([s("n", 9, 2), s("p", None, 2, "bad")], 2.0)
    assert record is not None
    assert record[0]["missed"] == {"first": 6, "last": 8, "count": 3}
    # a column not good keeps its own quality; a column missing from the poll is bad
    assert record[1]["quality"] == "bad"
    assert record[1]["reason"] == "timeout"
    assert record[2]["tag"] == "shot.ok"
    assert record[2]["reason"] == "not read in the trigger's poll"


@pytest.mark.parametrize(("edge", "expected"), [("rising", [2, 6]), ("falling", [4, 7])])
def test_edges_number_cycles_with_a_sequence(edge: str, expected: list[int]) -> None:
    c = cycle({"tag": "n", "edge": edge})
    records = feed(c, [False, False, True, True, False, False, True, False])
    assert [r[0]["ts_agent"] for r in records] == [T0 + timedelta(seconds=i) for i in expected]
    assert [r[0]["cycle"] for r in records] == [1, 2]


def test_a_threshold_with_hysteresis_fires_once_per_crossing() -> None:
    c = cycle({"tag": "n", "above": 10.0, "hysteresis": 2.0})
    # 11 at the start: already above, not armed; 9 re-arms? no (needs <= 8); 7 re-arms
    records = feed(c, [11.0, 9.0, 12.0, 7.0, 10.5, 9.5, 10.5, 3.0, 11.0])
    assert [r[0]["ts_agent"] for r in records] == [T0 + timedelta(seconds=i) for i in (4, 8)]
    b = cycle({"tag": "n", "below": 0.0})
    assert len(feed(b, [1.0, -1.0, -2.0, 0.0, -0.5])) == 2


def test_a_chattering_bit_is_debounced_and_counted() -> None:
    c = cycle({"tag": "n", "edge": "rising"}, debounce_s=5.0)
    records = feed(c, [False, True, False, True, False, True, False, False, True])
    # edges at 1, 3, 5, 8: 3 and 5 within 5 s of the cycle at 1
    assert [r[0]["ts_agent"] for r in records] == [T0 + timedelta(seconds=i) for i in (1, 8)]
    assert records[1][0]["reason"] == "2 triggers within debounce_s ignored"
    assert records[1][0]["cycle"] == 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=80))
def test_counter_ids_and_missed_account_for_every_step(counts: list[int]) -> None:
    c = cycle({"tag": "n", "on": "change"})
    records = feed(c, list(counts))
    changes = [(a, b) for a, b in itertools.pairwise(counts) if a != b]
    assert [r[0]["cycle"] for r in records] == [b for _, b in changes]
    for (a, b), r in zip(changes, records, strict=True):
        head = r[0]
        if b > a + 1:
            assert head["missed"]["count"] == b - a - 1
        else:
            assert "missed" not in head
        assert (head["quality"] == "uncertain") == (b < a)


def test_state_survives_a_restart_through_the_file(tmp_path: Path) -> None:
    path = state_path(str(tmp_path / "buffer.db"))
    store = DeriveState(path)
    c = cycle({"tag": "n", "edge": "rising"}, store.cycle("imm", "shot"))
    store.put("imm", "shot", c.state)
    feed(c, [False, True, False, True])  # cycles 1, 2; the bit ends high
    store.save()
    again = DeriveState(path)
    c2 = cycle({"tag": "n", "edge": "rising"}, again.cycle("imm", "shot"))
    assert feed(c2, [True], start=10) == []  # still high: no edge, no repeat
    records = feed(c2, [False, True], start=11)
    assert [r[0]["cycle"] for r in records] == [3]  # the sequence goes on
    # A changed trigger starts afresh rather than misreading the old state.
    c3 = cycle({"tag": "n", "on": "change"}, again.cycle("imm", "shot"))
    assert c3.state["seq"] == 0
    assert c3.state["last"] is None


def test_a_counter_moved_on_while_the_agent_was_down(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    store = DeriveState(path)
    c = cycle({"tag": "n", "on": "change"}, None)
    store.put("imm", "shot", c.state)
    feed(c, [100, 101])
    store.save()
    c2 = cycle({"tag": "n", "on": "change"}, DeriveState(path).cycle("imm", "shot"))
    (record,) = feed(c2, [104, 104])
    assert record[0]["cycle"] == 104
    assert record[0]["missed"] == {"first": 102, "last": 103, "count": 2}
    c3 = cycle({"tag": "n", "on": "change"}, DeriveState(path).cycle("imm", "shot"))
    assert feed(c3, [101]) == []  # the last stored cycle is not recorded again


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[]", b'{"version": 9, "devices": {}}', b'{"version": 1, "devices": []}'],
)
def test_an_unreadable_state_file_is_moved_aside(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "s.json"
    path.write_bytes(content)
    store = DeriveState(path)
    assert store.devices == {}
    assert not path.exists()
    assert (tmp_path / "s.json.bad").read_bytes() == content
    store.put("imm", "shot", {"seq": 1})
    store.save()
    assert json.loads(path.read_bytes())["devices"] == {"imm": {"shot": {"seq": 1}}}


def test_a_state_with_wrong_types_is_not_used() -> None:
    bad = {"trigger": "n:change", "last": 5, "armed": None, "seq": "x", "id": None}
    assert cycle({"tag": "n", "on": "change"}, bad).state["seq"] == 0


def test_a_failing_save_keeps_the_state_and_works_again(tmp_path: Path) -> None:
    blocker = tmp_path / "ro"
    blocker.write_text("a file where a directory should be")
    store = DeriveState(blocker / "s.json")
    store.put("imm", "shot", {"seq": 3})
    store.save()  # must not raise
    assert store.saves == 0
    os.remove(blocker)
    store.save()
    assert store.saves == 1
    assert DeriveState(blocker / "s.json").cycle("imm", "shot") == {"seq": 3}


def at_trigger(**kw: Any) -> tuple[Cycle, list[frozenset[str]]]:
    cfg = CycleConfig.model_validate(
        {
            "name": "shot",
            "trigger": {"tag": "n", "on": "change"},
            "tags": ["p", "ok"],
            "read": "at_trigger",
            "read_timeout_s": 3.0,
            **kw,
        }
    )
    c = Cycle("imm", cfg, None)
    c.read_groups = frozenset({"slow"})
    asked: list[frozenset[str]] = []
    c.request_read = asked.append
    return c, asked


def test_at_trigger_takes_the_first_readings_after_the_trigger() -> None:
    c, asked = at_trigger()
    assert c.add([s("n", 1, 0), s("p", 1.0, 0)], 0.0) is None  # baseline
    assert c.add([s("n", 2, 1), s("p", 2.0, 1)], 1.0) is None  # trigger: waits
    assert asked == [frozenset({"slow"})]
    assert c.state["last"] == 1  # not persisted while the re-read is pending
    assert c.add([s("p", 3.0, 2)], 2.0) is None  # p re-read; ok still missing
    record = c.add([s("ok", True, 3), s("p", 4.0, 3)], 3.0)
    assert record is not None
    head, p, ok = record
    assert head["cycle"] == 2
    assert head["ts_agent"] == T0 + timedelta(seconds=1)  # the trigger time
    assert (p["value"], p["ts_agent"], p["cycle"]) == (3.0, T0 + timedelta(seconds=2), 2)
    assert (ok["value"], ok["tag"]) == (True, "shot.ok")
    assert c.state["last"] == 2
    assert c.dirty


def test_at_trigger_publishes_what_was_not_read_as_bad() -> None:
    c, _ = at_trigger()
    c.add([s("n", 1, 0)], 0.0)
    c.add([s("n", 2, 1)], 1.0)
    c.add([s("p", 3.0, 2)], 2.0)
    record = c.add([s("n", 2, 5)], 5.0)  # past the 3 s timeout
    assert record is not None
    assert record[1]["value"] == 3.0
    assert record[2]["quality"] == "bad"
    assert record[2]["reason"] == "not read within read_timeout_s (3.0 s)"
    # the next trigger closes an unfinished snapshot first
    c.add([s("n", 3, 6)], 6.0)
    record = c.add([s("n", 4, 7)], 7.0)
    assert record is not None
    assert record[0]["cycle"] == 3
    assert record[1]["reason"] == "not read before the next cycle"


def test_a_cycle_rebuilt_by_a_reload_starts_from_what_the_old_one_left() -> None:
    store = DeriveState(None)
    old = cycle({"tag": "n", "on": "change"}, store.cycle("imm", "shot"))
    store.put("imm", "shot", old.state)
    feed(old, [1, 2])
    new = cycle({"tag": "n", "on": "change"}, store.cycle("imm", "shot"))  # built now
    feed(old, [3], start=2)  # the old device polls once more before it is stopped
    store.put("imm", "shot", new.state)
    assert feed(new, [3], start=3) == []  # cycle 3 is not recorded twice
    assert [r[0]["cycle"] for r in feed(new, [4], start=4)] == [4]
