"""The collector and the exporter on a real full file system (a 1 MiB tmpfs): a clear
error, only whole lines in the collector's file, nothing lost once space is freed, and
an older export left as it was. Skipped where mounting is not permitted."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from agent.dataset.collector import Collector, CollectorError, data_files, read_samples
from tests.support.agent_proc import cli


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, check=False)


def fill(directory: Path, leave_blocks: int = 0) -> Path:
    """Fill the file system, then give `leave_blocks` 4 KiB blocks back."""
    filler = directory / "filler"
    block = b"\0" * 4096
    written = 0
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
                written += 1
        except OSError:
            pass  # ENOSPC
    with filler.open("r+b") as f:
        f.truncate(max(0, written - leave_blocks) * 4096)
    return filler


def message(first_seq: int, n: int = 20) -> bytes:
    samples = [
        {"device": "imm-1", "tag": f"tag{i}", "value": 1000.0 + first_seq + i,
         "quality": "good", "seq": first_seq + i, "ts_agent": "2026-12-01T10:00:00Z"}
        for i in range(n)
    ]  # fmt: skip
    head = {"schema": "edge-agent/batch/1", "agent": "gw", "epoch": "e1", "device": "imm-1"}
    return orjson.dumps({**head, "samples": samples})


def test_collector_on_a_full_disk(small_fs: Path) -> None:
    folder = small_fs / "collect"
    c = Collector(folder)
    c.open()
    c.offer("edge/gw/imm-1", message(1))
    c.flush()
    filler = fill(small_fs, leave_blocks=2)
    for k in range(1, 60):  # ~150 KB: more than is left
        c.offer("edge/gw/imm-1", message(1 + 20 * k))
    with pytest.raises(CollectorError, match="No space left on device"):
        c.flush()
    c.close()
    (part,) = data_files(folder, include_open=True)
    body = part.read_bytes()
    assert body.endswith(b"\n")
    assert [s["seq"] for s in read_samples(part)] == list(range(1, 21))  # cut back whole
    filler.unlink()  # the operator makes room; the broker delivers the messages again
    again = Collector(folder)
    again.open()
    for k in range(60):
        again.offer("edge/gw/imm-1", message(1 + 20 * k))
    again.close()
    seqs = [s["seq"] for f in data_files(folder, include_open=True) for s in read_samples(f)]
    assert seqs == list(range(1, 1201))


def test_export_to_a_full_disk(small_fs: Path, tmp_path: Path) -> None:
    folder = tmp_path / "collect"
    c = Collector(folder)
    c.open()
    for k in range(200):
        c.offer("edge/gw/imm-1", message(1 + 20 * k))
    c.close()
    out = small_fs / "dataset.csv"
    out.write_text("an older export\n")
    fill(small_fs)
    done = cli("export", "--from", str(folder), "--include-open", "--out", str(out))
    assert done.returncode == 1
    assert "No space left on device" in done.stderr
    assert "Traceback" not in done.stderr
    assert out.read_text() == "an older export\n"
    assert sorted(p.name for p in small_fs.iterdir()) == ["dataset.csv", "filler"]
