"""Device profiles: a device type defined once in its own YAML file, used by many devices.

A profile file holds device keys — protocol, tags, poll groups, intervals, byte order,
timeouts — and no `name`. A device uses one with `profile:`, either a name from the
config's `profiles:` map (name → file) or a file path; paths are relative to the config
file's folder. The device's own keys override the profile's, key by key at the top level
of the device (a device that gives `tags` replaces the profile's whole list):

    profiles:
      tc: profiles/temperature-controller.yaml
    devices:
      - {name: tc-01, profile: tc, host: 10.0.4.21, unit_id: 1}
      - {name: tc-02, profile: tc, host: 10.0.4.21, unit_id: 2, interval_s: 5}

Profile files are read with the config's own strict loader (`agent.yamlsafe`), and every
node taken from a profile keeps its file and line, so a problem in a profile is reported
at the profile's file:line (once, naming the devices that use it) and a problem in the
device's own keys at the config file's line.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.yamlsafe import Path as NodePath
from agent.yamlsafe import YamlProblem, load_yaml

#: Keys a profile cannot set: each device names itself, and profiles do not nest.
FORBIDDEN = {"name": "each device gives its own name", "profile": "profiles do not nest"}


@dataclass(frozen=True)
class Located:
    """A problem with the file and line it is reported at; `device` names the device
    whose profile it is in (None: not in a profile)."""

    file: str
    line: int
    path: str
    message: str
    device: str | None = None


@dataclass
class Expanded:
    """Config data with every device's profile applied."""

    data: Any
    #: Line of every node of `data` (the profile's line for nodes from a profile).
    lines: dict[NodePath, int]
    #: The profile file of every node taken from a profile; other nodes are the config's.
    files: dict[NodePath, str] = field(default_factory=dict)
    #: The problems met while reading the profiles.
    problems: list[Located] = field(default_factory=list)
    #: Indexes of the devices whose profile could not be applied: their other problems
    #: (a missing protocol, say) follow from that one and are not worth reporting.
    unresolved: set[int] = field(default_factory=set)

    def follows_from_profile(self, loc: tuple[Any, ...]) -> bool:
        return len(loc) >= 2 and loc[0] == "devices" and loc[1] in self.unresolved


@dataclass
class _Profile:
    shown: str
    data: dict[str, Any] | None
    lines: dict[NodePath, int]


def expand_profiles(
    data: Any,
    lines: dict[NodePath, int],
    shown: str,
    base_dir: Path | None,
    *,
    track_lines: bool = True,
) -> Expanded:
    """Apply the profiles of every device of `data` (the config as read from `shown`).

    Returns new data (the input is not changed); without any `profile:` the data comes
    back as it is. `track_lines=False` skips the lines (the fast path of a valid file)."""
    out = Expanded(data=data, lines=dict(lines) if track_lines else lines)
    if not isinstance(data, dict):
        return out
    devices = data.get("devices")
    named = data.get("profiles")
    uses_profiles = isinstance(devices, list) and any(
        isinstance(d, dict) and "profile" in d for d in devices
    )
    if not uses_profiles and named is None:
        return out
    base = base_dir if base_dir is not None else Path()
    cache: dict[Path, _Profile] = {}

    def read(value: str, where: NodePath) -> _Profile:
        path = Path(value) if Path(value).is_absolute() else base / value
        if path not in cache:
            cache[path] = _read_profile(path, out, shown, lines, where, track_lines)
        return cache[path]

    files: dict[str, str] = {}
    if isinstance(named, dict):
        for key, value in named.items():
            if isinstance(value, str):
                files[key] = value
                read(value, ("profiles", key))
    if not isinstance(devices, list):
        return out
    expanded: list[Any] = []
    for i, device in enumerate(devices):
        if not isinstance(device, dict) or not isinstance(device.get("profile"), str):
            expanded.append(device)
            continue
        ref: str = device["profile"]
        if ref in files:
            profile = read(files[ref], ("profiles", ref))
        elif ref.endswith((".yaml", ".yml")) or "/" in ref:
            profile = read(ref, ("devices", i, "profile"))
        else:
            defined = ", ".join(sorted(files)) or "none"
            out.problems.append(
                _at(
                    shown,
                    lines,
                    ("devices", i, "profile"),
                    f"unknown profile {ref!r}; defined in profiles: {defined} "
                    "(or give a file: profile: path/to/profile.yaml)",
                )
            )
            out.unresolved.add(i)
            expanded.append(device)
            continue
        if profile.data is None:
            out.unresolved.add(i)
            expanded.append(device)
            continue
        merged = {**profile.data, **device}
        expanded.append(merged)
        if track_lines:
            for key in profile.data.keys() - device.keys():
                for sub, line in profile.lines.items():
                    if sub[:1] == (key,):
                        node = ("devices", i, *sub)
                        out.lines[node] = line
                        out.files[node] = profile.shown
    out.data = {**data, "devices": expanded}
    return out


def _read_profile(
    path: Path,
    out: Expanded,
    shown: str,
    config_lines: dict[NodePath, int],
    where: NodePath,
    track_lines: bool,
) -> _Profile:
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        reason = exc.strerror or str(exc)
        out.problems.append(
            _at(shown, config_lines, where, f"cannot read profile {name}: {reason}")
        )
        return _Profile(name, None, {})
    try:
        data, lines, problems = load_yaml(text, lines=track_lines)
    except YamlProblem as exc:
        out.problems.extend(Located(name, p.line, "", p.message) for p in exc.problems)
        return _Profile(name, None, {})
    out.problems.extend(Located(name, p.line, _path(p.path), p.message) for p in problems)
    if not isinstance(data, dict):
        out.problems.append(
            Located(name, 1, "", "a profile must be a mapping of device keys (protocol, tags, ...)")
        )
        return _Profile(name, None, {})
    for key, why in FORBIDDEN.items():
        if key in data:
            out.problems.append(
                Located(name, lines.get((key,), 1), key, f"a profile cannot set {key} ({why})")
            )
    clean = {k: v for k, v in data.items() if k not in FORBIDDEN}
    return _Profile(name, clean, lines)


def _at(shown: str, lines: dict[NodePath, int], loc: NodePath, message: str) -> Located:
    line = 1
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            line = lines[loc[:n]]
            break
    return Located(shown, line, _path(loc), message)


def _path(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def merge_located(problems: Iterable[Located], main: str) -> list[str]:
    """The problem lines, in file order (the config first, then each profile) and line
    order; a problem in a profile is said once, with the devices it concerns."""
    grouped: dict[tuple[str, int, str, str], list[str]] = {}
    for p in problems:
        users = grouped.setdefault((p.file, p.line, p.path, p.message), [])
        if p.device is not None and p.device not in users:
            users.append(p.device)
    order = {main: 0}
    lines = []
    for (file, line, path, message), users in sorted(
        grouped.items(), key=lambda kv: (order.setdefault(kv[0][0], len(order)), kv[0][1])
    ):
        where = f"{path}: " if path else ""
        also = f" (profile of {', '.join(users)})" if users else ""
        lines.append(f"{file}:{line} {where}{message}{also}")
    return lines
