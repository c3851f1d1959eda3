"""The derive stage's durable state: each cycle's trigger state, in one small JSON file
next to the buffer (``<buffer.path>.derive.json``), written whole to a temporary file,
fsync'ed and renamed over the old one (then the directory fsync'ed), so a crash leaves
either the old or the new file, never a torn one.

The writer saves it (in a worker thread, off the event loop) right after the buffer stored
the records of the polls that changed it, and before it stores anything else. A crash
between the two can make the restarted agent record the last cycle again, with the same
cycle id (docs/derive.md). A memory buffer keeps the state in memory only (it loses its
records at a restart anyway).

A file that cannot be read (damaged, not ours) is moved aside as ``….bad`` and the
state starts empty (logged as ``derive.state.unreadable``): cycles then take their
first reading as the baseline again, so the cycle during the restart is not recorded.
A save that fails is logged once (``derive.state.save_failed``) and tried again at the
next change; the state in memory stays right.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger()

STATE_VERSION = 1


def state_path(buffer_path: str) -> Path:
    """Where the state of an agent whose buffer file is `buffer_path` lives."""
    return Path(f"{buffer_path}.derive.json")


class DeriveState:
    """device → cycle name → that cycle's state (a JSON-able dict)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.devices: dict[str, dict[str, dict[str, Any]]] = {}
        self._failing = False
        self.saves = 0
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("derive.state.unreadable", path=str(path), error=str(exc))
            return
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
                raise ValueError("not an edge-agent derive state file")
            devices = data["devices"]
            if not isinstance(devices, dict) or not all(
                isinstance(v, dict) and all(isinstance(c, dict) for c in v.values())
                for v in devices.values()
            ):
                raise ValueError("devices is not a mapping of mappings")
        except (ValueError, KeyError) as exc:
            moved = path.with_name(path.name + ".bad")
            with contextlib.suppress(OSError):
                path.replace(moved)
            log.error(
                "derive.state.unreadable",
                path=str(path),
                error=str(exc),
                moved_to=str(moved),
                note="cycle triggers start from their next reading",
            )
            return
        self.devices = devices

    def cycle(self, device: str, name: str) -> dict[str, Any] | None:
        return self.devices.get(device, {}).get(name)

    def put(self, device: str, name: str, state: dict[str, Any]) -> None:
        self.devices.setdefault(device, {})[name] = state

    def save(self) -> None:
        """Write the state durably (see the module docstring). Never raises."""
        if self.path is not None:
            self.write(self.encode())

    def encode(self) -> bytes:
        """The state as it is now (on the event loop, so it is consistent)."""
        return json.dumps({"version": STATE_VERSION, "devices": self.devices}).encode()

    def write(self, data: bytes) -> None:
        """Write `data` (from `encode`) durably; may run in a worker thread. Never raises."""
        path = self.path
        if path is None:
            return
        tmp = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            if not self._failing:
                log.error("derive.state.save_failed", path=str(path), error=str(exc))
            self._failing = True
            return
        if self._failing:
            log.info("derive.state.saved_again", path=str(path))
        self._failing = False
        self.saves += 1
