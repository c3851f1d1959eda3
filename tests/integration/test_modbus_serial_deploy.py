"""The systemd unit lets the agent open serial ports (Modbus RTU links) and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

UNIT = Path(__file__).parents[2] / "deploy" / "edge-agent.service"


def settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_serial_ports_are_reachable_and_other_devices_are_not() -> None:
    unit = settings()
    assert unit["PrivateDevices"] == ["no"]  # yes would hide /dev/ttyUSB*
    assert unit["DevicePolicy"] == ["closed"]  # only pseudo devices and what is allowed
    assert unit["DeviceAllow"] == ["char-ttyUSB rw", "char-ttyACM rw", "char-ttyS rw"]
    assert unit["SupplementaryGroups"] == ["dialout"]  # Debian's owner of serial ports
