"""The collector's files: samples from the broker, exactly once, in hourly files.

Invariants (tested in tests/unit/test_dataset_collector.py):

- **Nothing half-written is visible.** The hour being written is the hidden file
  ``.samples-YYYYMMDDTHHZ.jsonl.part``; at the next hour (or at the next start in a later
  hour) it is fsynced and renamed to ``samples-YYYYMMDDTHHZ.jsonl``. Readers take the
  ``samples-*.jsonl`` files only (`export --include-open` also reads the open part).
- **Exactly once.** A sample is written only if its (agent, epoch, seq) is in no file
  yet. The seqs of the finished files are in ``state.json`` (written, atomically, before
  each rename); the open part is re-read at start. A torn last line (a crash in the
  middle of a write) is cut off at start; a write that fails (disk full) is cut back to
  the last whole line and the collector stops with CollectorError. ``state.json`` lost
  or damaged: it is rebuilt from the files.
- **Acknowledged only once on disk.** `offer` buffers; `flush` writes and fsyncs and
  returns; only then does the caller acknowledge the messages (MQTT manual ack), so a
  crash before the fsync makes the broker deliver them again.

One sample per line, as JSON: the dict `agent.dataset.decode.decode` returns. Files are
named by the hour (UTC) they were written in, not by the samples' time: a backlog sent
after an outage lands in the hour it arrived.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import structlog

from agent.dataset.decode import DecodeError, UnknownLayout, decode
from agent.dataset.store import SeenSeqs

log = structlog.get_logger(__name__)

STATE = "state.json"
PREFIX = "samples-"
SUFFIX = ".jsonl"


class CollectorError(RuntimeError):
    """The collector cannot go on (its folder cannot be written); nothing half-written
    was left, and nothing unwritten was acknowledged."""


def hour_name(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y%m%dT%HZ")


def final_path(folder: Path, hour: str) -> Path:
    return folder / f"{PREFIX}{hour}{SUFFIX}"


def part_path(folder: Path, hour: str) -> Path:
    return folder / f".{PREFIX}{hour}{SUFFIX}.part"


def data_files(folder: Path, *, include_open: bool = False) -> list[Path]:
    """The finished hourly files of a collector folder, oldest first (and the open part
    files after them, with `include_open`)."""
    files = sorted(folder.glob(f"{PREFIX}*{SUFFIX}"))
    if include_open:
        files += sorted(folder.glob(f".{PREFIX}*{SUFFIX}.part"))
    return files


def read_samples(path: Path) -> Iterator[dict[str, Any]]:
    """The samples of one collector file; a line that is not a sample (a torn tail of an
    open part, a line edited by hand) is skipped."""
    with path.open("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                return
            try:
                s = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if _is_sample(s):
                yield s


_TEXT_KEYS = ("agent", "epoch", "device", "tag", "quality", "ts_agent")


def _is_sample(s: Any) -> bool:
    """A line as the collector writes it (a hand-edited or foreign file may differ)."""
    return (
        isinstance(s, dict)
        and type(s.get("seq")) is int
        and all(isinstance(s.get(k), str) for k in _TEXT_KEYS)
    )


class Collector:
    """One collector folder. `open()`, then `offer()` messages, `flush()` (then ack),
    `rotate()` now and then, `close()`."""

    def __init__(
        self,
        folder: Path,
        *,
        clock: Callable[[], float] = time.time,
        fsync: Callable[[int], None] = os.fsync,
    ) -> None:
        self.folder = folder
        self._clock = clock
        self._fsync = fsync
        self.seen = SeenSeqs()
        self._pending: list[bytes] = []
        self._hour = ""
        self._file: Any = None
        self.counts: Counter[str] = Counter()
        self._logged: set[str] = set()
        self._broken = ""  # why a failed write ended this instance (reopen to go on)

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._load_state()
            now_hour = hour_name(self._clock())
            for part in sorted(self.folder.glob(f".{PREFIX}*{SUFFIX}.part")):
                _cut_torn_tail(part)
                for s in read_samples(part):
                    self.seen.add(s["agent"], s["epoch"], s["seq"])
                hour = part.name[len(PREFIX) + 1 : -len(SUFFIX) - len(".part")]
                if hour != now_hour:
                    self._finish(part, hour)
            self._open_part(now_hour)
        except OSError as exc:
            raise CollectorError(f"cannot open collector folder {self.folder}: {exc}") from None
        log.info("collect.opened", folder=str(self.folder), hour=self._hour)

    def close(self) -> None:
        """Write what is pending; the open part stays (continued at the next start)."""
        try:
            self.flush()
        finally:
            if self._file is not None:
                with contextlib.suppress(OSError):
                    self._file.close()
                self._file = None

    # ------------------------------------------------------------------ messages

    def offer(self, topic: str, payload: bytes) -> int:
        """Take one message: its new samples are pending (written by the next `flush`).
        Returns how many were new. A message that cannot be decoded is counted, logged
        the first time for its kind, and skipped."""
        self._check()
        self.counts["messages"] += 1
        try:
            samples = decode(topic, payload)
            lines = [(s["agent"], s["epoch"], s["seq"], orjson.dumps(s) + b"\n") for s in samples]
        except DecodeError as exc:
            kind = "unknown_layout" if isinstance(exc, UnknownLayout) else "malformed"
            return self._skip(kind, topic, str(exc))
        except Exception as exc:  # a decoder that breaks its contract: still one message
            return self._skip("malformed", topic, f"{type(exc).__name__}: {exc}")
        new = 0
        for agent, epoch, seq, line in lines:
            if self.seen.add(agent, epoch, seq):
                self._pending.append(line)
                new += 1
            else:
                self.counts["duplicates"] += 1
        self.counts["samples"] += new
        return new

    def _skip(self, kind: str, topic: str, reason: str) -> int:
        self.counts[kind] += 1
        if kind not in self._logged:
            self._logged.add(kind)
            log.warning("collect.message.skipped", kind=kind, topic=topic, reason=reason)
        return 0

    def flush(self) -> None:
        """Write the pending samples to the open part and fsync it. On a failure the
        part is cut back to its last whole line and CollectorError is raised: the
        collector must then be reopened (its seen set no longer matches the files)."""
        if not self._pending or self._file is None:
            return
        data = b"".join(self._pending)
        f = self._file
        start = f.tell()
        try:
            f.write(data)
            f.flush()
            self._fsync(f.fileno())
        except OSError as exc:
            with contextlib.suppress(OSError):
                f.truncate(start)
                f.seek(start)
            self._file = None
            with contextlib.suppress(OSError):
                f.close()
            self._pending.clear()
            log.error("collect.write.failed", file=str(f.name), error=str(exc))
            self._broken = (
                f"cannot write {f.name}: {exc.strerror or exc}; the samples were not "
                "acknowledged and will be delivered again after a restart"
            )
            raise CollectorError(self._broken) from None
        self._pending.clear()

    def _check(self) -> None:
        if self._broken:
            raise CollectorError(f"{self._broken} (the collector must be reopened)")

    def rotate(self) -> bool:
        """At a new hour: finish the open part, start the next. True when it rotated."""
        self._check()
        hour = hour_name(self._clock())
        if hour == self._hour:
            return False
        self.flush()
        old = part_path(self.folder, self._hour)
        try:
            if self._file is not None:
                self._file.close()
                self._file = None
            self._finish(old, self._hour)
            self._open_part(hour)
        except OSError as exc:
            raise CollectorError(f"cannot rotate {old}: {exc}") from None
        return True

    # ------------------------------------------------------------------ internals

    def _open_part(self, hour: str) -> None:
        self._hour = hour
        self._file = part_path(self.folder, hour).open("ab")

    def _finish(self, part: Path, hour: str) -> None:
        """State first (it then covers the part's seqs), then the rename: a crash in
        between leaves a part whose seqs are known twice, which is harmless."""
        with part.open("rb") as f:
            self._fsync(f.fileno())
        self._save_state()
        target = final_path(self.folder, hour)
        if target.exists():  # a second start in the same hour after a rename: keep both
            n = 1
            while target.exists():
                n += 1
                target = self.folder / f"{PREFIX}{hour}.{n}{SUFFIX}"
        part.replace(target)
        self._fsync_dir()
        log.info("collect.file.finished", file=target.name)

    def _save_state(self) -> None:
        path = self.folder / STATE
        tmp = self.folder / f".{STATE}.tmp"
        body = orjson.dumps({"version": 1, "seen": self.seen.to_json()})
        with tmp.open("wb") as f:
            f.write(body)
            f.flush()
            self._fsync(f.fileno())
        tmp.replace(path)
        self._fsync_dir()

    def _load_state(self) -> None:
        path = self.folder / STATE
        try:
            data = orjson.loads(path.read_bytes())
            if not isinstance(data, dict) or data.get("version") != 1:
                raise ValueError("unknown state version")
            self.seen = SeenSeqs.from_json(data.get("seen"))
            return
        except FileNotFoundError:
            if not data_files(self.folder):
                return
            reason = "missing"
        except (ValueError, orjson.JSONDecodeError) as exc:
            reason = f"damaged ({exc})"
        log.warning("collect.state.rebuilt", file=str(path), reason=reason)
        self.seen = SeenSeqs()
        for file in data_files(self.folder):
            for s in read_samples(file):
                self.seen.add(s["agent"], s["epoch"], s["seq"])

    def _fsync_dir(self) -> None:
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            self._fsync(fd)
        finally:
            os.close(fd)


def _cut_torn_tail(part: Path) -> None:
    """Cut a part file back to its last whole line (a crash mid-write)."""
    data = part.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with part.open("r+b") as f:
            f.truncate(end)
        log.warning("collect.part.repaired", file=part.name, cut_bytes=len(data) - end)
