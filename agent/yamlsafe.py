"""A strict YAML reader for config files.

PyYAML's `safe_load` keeps the last of two duplicate keys without a word, reads `no` as
False and `010` as 8, and expands aliases (alias bombs). This reader composes the node
graph with PyYAML (no constructors run), then builds plain Python values itself:

- duplicate keys, anchors/aliases, and tags other than !!str/!!int/!!float/!!bool/!!null
  are errors;
- plain scalars follow the YAML 1.2 core schema: true/false, null/~, decimal, 0x and 0o
  integers, floats; everything else is a string;
- `${VAR}` and `${VAR:-default}` are replaced from the environment in every scalar
  (`$${` writes a literal `${`); a plain scalar's type is decided after replacing;
- every mapping key and sequence item gets its line number, keyed by its path
  (`("devices", 0, "port")`), so validation errors can point at the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

_PLAIN = "tag:edge-agent:plain"
_STR = "tag:yaml.org,2002:str"
_KNOWN_TAGS = {
    _STR: "str",
    "tag:yaml.org,2002:int": "int",
    "tag:yaml.org,2002:float": "float",
    "tag:yaml.org,2002:bool": "bool",
    "tag:yaml.org,2002:null": "null",
    "tag:yaml.org,2002:map": "map",
    "tag:yaml.org,2002:seq": "seq",
}

_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_INT10 = re.compile(r"^[-+]?[0-9]+$")
_INT16 = re.compile(r"^0x[0-9a-fA-F]+$")
_INT8 = re.compile(r"^0o[0-7]+$")
_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$")
_INF = re.compile(r"^[-+]?\.(?:inf|Inf|INF)$")
_NAN = re.compile(r"^\.(?:nan|NaN|NAN)$")
_VAR = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

MAX_NODES = 100_000

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    line: int
    message: str
    path: Path = ()


class YamlProblem(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(f"line {p.line}: {p.message}" for p in problems))
        self.problems = problems


class _Loader(yaml.SafeLoader):
    """Composes nodes only; marks plain scalars so we resolve them ourselves."""

    def resolve(self, kind: type[Node], value: Any, implicit: Any) -> str:
        if kind is ScalarNode and implicit is not None and implicit[0]:
            return _PLAIN
        if kind is ScalarNode and implicit is not None and implicit[1]:
            return _STR
        return str(super().resolve(kind, value, implicit))  # type: ignore[no-untyped-call]

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            line = event.start_mark.line + 1 if event.start_mark else 0
            raise YamlProblem([Problem(line, "anchors and aliases (&name, *name) are not allowed")])
        return super().compose_node(parent, index)


def load_yaml(
    text: str, environ: Mapping[str, str] | None = None
) -> tuple[Any, dict[Path, int], list[Problem]]:
    """Parse `text`; return (data, lines by path, problems).

    Raises YamlProblem when the text cannot be read as a whole (syntax, aliases). Other
    problems (duplicate keys, unset variables, tags) come back in the list, and the data
    is built as well as it can be so that validation can report further problems.
    """
    env = os.environ if environ is None else environ
    try:
        root = yaml.compose(text, Loader=_Loader)
    except YamlProblem:
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        what = " ".join(x for x in (exc.context, exc.problem) if x)
        raise YamlProblem([Problem(line, f"YAML syntax: {what}")]) from None
    except yaml.YAMLError as exc:
        raise YamlProblem([Problem(1, f"YAML syntax: {exc}")]) from None
    if root is None:
        raise YamlProblem([Problem(1, "the file is empty")])
    builder = _Builder(env)
    data = builder.build(root, ())
    return data, builder.lines, builder.problems


class _Builder:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[Problem] = []
        self.lines: dict[Path, int] = {}
        self.count = 0

    def build(self, node: Node, path: Path) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise YamlProblem([Problem(node.start_mark.line + 1, f"more than {MAX_NODES} nodes")])
        line = node.start_mark.line + 1
        self.lines.setdefault(path, line)
        kind = _KNOWN_TAGS.get(node.tag)
        if node.tag != _PLAIN and kind is None:
            self.problems.append(Problem(line, f"tag {node.tag!r} is not allowed", path))
            return None
        if isinstance(node, MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = self.build(key_node, (*path, "<key>"))
                if not isinstance(key, str):
                    self.problems.append(
                        Problem(key_node.start_mark.line + 1, f"key {key!r} must be a string", path)
                    )
                    continue
                key_line = key_node.start_mark.line + 1
                if key in out:
                    first = self.lines.get((*path, key), key_line)
                    self.problems.append(
                        Problem(key_line, f"duplicate key {key!r} (first at line {first})", path)
                    )
                    continue
                self.lines[(*path, key)] = key_line
                out[key] = self.build(value_node, (*path, key))
            self.lines.pop((*path, "<key>"), None)
            return out
        if isinstance(node, SequenceNode):
            items = []
            for i, item in enumerate(node.value):
                self.lines[(*path, i)] = item.start_mark.line + 1
                items.append(self.build(item, (*path, i)))
            return items
        assert isinstance(node, ScalarNode)
        text = self._interpolate(str(node.value), line, path)
        if node.tag == _PLAIN:
            return resolve_plain(text)
        return _explicit(kind or "str", text, line, path, self.problems)

    def _interpolate(self, text: str, line: int, path: Path) -> str:
        if "$" not in text:
            return text

        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$${":
                return "${"
            name, default = m.group(1), m.group(2)
            if name in self.env:
                return self.env[name]
            if default is not None:
                return default
            self.problems.append(
                Problem(
                    line,
                    f"environment variable {name} is not set "
                    f"(write ${{{name}:-default}} to give a default)",
                    path,
                )
            )
            return ""

        return _VAR.sub(sub, text)


def resolve_plain(text: str) -> Any:
    """YAML 1.2 core schema resolution of a plain scalar."""
    if _NULL.match(text):
        return None
    if text in _BOOL:
        return _BOOL[text]
    if _INT10.match(text):
        return int(text, 10)
    if _INT16.match(text):
        return int(text, 16)
    if _INT8.match(text):
        return int(text[2:], 8)
    if _FLOAT.match(text):
        return float(text)
    if _INF.match(text):
        return float("-inf") if text.startswith("-") else float("inf")
    if _NAN.match(text):
        return float("nan")
    return text


def _explicit(kind: str, text: str, line: int, path: Path, problems: list[Problem]) -> Any:
    if kind == "str":
        return text
    value = resolve_plain(text)
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "null": value is None,
    }.get(kind, False)
    if not ok:
        problems.append(Problem(line, f"{text!r} is not a valid !!{kind}", path))
        return None
    return float(value) if kind == "float" else value
