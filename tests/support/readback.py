"""Reading a driver back in tests of writes."""

from __future__ import annotations

from typing import Any

from pymodbus.client import AsyncModbusTcpClient

from drivers.base import Driver


async def values(driver: Driver, group: str = "default") -> dict[str, Any]:
    """Tag → value of one poll of `group`; every reading must be good."""
    readings = await driver.read(group)
    assert [r for r in readings if r.quality != "good"] == []
    return {r.tag: r.value for r in readings}


async def registers(port: int, address: int, count: int) -> list[int]:
    """Holding registers of unit 1 at 127.0.0.1:`port`, read by pymodbus' client (a third
    party's reading of what a write left)."""
    client = AsyncModbusTcpClient("127.0.0.1", port=port)
    await client.connect()
    try:
        rr = await client.read_holding_registers(address, count=count, device_id=1)
        assert not rr.isError(), rr
        return list(rr.registers)
    finally:
        client.close()


async def coil(port: int, address: int) -> bool:
    """Coil `address` of unit 1 at 127.0.0.1:`port`, read by pymodbus' client."""
    client = AsyncModbusTcpClient("127.0.0.1", port=port)
    await client.connect()
    try:
        rr = await client.read_coils(address, count=1, device_id=1)
        assert not rr.isError(), rr
        return bool(rr.bits[0])
    finally:
        client.close()
