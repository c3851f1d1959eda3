"""The derive config (report, cycles, windows): what validate refuses, with file:line."""

from __future__ import annotations

import pytest

from agent.config import ConfigError, parse_config

HEAD = """\
agent:
  id: gw-1
mqtt:
  port: 1883
devices:
  - name: imm
    protocol: modbus
    host: 127.0.0.1
    poll_groups:
      slow: { interval_s: 5 }
    tags:
      - { name: shots, address: 0, type: uint32 }
      - { name: running, table: coil, address: 0, type: bool }
      - { name: pressure, address: 2, type: float32 }
      - { name: recipe, address: 10, type: string, length: 4 }
      - { name: temp, address: 4, type: float32, group: slow }
"""


def problems(extra: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(HEAD + extra, "c.yaml")
    return info.value.problems


def test_a_good_derive_config_parses() -> None:
    config = parse_config(
        HEAD
        + """\
    report: { deadband_pct: 1, max_interval_s: 60 }
    cycles:
      - { name: shot, trigger: { tag: shots, on: change }, tags: [pressure, running] }
      - { name: start, trigger: { tag: running, edge: rising }, tags: [pressure] }
      - { name: high, trigger: { tag: pressure, above: 10, hysteresis: 1 }, tags: [shots] }
    windows:
      - { tags: [pressure, temp], length_s: 1, features: [mean, kurtosis] }
""",
        "c.yaml",
    )
    dev = config.devices[0]
    assert [c.name for c in dev.cycles] == ["shot", "start", "high"]
    assert dev.cycles[0].trigger.kind == "change"
    assert dev.windows[0].features == ["mean", "kurtosis"]
    assert dev.report is not None
    assert dev.report.deadband_pct == 1


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            "    cycles:\n      - { name: s, trigger: { tag: nope, on: change }, tags: [shots] }\n",
            "c.yaml:18 devices[0].cycles[0].trigger.tag: unknown tag 'nope' (tags of this "
            "device: pressure, recipe, running, shots, temp)",
        ),
        (
            "    cycles:\n      - { name: s, trigger: { tag: shots, edge: rising },"
            " tags: [pressure] }\n",
            "c.yaml:18 devices[0].cycles[0].trigger.edge: an edge needs a bool tag; 'shots' is "
            "number (use on: change for a counter, above/below for a level)",
        ),
        (
            "    cycles:\n      - { name: s, trigger: { tag: recipe, above: 3 }, tags: [pressure] }"
            "\n",
            "c.yaml:18 devices[0].cycles[0].trigger.above: a threshold needs a numeric tag; "
            "'recipe' is text",
        ),
        (
            "    cycles:\n      - { name: s, trigger: { tag: shots, on: change }, tags: [temp] }\n",
            "c.yaml:18 devices[0].cycles[0].tags[0]: 'temp' is read in poll group 'slow', the "
            "trigger 'shots' in 'default': a snapshot takes its values from the trigger's "
            "poll; move the tag into that group, or use read: at_trigger",
        ),
        (
            "    cycles:\n      - { name: s, trigger: { tag: shots, on: change, edge: rising },"
            " tags: [temp] }\n",
            "c.yaml:18 devices[0].cycles[0].trigger: give exactly one of edge (rising|falling), "
            "on (change), above or below; got edge, on",
        ),
        (
            "    cycles:\n      - { name: 'a/b', trigger: { tag: shots, on: change },"
            " tags: [pressure] }\n",
            "c.yaml:18 devices[0].cycles[0].name: String should match pattern '^[A-Za-z0-9_\\-]+$'",
        ),
        (
            "    windows:\n      - { tags: [running], length_s: 1 }\n",
            "c.yaml:18 devices[0].windows[0].tags[0]: window features need a numeric tag; "
            "'running' is bool",
        ),
        (
            "    windows:\n      - { tags: [pressure], length_s: 1, length_samples: 10 }\n",
            "c.yaml:18 devices[0].windows[0]: give exactly one of length_s or length_samples",
        ),
        (
            "    windows:\n      - { tags: [pressure], length_s: 1 }\n"
            "      - { tags: [pressure], length_samples: 10 }\n",
            "c.yaml:19 devices[0].windows[1].tags[0]: derived tag 'pressure.count' is also made "
            "by windows[0].tags[0]",
        ),
        (
            "    windows:\n      - { tags: [pressure], length_s: 1, features: [mean, median] }\n",
            "c.yaml:18 devices[0].windows[0].features[1]: Input should be 'count', 'mean', 'min', "
            "'max', 'std', 'rms', 'peak_to_peak', 'crest_factor', 'skewness' or 'kurtosis'",
        ),
        (
            "    report: { deadband_pct: 150 }\n",
            "c.yaml:17 devices[0].report.deadband_pct: Input should be less than or equal to 100",
        ),
        (
            "    report: { max_interval_s: 0 }\n",
            "c.yaml:17 devices[0].report.max_interval_s: Input should be greater than 0",
        ),
    ],
)
def test_refusals(extra: str, expected: str) -> None:
    out = problems(extra)
    assert expected in out, out


def test_at_trigger_may_capture_tags_of_other_groups() -> None:
    config = parse_config(
        HEAD + "    cycles:\n      - { name: s, trigger: { tag: shots, on: change }, tags: [temp],"
        " read: at_trigger }\n",
        "c.yaml",
    )
    assert config.devices[0].cycles[0].read == "at_trigger"


def test_a_derived_name_that_clashes_with_a_tag() -> None:
    text = HEAD.replace("name: temp,", "name: shot.pressure,") + (
        "    cycles:\n      - { name: shot, trigger: { tag: shots, on: change },"
        " tags: [pressure] }\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.yaml")
    assert (
        "c.yaml:18 devices[0].cycles[0].tags[0]: derived tag 'shot.pressure' has the name of "
        "a tag of this device"
    ) in info.value.problems


def test_a_tag_report_overrides_the_device_and_every_poll_turns_it_off() -> None:
    from agent.derive.report import effective_reports

    text = (
        HEAD.replace(
            "{ name: pressure, address: 2, type: float32 }",
            "{ name: pressure, address: 2, type: float32, report: { deadband_abs: 3 } }",
        )
        .replace(
            "{ name: running, table: coil, address: 0, type: bool }",
            "{ name: running, table: coil, address: 0, type: bool, report: { mode: every_poll } }",
        )
        .replace(
            "      slow: { interval_s: 5 }",
            "      slow: { interval_s: 5, report: { deadband_abs: 9 } }",
        )
        + "    report: { max_interval_s: 10 }\n"
    )
    dev = parse_config(text, "c.yaml").devices[0]
    eff = effective_reports(dev, list(getattr(dev, "tags", [])))
    assert eff["pressure"].deadband_abs == 3
    assert eff["running"].mode == "every_poll"
    assert eff["temp"].deadband_abs == 9
    assert eff["shots"].max_interval_s == 10
    assert eff["shots"].deadband_abs is None


def test_a_deadband_on_a_bool_tag_is_refused_but_a_device_deadband_spares_bools() -> None:
    text = HEAD.replace(
        "{ name: running, table: coil, address: 0, type: bool }",
        "{ name: running, table: coil, address: 0, type: bool, report: { deadband_abs: 1 } }",
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.yaml")
    assert info.value.problems == [
        "c.yaml:13 devices[0].tags[1].report: a deadband needs a numeric tag; 'running' is bool"
    ]
    parse_config(HEAD + "    report: { deadband_abs: 0.5 }\n", "c.yaml")


def test_opcua_subscribed_groups_and_arrays() -> None:
    text = """\
agent: {id: gw}
mqtt: {port: 1883}
devices:
  - name: oven
    protocol: opcua
    endpoint: opc.tcp://127.0.0.1:4840
    poll_groups:
      fast: { interval_s: 0.5, mode: subscribe }
    tags:
      - { name: door, node_id: "ns=2;s=Door", type: Boolean, group: fast }
      - { name: zones, node_id: "ns=2;s=Zones", type: Float, array_length: 4 }
      - { name: temp, node_id: "ns=2;s=T", type: Double, group: fast }
      - { name: parts, node_id: "ns=2;i=1001", type: UInt32 }
    cycles:
      - { name: opened, trigger: { tag: door, edge: rising }, tags: [zones] }
      - { name: part, trigger: { tag: parts, on: change }, tags: [temp], read: at_trigger }
    windows:
      - { tags: [zones, temp], length_s: 10 }
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "o.yaml")
    out = info.value.problems
    assert (
        "o.yaml:15 devices[0].cycles[0].trigger.tag: 'door' is in subscribed group 'fast': a "
        "notification holds only the values that changed, not a whole poll; put the trigger "
        "and its tags in a polled group"
    ) in out
    assert (
        "o.yaml:16 devices[0].cycles[1].tags[0]: 'temp' is in subscribed group 'fast', which "
        "cannot be read on demand (read: at_trigger); put it in a polled group"
    ) in out
    assert (
        "o.yaml:18 devices[0].windows[0].tags[0]: window features need a numeric tag; 'zones' "
        "is array"
    ) in out
    assert len(out) == 4, out  # and zones is in another group than the door trigger
