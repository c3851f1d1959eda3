"""`edge-agent export` from a collector's files: the datasets open in pandas with the
expected columns, one row per shot with no duplicate and the outage marked, in CSV and
Parquet; window and time shapes; failures leave no file behind."""

from __future__ import annotations

import builtins
import errno
import os
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pytest

from agent.cli import build_parser
from agent.dataset.collector import Collector

PARAMS = {"cycle_time": "s", "cushion": "mm", "pass_fail": None}


def shot_record(seq: int, shot: int) -> list[dict[str, Any]]:
    """The samples agent.derive publishes for one shot (docs/derive.md)."""
    ts = f"2026-12-01T10:{shot // 60:02d}:{shot % 60:02d}.200000Z"
    base: dict[str, Any] = {
        "device": "imm-1",
        "reason": None,
        "code": None,
        "ts_source": None,
        "ts_agent": ts,
    }
    out = [
        {
            **base,
            "tag": "shot",
            "value": shot,
            "quality": "good",
            "unit": None,
            "seq": seq,
            "cycle": shot,
        }
    ]
    values = {"cycle_time": 4.0 + shot / 100, "cushion": 4.0 - shot / 50, "pass_fail": shot != 8}
    for i, (name, unit) in enumerate(PARAMS.items(), start=1):
        quality = "bad" if (shot, name) == (9, "cushion") else "good"
        value = None if quality == "bad" else values[name]
        out.append(
            {
                **base,
                "tag": f"shot.{name}",
                "value": value,
                "quality": quality,
                "unit": unit,
                "seq": seq + i,
                "cycle": shot,
            }
        )
    return out


def publish(c: Collector, samples: list[dict[str, Any]], epoch: str = "e1") -> None:
    body = {
        "schema": "edge-agent/batch/1",
        "agent": "gw",
        "epoch": epoch,
        "device": "imm-1",
        "samples": samples,
    }
    c.offer("edge/gw/imm-1", orjson.dumps(body))


@pytest.fixture
def collected(tmp_path: Path) -> Path:
    """Shots 1..10 of which 4..6 happened while the agent was down (derive's `missed`),
    every record of shots 2 and 7 delivered twice (a redelivery after a reconnect, one of
    them after a collector restart), written across two hours."""
    folder = tmp_path / "collect"
    clock = [1_796_119_200.0 + 10]
    c = Collector(folder, clock=lambda: clock[0])
    c.open()
    seq = 1
    for shot in (1, 2, 3, 7, 8, 9, 10):
        record = shot_record(seq, shot)
        seq += len(record)
        publish(c, record)
        if shot == 2:
            publish(c, record)
        if shot == 7:
            c.close()  # a restart mid-hour
            c = Collector(folder, clock=lambda: clock[0])
            c.open()
            publish(c, record)
        if shot == 8:
            clock[0] += 3600
            c.rotate()
    c.close()
    return folder


def export(*args: str) -> int:
    """`edge-agent export ARGS` in this process (without main's logging set-up, which
    would bind structlog to one test's captured stderr)."""
    parsed = build_parser().parse_args(["export", *args])
    code: int = parsed.func(parsed)
    return code


EXPECTED = [
    "cycle", "ts", "device", "gap_before",
    "cycle_time", "cycle_time__quality", "cushion", "cushion__quality",
    "pass_fail", "pass_fail__quality",
]  # fmt: skip


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_one_row_per_shot_without_duplicates_and_with_the_outage_marked(
    collected: Path, tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / f"shots.{suffix}"
    assert export("--from", str(collected), "--include-open", "--shape", "cycle",
                  "--out", str(out)) == 0  # fmt: skip
    assert "7 rows" in capsys.readouterr().out
    df = pd.read_csv(out) if suffix == "csv" else pd.read_parquet(out)
    assert list(df.columns) == EXPECTED
    assert df["cycle"].tolist() == [1, 2, 3, 7, 8, 9, 10]
    assert df["gap_before"].tolist() == [0, 0, 0, 3, 0, 0, 0]
    assert df["pass_fail"].tolist() == [True, True, True, True, False, True, True]
    assert df["cycle_time"].tolist() == pytest.approx([4.01, 4.02, 4.03, 4.07, 4.08, 4.09, 4.1])
    row9 = df[df["cycle"] == 9].iloc[0]
    assert row9["cushion__quality"] == "bad"
    assert pd.isna(row9["cushion"])
    assert set(df["device"]) == {"imm-1"}
    if suffix == "parquet":
        assert str(df["ts"].dtype) == "datetime64[us, UTC]"
        assert df["pass_fail"].dtype == bool
    meta = orjson.loads((tmp_path / f"shots.{suffix}.meta.json").read_bytes())
    assert meta["units"] == {"cycle_time": "s", "cushion": "mm"}
    assert meta["cycle_gaps"] == [
        {"device": "imm-1", "after_cycle": 3, "before_cycle": 7, "missing": 3}
    ]
    assert meta["seq_gaps"] == []  # seqs of the shots the agent saw are contiguous
    assert meta["rows"] == 7
    assert meta["samples"] == 28


def test_only_finished_hours_are_read_without_include_open(collected: Path, tmp_path: Path) -> None:
    out = tmp_path / "finished.csv"
    assert export("--from", str(collected), "--shape", "cycle", "--cycle", "shot",
                  "--out", str(out)) == 0  # fmt: skip
    assert pd.read_csv(out)["cycle"].tolist() == [1, 2, 3, 7, 8]


def test_a_repeated_cycle_id_with_new_seqs_is_dropped(tmp_path: Path) -> None:
    """derive's crash window: the same shot recorded again after a restart, new seqs."""
    folder = tmp_path / "c"
    c = Collector(folder)
    c.open()
    publish(c, shot_record(1, 1))
    publish(c, shot_record(5, 2))
    publish(c, shot_record(1, 2), epoch="e2")  # after a restart: new epoch, same shot
    c.close()
    out = tmp_path / "s.csv"
    assert export("--from", str(folder), "--include-open", "--shape", "cycle",
                  "--out", str(out)) == 0  # fmt: skip
    assert pd.read_csv(out)["cycle"].tolist() == [1, 2]
    meta = orjson.loads((tmp_path / "s.csv.meta.json").read_bytes())
    assert meta["duplicate_cycles_dropped"] == 1


def test_cycles_from_raw_polls_of_a_counter(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    c = Collector(folder)
    c.open()
    seq = 1
    for poll, shot in enumerate([5, 5, 6, 6, 6, 8]):
        ts = f"2026-12-01T10:00:{poll:02d}Z"
        samples = [
            {"device": "imm-1", "tag": "shot_count", "value": shot, "quality": "good",
             "seq": seq, "ts_agent": ts},
            {"device": "imm-1", "tag": "cushion", "value": 4.0 + poll, "quality": "good",
             "unit": "mm", "seq": seq + 1, "ts_agent": ts},
        ]  # fmt: skip
        seq += 2
        publish(c, samples)
    c.close()
    out = tmp_path / "s.csv"
    assert export("--from", str(folder), "--include-open", "--shape", "cycle",
                  "--counter", "shot_count", "--out", str(out)) == 0  # fmt: skip
    df = pd.read_csv(out)
    assert list(df.columns) == ["cycle", "ts", "device", "gap_before", "cushion",
                                "cushion__quality"]  # fmt: skip
    assert df["cycle"].tolist() == [5, 6, 8]
    assert df["cushion"].tolist() == [4.0, 6.0, 9.0]  # the first poll of each shot
    assert df["gap_before"].tolist() == [0, 0, 1]


def test_time_and_window_shapes(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    c = Collector(folder)
    c.open()
    seq = 1
    for k in range(3):
        end, start = f"2026-12-01T10:00:0{k + 1}Z", f"2026-12-01T10:00:0{k}Z"
        samples = []
        for feature, value in (("mean", 0.1 * k), ("rms", 1.0 + k), ("good_share", 1.0)):
            samples.append({"device": "press-7", "tag": f"vibration.{feature}", "value": value,
                            "quality": "good", "unit": "mm/s" if feature != "good_share" else None,
                            "seq": seq, "ts_agent": end, "window_start": start})  # fmt: skip
            seq += 1
        samples.append({"device": "press-7", "tag": "stroke_count", "value": k, "quality": "good",
                        "seq": seq, "ts_agent": end})  # fmt: skip
        seq += 1
        publish(c, samples)
    c.close()
    out = tmp_path / "w.parquet"
    assert export("--from", str(folder), "--include-open", "--shape", "window",
                  "--out", str(out)) == 0  # fmt: skip
    df = pd.read_parquet(out)
    assert list(df.columns) == [
        "ts", "window_start", "device", "vibration.mean", "vibration.mean__quality",
        "vibration.rms", "vibration.rms__quality", "vibration.good_share",
        "vibration.good_share__quality",
    ]  # fmt: skip
    assert df["vibration.rms"].tolist() == [1.0, 2.0, 3.0]
    assert (df["ts"] - df["window_start"]).dt.total_seconds().tolist() == [1.0, 1.0, 1.0]
    out = tmp_path / "t.csv"
    assert export("--from", str(folder), "--include-open", "--tags", "stroke_count",
                  "--out", str(out)) == 0  # fmt: skip
    df = pd.read_csv(out)
    assert list(df.columns) == ["ts", "device", "stroke_count", "stroke_count__quality"]
    assert df["stroke_count"].tolist() == [0, 1, 2]


def test_no_cycle_records_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "c"
    empty = Collector(folder)
    empty.open()
    empty.close()
    code = export("--from", str(folder), "--shape", "cycle", "--out", str(tmp_path / "x.csv"))
    assert code == 1
    assert "cannot tell the cycle records apart" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()
    assert export("--from", str(tmp_path / "nope"), "--out", str(tmp_path / "y.csv")) == 2


def test_disk_full_keeps_the_previous_file_and_leaves_no_temp(
    collected: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    out = tmp_path / "shots.csv"
    out.write_text("previous export\n")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    assert export("--from", str(collected), "--shape", "cycle", "--out", str(out)) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert out.read_text() == "previous export\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["collect", "shots.csv"]


def test_parquet_without_pyarrow_says_how_to_get_it(
    collected: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    real_import = builtins.__import__

    def no_pyarrow(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    out = tmp_path / "shots.parquet"
    assert export("--from", str(collected), "--shape", "cycle", "--out", str(out)) == 1
    assert "pip install 'edge-agent[parquet]'" in capsys.readouterr().err
    assert not out.exists()


def test_files_that_hold_the_same_samples_twice_give_each_shot_once(tmp_path: Path) -> None:
    """Two folders of one shared group, or a file copied twice: export deduplicates by
    (agent, epoch, seq) across every file it reads."""
    lines = b"".join(
        orjson.dumps({**s, "agent": "gw", "epoch": "e1"}) + b"\n"
        for shot, seq in ((1, 1), (2, 5), (3, 9))
        for s in shot_record(seq, shot)
    )
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "samples-20261201T10Z.jsonl").write_bytes(lines)
    (tmp_path / "a" / "samples-20261201T11Z.jsonl").write_bytes(lines)
    out = tmp_path / "s.csv"
    assert export("--from", str(tmp_path / "a"), "--from", str(tmp_path / "b"),
                  "--shape", "cycle", "--out", str(out)) == 0  # fmt: skip
    assert pd.read_csv(out)["cycle"].tolist() == [1, 2, 3]
    meta = orjson.loads((tmp_path / "s.csv.meta.json").read_bytes())
    assert meta["duplicates_dropped"] == 24
    assert meta["samples"] == 12


def test_lines_that_are_not_samples_are_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    good = [orjson.dumps({**s, "agent": "gw", "epoch": "e1"}) for s in shot_record(1, 1)]
    junk = [b"[1, 2]", b"{not json", b'{"agent": "gw", "epoch": "e1", "seq": "7"}',
            orjson.dumps({**shot_record(9, 2)[0], "agent": "gw", "epoch": "e1", "seq": 2.5}),
            orjson.dumps({"agent": "gw", "epoch": "e1", "device": "imm-1", "seq": 20})]  # fmt: skip
    (folder / "samples-20261201T10Z.jsonl").write_bytes(b"\n".join([*junk, *good]) + b"\n")
    out = tmp_path / "s.csv"
    assert export("--from", str(folder), "--shape", "cycle", "--out", str(out)) == 0
    assert pd.read_csv(out)["cycle"].tolist() == [1]
