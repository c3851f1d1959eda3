"""Our XGT simulator read by XGT clients nobody here wrote: pyXGTClient 0.0.1 and PyXGT 1.1.

Both are blocking socket clients; they run in a thread while the simulator serves on the
event loop. pyXGTClient computes the header BCC and speaks individual and continuous reads;
PyXGT sends a BCC of 0 and CPU info 0 (which the manual's "reserved" BCC allows) and reads
individual variables. Their writes are not used here (PyXGT's non-bit writes carry a wrong
data size); pyXGTClient's writes are in tests/integration/test_xgt_write.py. Values must
equal the configured constants and what our own driver reads.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest

from drivers.xgt.config import XgtDevice
from drivers.xgt.driver import XgtDriver
from drivers.xgt.simulator import XgtSimulator

pytestmark = pytest.mark.integration

xgt_client = pytest.importorskip(
    "pyXGTClient.client", reason="pyXGTClient is not installed (pip install -e '.[dev]')"
)


def const(value: Any) -> dict[str, Any]:
    return {"generator": "constant", "value": value}


TAGS: list[dict[str, Any]] = [
    {"name": "w0", "address": "%MW0", "simulate": const(0x1234)},
    {"name": "w1", "address": "%MW1", "type": "int16", "simulate": const(-2)},
    {"name": "f", "address": "%MW2", "type": "float32", "simulate": const(1.5)},
    {"name": "d", "address": "%DW10", "simulate": const(4321)},
    {"name": "bit", "address": "%MX97", "simulate": const(True)},  # byte 12, bit 1
    {"name": "bit0", "address": "%MX96", "simulate": const(False)},
    {"name": "p", "address": "%PW2", "simulate": const(77)},
    {"name": "s", "address": "%MB16", "type": "string", "length": 4, "simulate": const("XGT")},
]


def make_device() -> XgtDevice:
    return XgtDevice.model_validate(
        {"name": "plc", "protocol": "xgt", "host": "127.0.0.1", "port": 0, "tags": TAGS}
    )


async def ours(sim: XgtSimulator, device: XgtDevice) -> dict[str, Any]:
    driver = XgtDriver(device, endpoint=sim.endpoints[device.name])
    await driver.connect()
    try:
        return {r.tag: r.value for r in await driver.read("default")}
    finally:
        await driver.close()


def pyxgtclient_reads(port: int) -> dict[str, Any]:
    client = xgt_client.XGTClient(host="127.0.0.1", port=port, timeout=5.0)
    assert client.open()
    try:
        words = client.readData(["%MW0", "%MW1", "%MW2", "%MW3"])
        d10, p2 = client.readData(["%DW10", "%PW2"])
        bits = client.readData(["%MX97", "%MX96"])
        # Only bytes some tag occupies are served: 0-7, 12 (bits), 16-19 (string).
        block = client.readContinuousData("%MB0", 8)
        block += client.readContinuousData("%MB12", 1)
        block += client.readContinuousData("%MB16", 4)
        try:
            client.readData(["%MW500"])  # no tag there: the simulator answers a NAK
        except ValueError as exc:
            refused = str(exc)
        else:
            refused = ""
    finally:
        client.close()
    return {"words": words, "d10": d10, "p2": p2, "bits": bits, "block": block, "nak": refused}


async def test_pyxgtclient_reads_what_the_config_says() -> None:
    device = make_device()
    async with XgtSimulator([device]) as sim:
        port = sim.endpoints["plc"][1]
        got = await asyncio.to_thread(pyxgtclient_reads, port)
        mine = await ours(sim, device)
    w0, w1, f_lo, f_hi = got["words"]
    assert w0 == 0x1234
    assert struct.unpack("<h", struct.pack("<H", w1))[0] == -2
    assert struct.unpack("<f", struct.pack("<HH", f_lo, f_hi))[0] == 1.5  # low word first
    assert (got["d10"], got["p2"]) == (4321, 77)
    assert got["bits"] == [1, 0]
    block = bytes(got["block"])
    assert block[0:2] == struct.pack("<H", 0x1234)
    assert block[4:8] == struct.pack("<f", 1.5)
    assert block[8] == 0b10  # %MX97 is bit 1 of byte 12
    assert block[9:13] == b"XGT\x00"
    assert got["nak"] == "Nak Error"
    # Our driver reads the same values from the same simulator.
    assert mine == {
        "w0": 0x1234,
        "w1": -2,
        "f": 1.5,
        "d": 4321,
        "bit": True,
        "bit0": False,
        "p": 77,
        "s": "XGT",
    }


def pyxgt_reads(port: int) -> dict[str, Any]:
    ls = pytest.importorskip("PyXGT.LS", reason="PyXGT is not installed")
    plc = ls.plc_ls("127.0.0.1", port)
    try:
        plc.conn_class.settimeout(5.0)
        words = plc.command("XGT", "read", "word", "M0,D10,P2")
        bits = plc.command("XGT", "read", "bit", "M97")
    finally:
        plc.conn_class.close()
    return {"words": words, "bits": bits}


async def test_pyxgt_reads_what_the_config_says() -> None:
    pytest.importorskip("PyXGT.LS", reason="PyXGT is not installed")
    device = make_device()
    async with XgtSimulator([device]) as sim:
        got = await asyncio.to_thread(pyxgt_reads, sim.endpoints["plc"][1])
    assert got["words"] == [0x1234, 4321, 77]
    assert got["bits"] == [1]
