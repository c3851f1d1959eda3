"""Cross-checks with SLMP code nobody here wrote, so the simulator and the driver speak
the real protocol and not only our reading of it:

- pymcprotocol (a synchronous MC protocol client) builds the same request bytes as our
  codec and reads exact values from our simulator (Q series, hexadecimal X);
- aslmp's async client reads exact values from our simulator as an FX5U (octal X);
- our driver reads exact values from aslmp's own testing server, which imitates an
  FX5U-32MT/DS, over TCP and UDP, 3E and 4E, and maps its out-of-range end code to the
  refused tag only.

Skipped, with the reason, when the packages are missing (they are in the `dev` extra).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from drivers.base import RawReading
from drivers.melsec.codec import Route, batch_read_body, request_frame
from drivers.melsec.config import MelsecDevice
from drivers.melsec.driver import MelsecDriver
from drivers.melsec.simulator import MelsecSimulator

pytestmark = pytest.mark.integration


def const(value: object) -> dict[str, object]:
    return {"generator": "constant", "value": value}


def make(series: str, tags: list[dict[str, Any]], **keys: Any) -> MelsecDevice:
    return MelsecDevice.model_validate(
        {
            "name": "plc",
            "protocol": "melsec",
            "series": series,
            "host": "127.0.0.1",
            "port": 0,
            "tags": tags,
            **keys,
        }
    )


TAGS: list[dict[str, Any]] = [
    {"name": "d100", "address": "D100", "simulate": const(-1234)},
    {"name": "d101", "address": "D101", "type": "uint16", "simulate": const(40000)},
    {"name": "d102", "address": "D102", "type": "int32", "simulate": const(-70000)},
    {"name": "f104", "address": "D104", "type": "float32", "simulate": const(2.5)},
    {"name": "w1a0", "address": "W1A0", "simulate": const(321)},
    {"name": "m3", "address": "M3", "simulate": const(True)},
    {"name": "m4", "address": "M4", "simulate": const(False)},
    {"name": "x_16th", "address": "X17", "simulate": const(True)},  # hex on Q, octal on iQ-F
]


# ---------------------------------------------------------------- pymcprotocol


def test_pymcprotocol_builds_the_bytes_our_codec_builds() -> None:
    pymc = pytest.importorskip("pymcprotocol", reason="pymcprotocol not installed (dev extra)")
    client = pymc.Type3E(plctype="Q")
    ours = request_frame("3e", Route(), 4, 0x0401, 0x0000, batch_read_body(100, 0xA8, 8))
    data = client._make_commanddata(0x0401, 0x0000) + client._make_devicedata("D100")
    theirs = client._make_senddata(data + client._encode_value(8))
    assert theirs == ours
    ours = request_frame("3e", Route(), 4, 0x0401, 0x0001, batch_read_body(0x1F, 0x9C, 3))
    data = client._make_commanddata(0x0401, 0x0001) + client._make_devicedata("X1F")
    assert client._make_senddata(data + client._encode_value(3)) == ours


async def test_pymcprotocol_reads_our_simulator() -> None:
    pymc = pytest.importorskip("pymcprotocol", reason="pymcprotocol not installed (dev extra)")
    device = make("q", TAGS)
    async with MelsecSimulator([device]) as sim:
        host, port = sim.endpoints["plc"]

        def read() -> dict[str, Any]:
            client = pymc.Type3E(plctype="Q")
            client.connect(host, port)
            try:
                words = client.batchread_wordunits("D100", 2)
                bits = client.batchread_bitunits("M3", 2)
                x = client.batchread_bitunits("X17", 1)
                w = client.batchread_wordunits("W1A0", 1)
                rw, rd = client.randomread(["D100", "W1A0"], ["D102", "D104"])
            finally:
                client.close()
            return {"words": words, "bits": bits, "x": x, "w": w, "rw": rw, "rd": rd}

        got = await asyncio.to_thread(read)
    # pymcprotocol returns words and double words as signed integers.
    assert got["words"] == [-1234, 40000 - 65536]
    assert got["bits"] == [1, 0]
    assert got["x"] == [1]
    assert got["w"] == [321]
    assert got["rw"] == [-1234, 321]
    assert got["rd"][0] == -70000
    assert got["rd"][1] == 0x40200000  # 2.5 as float32 bits, low word first


# ---------------------------------------------------------------- aslmp


async def test_aslmp_client_reads_our_simulator_as_an_fx5u() -> None:
    aslmp = pytest.importorskip("aslmp", reason="aslmp not installed (dev extra)")
    from aslmp.client import Handshake
    from aslmp.commands.random import dword, word

    device = make("iq-f", TAGS)
    async with MelsecSimulator([device]) as sim:
        host, port = sim.endpoints["plc"]
        # Handshake off: our simulator answers reads only (no self test, no type name).
        async with aslmp.Plc(
            host, port, profile="melsec:iq-f/fx5u", handshake=Handshake.NONE
        ) as plc:
            assert await plc.read_i16("D100") == -1234
            assert await plc.read_u16("D101") == 40000
            assert await plc.read_i32("D102") == -70000
            assert await plc.read_f32("D104") == 2.5
            assert await plc.read_u16("W1A0") == 321
            assert await plc.read_bits("M3", 2) == (True, False)
            x = await plc.read_bits("X0", 16)
            assert x.index(True) == 15  # aslmp's X17 on an FX5U is the 16th input too
            assert await plc.read_bit("X17") is True
            reading = await plc.read_random(
                [word("D100", kind="i16"), dword("D104", kind="f32"), dword("D102", kind="i32")]
            )
            assert list(reading.values) == [-1234, 2.5, -70000]


async def test_our_driver_reads_aslmps_fx5u_server() -> None:
    pytest.importorskip("aslmp", reason="aslmp not installed (dev extra)")
    from aslmp.testing import FX5U_32MT_DS, PlcSimulator

    tags = [{k: v for k, v in t.items() if k != "simulate"} for t in TAGS]
    tags.append({"name": "d7999", "address": "D7999"})
    tags.append({"name": "past_end", "address": "D8000"})  # an FX5U has D0-D7999
    for transport, frame in (("tcp", "3e"), ("tcp", "4e"), ("udp", "3e"), ("udp", "4e")):
        for random_read in (True, False):
            async with PlcSimulator(target=FX5U_32MT_DS) as server:
                mem = server.memory
                mem.set_u16("D", 100, (-1234) & 0xFFFF)
                mem.set_u16("D", 101, 40000)
                mem.set_u32("D", 102, (-70000) & 0xFFFFFFFF)
                mem.set_f32("D", 104, 2.5)
                mem.set_u16("W", 0x1A0, 321)
                mem.write_bits("M", 3, [True, False])
                mem.write_bits("X", 15, [True])
                mem.set_u16("D", 7999, 77)
                host, port = server.address(transport + ("-4e" if frame == "4e" else ""))
                device = make(
                    "iq-f",
                    tags,
                    host=host,
                    port=port,
                    frame=frame,
                    random_read=random_read,
                    transport=transport,
                )
                driver = MelsecDriver(device)
                await driver.connect()
                try:
                    readings = await driver.read("default")
                finally:
                    await driver.close()
            good = {r.tag: r.value for r in readings if r.quality == "good"}
            assert good == {
                "d100": -1234,
                "d101": 40000,
                "d102": -70000,
                "f104": 2.5,
                "w1a0": 321,
                "m3": True,
                "m4": False,
                "x_16th": True,
                "d7999": 77,
            }, (transport, frame, random_read)
            (bad,) = [r for r in readings if r.quality != "good"]
            assert bad == RawReading(
                "past_end",
                None,
                "bad",
                "end code 0xC056 (the read runs past the device's largest address)",
                0xC056,
            )
