"""Device profiles: a device type in its own YAML file, used by many devices; errors in a
profile point at the profile's file and line."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.buffer.memory import MemoryBuffer
from agent.config import ConfigError, load_config
from agent.publish.fake import FakePublisher
from agent.runtime import Agent
from drivers.modbus.config import ModbusDevice
from tests.support.broker import free_port

ROOT = Path(__file__).parents[2]

PROFILE = """\
protocol: modbus
port: 5030
interval_s: 1
poll_groups:
  slow: {interval_s: 10}
tags:
  - {name: temperature, table: input, address: 0, type: int16, scale: 0.1, unit: degC}
  - {name: setpoint, address: 0, type: int16, group: slow}
"""


def plant(tmp_path: Path, devices: str, profile: str = PROFILE, extra: str = "") -> Path:
    (tmp_path / "profiles").mkdir(exist_ok=True)
    (tmp_path / "profiles" / "tc.yaml").write_text(profile, encoding="utf-8")
    path = tmp_path / "line.yaml"
    path.write_text(
        "agent: {id: gw}\nprofiles:\n  tc: profiles/tc.yaml\n" + extra + "devices:\n" + devices,
        encoding="utf-8",
    )
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


TWELVE = "".join(
    f"  - {{name: tc-{i:02d}, profile: tc, host: 10.0.4.21, unit_id: {i}}}\n" for i in range(1, 13)
)


def test_twelve_controllers_in_twelve_short_lines(tmp_path: Path) -> None:
    config = load_config(plant(tmp_path, TWELVE))
    assert len(config.devices) == 12
    for i, device in enumerate(config.devices, start=1):
        assert isinstance(device, ModbusDevice)
        assert (device.name, device.unit_id, device.host, device.port) == (
            f"tc-{i:02d}",
            i,
            "10.0.4.21",
            5030,
        )
        assert [t.name for t in device.tags] == ["temperature", "setpoint"]
        assert device.group_intervals() == {"default": 1, "slow": 10}
        assert device.profile == "tc"


def test_device_keys_override_profile_keys_whole(tmp_path: Path) -> None:
    devices = (
        "  - {name: a, profile: tc, host: h, interval_s: 5, port: 1502}\n"
        "  - {name: b, profile: tc, host: h, tags: [{name: only, address: 9}]}\n"
    )
    a, b = load_config(plant(tmp_path, devices)).devices
    assert isinstance(a, ModbusDevice)
    assert isinstance(b, ModbusDevice)
    assert (a.interval_s, a.port, len(a.tags)) == (5, 1502, 2)
    assert [t.name for t in b.tags] == ["only"]  # a device's list replaces the profile's


def test_profile_given_as_a_file_relative_to_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = plant(tmp_path, "  - {name: a, profile: profiles/tc.yaml, host: h}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_config(path).devices[0].name == "a"


def test_an_error_in_a_profile_is_reported_once_at_its_file_and_line(tmp_path: Path) -> None:
    profile = PROFILE.replace("type: int16, scale", "type: int61, scale")
    path = plant(tmp_path, TWELVE, profile)
    shown = tmp_path / "profiles" / "tc.yaml"
    users = ", ".join(f"tc-{i:02d}" for i in range(1, 13))
    assert problems(path) == [
        f"{shown}:7 tags[0].type: Input should be 'bool', 'bit', 'int16', 'uint16', 'int32', "
        f"'uint32', 'int64', 'uint64', 'float32', 'float64' or 'string' (profile of {users})"
    ]


def test_device_and_profile_problems_together_in_file_order(tmp_path: Path) -> None:
    profile = PROFILE.replace(
        "  - {name: setpoint, address: 0,", "  - {name: temperature, adress: 0,"
    )
    devices = "  - {name: a, profile: tc, host: h, prot: 1}\n  - {name: b, profile: tc}\n"
    path = plant(tmp_path, devices, profile)
    shown = tmp_path / "profiles" / "tc.yaml"
    out = problems(path)
    assert out[0].startswith(
        f"{path}:5 devices[0].prot: unknown key 'prot'; did you mean 'port'? (allowed: "
    )
    assert out[1] == (
        f"{path}:6 devices[1]: `host` is required (or `link` for a unit on a shared link)"
    )
    assert out[2] == f"{shown}:8 tags[1].address: required key is missing (profile of a, b)"
    assert out[3].startswith(f"{shown}:8 tags[1].adress: unknown key 'adress'; did you mean")
    assert out[3].endswith("(profile of a, b)")
    assert out[4] == (
        f"{shown}:8 tags[1].name: duplicate tag name 'temperature' (also tags[0]) (profile of a, b)"
    )
    assert len(out) == 5


def test_a_missing_key_inside_a_profile_points_into_the_profile(tmp_path: Path) -> None:
    profile = PROFILE.replace("{name: setpoint, address: 0, type: int16", "{name: sp, type: bit")
    out = problems(plant(tmp_path, "  - {name: a, profile: tc, host: h}\n", profile))
    shown = tmp_path / "profiles" / "tc.yaml"
    assert out == [f"{shown}:8 tags[1].address: required key is missing (profile of a)"]


def test_unknown_profile_name_and_unreadable_file(tmp_path: Path) -> None:
    devices = (
        "  - {name: a, profile: tk, host: h}\n"
        "  - {name: b, profile: profiles/none.yaml, host: h}\n"
        "  - {name: c, profile: tc, host: h, unit_id: 300}\n"
    )
    path = plant(tmp_path, devices)
    assert problems(path) == [
        f"{path}:5 devices[0].profile: unknown profile 'tk'; defined in profiles: tc "
        "(or give a file: profile: path/to/profile.yaml)",
        f"{path}:6 devices[1].profile: cannot read profile {tmp_path / 'profiles/none.yaml'}: "
        "No such file or directory",
        f"{path}:7 devices[2].unit_id: Input should be less than or equal to 255",
    ]


def test_a_profiles_entry_whose_file_is_missing_is_reported_at_the_entry(tmp_path: Path) -> None:
    path = plant(tmp_path, "  - {name: a, profile: tc, host: h}\n", extra="  gone: nowhere.yaml\n")
    assert problems(path) == [
        f"{path}:4 profiles.gone: cannot read profile {tmp_path / 'nowhere.yaml'}: "
        "No such file or directory"
    ]


@pytest.mark.parametrize(
    ("profile", "line", "message"),
    [
        (
            "name: x\n" + PROFILE,
            1,
            "name: a profile cannot set name (each device gives its own name)",
        ),
        (
            PROFILE + "profile: other\n",
            9,
            "profile: a profile cannot set profile (profiles do not nest)",
        ),
        ("- a\n- b\n", 1, "a profile must be a mapping of device keys (protocol, tags, ...)"),
        (PROFILE + "interval_s: 2\n", 9, "duplicate key 'interval_s' (first at line 3)"),
        ("protocol: modbus\ntags: [\n", 3, "YAML syntax: "),
        ("base: &b {x: 1}\n", 1, "anchors and aliases (&name, *name) are not allowed"),
        (PROFILE + "retries: ${UNSET_PROFILE_VAR}\n", 9, "retries: environment variable"),
    ],
    ids=["name", "nested", "not-a-mapping", "duplicate-key", "syntax", "anchor", "unset-env"],
)
def test_profile_files_are_read_strictly(
    tmp_path: Path, profile: str, line: int, message: str
) -> None:
    out = problems(plant(tmp_path, "  - {name: a, profile: tc, host: h}\n", profile))
    shown = tmp_path / "profiles" / "tc.yaml"
    assert any(p.startswith(f"{shown}:{line} {message}") for p in out), out


def test_environment_variables_in_a_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TC_PORT", "1502")
    profile = PROFILE.replace("port: 5030", "port: ${TC_PORT}")
    device = load_config(plant(tmp_path, "  - {name: a, profile: tc, host: h}\n", profile))
    assert isinstance(device.devices[0], ModbusDevice)
    assert device.devices[0].port == 1502


def test_the_example_line_uses_one_profile_for_twelve_controllers() -> None:
    config = load_config(ROOT / "configs" / "temperature-line.yaml")
    assert [d.name for d in config.devices] == [f"tc-{i:02d}" for i in range(1, 13)]
    assert {d.profile for d in config.devices} == {"tc"}
    assert config.devices[11].interval_s == 5
    assert config.devices[0].interval_s == 1
    text = (ROOT / "configs" / "temperature-line.yaml").read_text(encoding="utf-8")
    assert sum(1 for line in text.splitlines() if line.startswith("  - { name: tc-")) == 12


async def test_reload_rereads_the_profiles_and_restarts_the_devices_using_them(
    tmp_path: Path,
) -> None:
    port = free_port()  # nothing listens: the devices are down, which is fine here
    profile = PROFILE.replace("port: 5030", f"port: {port}\ntimeout_s: 0.2")
    devices = (
        "  - {name: a, profile: tc, host: 127.0.0.1, unit_id: 1}\n"
        "  - {name: b, profile: tc, host: 127.0.0.1, unit_id: 2}\n"
        f"  - {{name: c, protocol: modbus, host: 127.0.0.1, port: {port},\n"
        "      tags: [{name: t, address: 0}]}\n"
    )
    extra = f"buffer: {{kind: memory, path: {tmp_path / 'b.db'}}}\n"
    path = plant(tmp_path, devices, profile, extra)
    config = load_config(path)
    agent = Agent(
        config,
        publisher=FakePublisher(),
        buffer=MemoryBuffer(config.buffer),
        config_path=path,
        grace_s=0.2,
    )
    task = asyncio.create_task(agent.run())
    try:
        async with asyncio.timeout(20):
            while len(agent.devices) < 3:
                await asyncio.sleep(0.02)
        (tmp_path / "profiles" / "tc.yaml").write_text(
            profile.replace("interval_s: 1\n", "interval_s: 3\n"), encoding="utf-8"
        )
        result = await agent.reload()
        assert result.ok, result.problems
        assert (result.restarted, result.unchanged) == (["a", "b"], ["c"])
        assert agent.devices["a"].poller.device.interval_s == 3
    finally:
        agent.stop()
        await task
