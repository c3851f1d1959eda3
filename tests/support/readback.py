"""Reading a driver back in tests of writes."""

from __future__ import annotations

from typing import Any

from drivers.base import Driver


async def values(driver: Driver, group: str = "default") -> dict[str, Any]:
    """Tag → value of one poll of `group`; every reading must be good."""
    readings = await driver.read(group)
    assert [r for r in readings if r.quality != "good"] == []
    return {r.tag: r.value for r in readings}
