"""The durable audit log: every command request, and every write's result, one JSON line.

- **Durable before the write.** A write is attempted only after its ``accepted`` record
  is on disk (written and fsync'ed); when the audit log cannot be appended to (disk
  full, read-only, an I/O error), the request is refused with ``audit_unavailable``:
  there is never an unaudited write.
- **One writer.** The process that writes to the device holds an exclusive lock on
  ``PATH.lock`` (the running agent, or `edge-agent write` while the agent is not
  running); a second one is told the log is taken (`AuditLocked`).
- **Rotated.** A line that would take the file past `max_bytes` first moves the file to
  ``PATH.1`` (``PATH.1`` to ``PATH.2``, ...; `keep` files are kept).
- The records are listed in docs/commands.md ("Audit records"). Values that JSON cannot
  carry (NaN, infinities) are written as text.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from agent.command.config import AuditConfig

log = structlog.get_logger()

AuditRecord = dict[str, Any]


class AuditUnavailable(Exception):
    """The record could not be made durable."""


class AuditLocked(Exception):
    """Another process holds the audit log (the agent is running)."""


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    return value


def encode_record(record: Mapping[str, Any]) -> bytes:
    return (
        json.dumps(_clean(dict(record)), ensure_ascii=False, separators=(",", ":"), default=repr)
        + "\n"
    ).encode("utf-8")


class AuditLog:
    """Append-only JSON-lines file (see the module docstring). `open()` before use."""

    def __init__(
        self, config: AuditConfig, *, on_record: Callable[[AuditRecord], None] | None = None
    ) -> None:
        self.config = config
        self.path = Path(config.path)
        self.on_record = on_record
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._size = 0
        self._torn = False
        self._mutex = threading.Lock()
        self.appended = 0
        self.failures = 0

    def open(self) -> None:
        """Create the folder and file, take the lock. Raises AuditLocked or
        AuditUnavailable."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise AuditUnavailable(f"cannot open {self.path}: {exc.strerror or exc}") from None
        try:
            import fcntl

            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except OSError:
            os.close(lock_fd)
            raise AuditLocked(
                f"{self.path} is held by another process (is the agent running?)"
            ) from None
        self._lock_fd = lock_fd
        try:
            self._open_file()
        except OSError as exc:
            self.close()
            raise AuditUnavailable(f"cannot open {self.path}: {exc.strerror or exc}") from None

    def _open_file(self) -> None:
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        self._size = os.fstat(self._fd).st_size
        # A line torn by a crash or a failed write: the next record starts a line of its own.
        self._torn = self._size > 0 and os.pread(self._fd, 1, self._size - 1) != b"\n"

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._lock_fd = None

    def append(self, record: AuditRecord) -> None:
        """Write one record and fsync it. Raises AuditUnavailable."""
        line = encode_record(record)
        with self._mutex:
            try:
                if self._fd is None:
                    self._open_file()  # a file that failed before may work again
                assert self._fd is not None
                if self._size and self._size + len(line) > self.config.max_bytes:
                    self._rotate()
                    assert self._fd is not None
                if self._torn:
                    line = b"\n" + line
                written = os.write(self._fd, line)
                if written != len(line):
                    raise OSError(28, f"short write ({written} of {len(line)} bytes)")
                os.fsync(self._fd)
                self._size += written
                self._torn = False
            except OSError as exc:
                self.failures += 1
                if self._fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(self._fd)
                    self._fd = None
                log.error("command.audit.failed", path=str(self.path), error=str(exc))
                raise AuditUnavailable(
                    f"cannot append to {self.path}: {exc.strerror or exc}"
                ) from None
            self.appended += 1
        if self.on_record is not None:
            try:
                self.on_record(dict(record))
            except Exception:
                log.exception("command.audit.listener_failed")

    def _rotate(self) -> None:
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        keep = self.config.keep
        base = str(self.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{base}.{keep}")
        for n in range(keep - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{base}.{n}", f"{base}.{n + 1}")
        os.replace(base, f"{base}.1")
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._open_file()
        log.info("command.audit.rotated", path=base)

    def recent(self, limit: int) -> list[AuditRecord]:
        """The newest records (at most `limit`) of the file and its first rotation, oldest
        first; lines that do not parse (a torn last line after a crash) are skipped."""
        out: list[AuditRecord] = []
        for p in (Path(f"{self.path}.1"), self.path):
            try:
                text = p.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                with contextlib.suppress(ValueError):
                    item = json.loads(line)
                    if isinstance(item, dict):
                        out.append(item)
        return out[-limit:]
