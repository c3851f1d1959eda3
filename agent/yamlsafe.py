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

Large files (a 10,000-tag config is ~1.3 MB) are composed with libyaml when PyYAML has it
(`yaml.__with_libyaml__`): about five times faster, and the node graph is dropped as soon
as the values are built. The pure-Python composer stays the reference: a text that may
hold an anchor or alias (any `&` or `*`), or that libyaml refuses, is composed again in
Python, so every error reads exactly as it always did.
"""

from __future__ import annotations

import contextlib
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

#: A sanity bound only (aliases are refused, so a file cannot expand beyond its size).
MAX_NODES = 2_000_000

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


def _resolve(loader: Any, kind: type[Node], value: Any, implicit: Any) -> str:
    if kind is ScalarNode and implicit is not None and implicit[0]:
        return _PLAIN
    if kind is ScalarNode and implicit is not None and implicit[1]:
        return _STR
    return str(yaml.resolver.Resolver.resolve(loader, kind, value, implicit))  # type: ignore[no-untyped-call]


class _Loader(yaml.SafeLoader):
    """Composes nodes only; marks plain scalars so we resolve them ourselves."""

    def resolve(self, kind: type[Node], value: Any, implicit: Any) -> str:
        return _resolve(self, kind, value, implicit)

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            line = event.start_mark.line + 1 if event.start_mark else 0
            raise YamlProblem([Problem(line, "anchors and aliases (&name, *name) are not allowed")])
        return super().compose_node(parent, index)


_CLoader: type[Any] | None = None
if getattr(yaml, "__with_libyaml__", False):

    class _CLoaderImpl(yaml.CSafeLoader):
        """libyaml's composer with our scalar resolution. It composes anchors and aliases
        in C, out of our reach: only texts without `&` and `*` are given to it."""

        def resolve(self, kind: type[Node], value: Any, implicit: Any) -> str:
            return _resolve(self, kind, value, implicit)

    _CLoader = _CLoaderImpl


class _Fallback(Exception):
    """The libyaml path met something only the reference path reports exactly."""


def _build_with_libyaml(
    text: str, env: Mapping[str, str], lines: bool
) -> tuple[Any, dict[Path, int], list[Problem]]:
    """Build the values straight from libyaml's events, without a node graph (whose
    nodes and marks cost ~25 MB for a 10,000-tag file). Same values, lines and problems
    as composing then building; raises _Fallback for anything else (no document, more
    than one, an anchor, a syntax error) so the reference path reports it."""
    assert _CLoader is not None
    loader = _CLoader(text)
    try:
        loader.get_event()  # StreamStart
        if loader.check_event(yaml.StreamEndEvent):
            raise _Fallback
        loader.get_event()  # DocumentStart
        builder = _EventBuilder(env, lines, loader)
        data = builder.build_next(())
        loader.get_event()  # DocumentEnd
        if not loader.check_event(yaml.StreamEndEvent):
            raise _Fallback
        return data, builder.lines, builder.problems
    except yaml.YAMLError:
        raise _Fallback from None
    finally:
        loader.dispose()


def load_yaml(
    text: str, environ: Mapping[str, str] | None = None, *, lines: bool = True
) -> tuple[Any, dict[Path, int], list[Problem]]:
    """Parse `text`; return (data, lines by path, problems).

    lines=False leaves the lines empty (saves their memory for a file that turns out
    valid; the caller reads the file again with lines when it needs to point at one).
    The problems' own lines are exact either way, except "first at line N" of a
    duplicate key, which needs the lines.

    Raises YamlProblem when the text cannot be read as a whole (syntax, aliases). Other
    problems (duplicate keys, unset variables, tags) come back in the list, and the data
    is built as well as it can be so that validation can report further problems.
    """
    env = os.environ if environ is None else environ
    if _CLoader is not None and "&" not in text and "*" not in text:
        with contextlib.suppress(_Fallback):
            return _build_with_libyaml(text, env, lines)
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
    builder = _Builder(env, lines)
    data = builder.build(root, ())
    return data, builder.lines, builder.problems


class _Builder:
    def __init__(self, env: Mapping[str, str], track_lines: bool = True) -> None:
        self.env = env
        self.problems: list[Problem] = []
        self.lines: dict[Path, int] = {}
        self._track = track_lines
        self.count = 0

    def build(self, node: Node, path: Path) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise YamlProblem([Problem(node.start_mark.line + 1, f"more than {MAX_NODES} nodes")])
        line = node.start_mark.line + 1
        if self._track:
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
                if self._track:
                    self.lines[(*path, key)] = key_line
                out[key] = self.build(value_node, (*path, key))
            self.lines.pop((*path, "<key>"), None)
            return out
        if isinstance(node, SequenceNode):
            items = []
            for i, item in enumerate(node.value):
                if self._track:
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


class _EventBuilder(_Builder):
    """`_Builder` over libyaml's event stream instead of composed nodes."""

    def __init__(self, env: Mapping[str, str], track_lines: bool, loader: Any) -> None:
        super().__init__(env, track_lines)
        self._loader = loader

    def build_next(self, path: Path) -> Any:
        loader = self._loader
        event = loader.get_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise _Fallback
        self.count += 1
        line = event.start_mark.line + 1
        if self.count > MAX_NODES:
            raise YamlProblem([Problem(line, f"more than {MAX_NODES} nodes")])
        if self._track:
            self.lines.setdefault(path, line)
        if isinstance(event, yaml.ScalarEvent):
            tag = event.tag
            if tag is None or tag == "!":
                tag = _resolve(loader, ScalarNode, event.value, event.implicit)
        elif isinstance(event, yaml.MappingStartEvent):
            tag = event.tag
            if tag is None or tag == "!":
                tag = _resolve(loader, MappingNode, None, event.implicit)
        elif isinstance(event, yaml.SequenceStartEvent):
            tag = event.tag
            if tag is None or tag == "!":
                tag = _resolve(loader, SequenceNode, None, event.implicit)
        else:
            raise _Fallback
        kind = _KNOWN_TAGS.get(tag)
        if tag != _PLAIN and kind is None:
            self.problems.append(Problem(line, f"tag {tag!r} is not allowed", path))
            if not isinstance(event, yaml.ScalarEvent):
                self._skip_rest(1)
            return None
        if isinstance(event, yaml.MappingStartEvent):
            out: dict[str, Any] = {}
            while not loader.check_event(yaml.MappingEndEvent):
                key_line = loader.peek_event().start_mark.line + 1
                key = self.build_next((*path, "<key>"))
                if not isinstance(key, str):
                    self.problems.append(Problem(key_line, f"key {key!r} must be a string", path))
                    self._skip_node()
                    continue
                if key in out:
                    first = self.lines.get((*path, key), key_line)
                    self.problems.append(
                        Problem(key_line, f"duplicate key {key!r} (first at line {first})", path)
                    )
                    self._skip_node()
                    continue
                if self._track:
                    self.lines[(*path, key)] = key_line
                out[key] = self.build_next((*path, key))
            loader.get_event()
            self.lines.pop((*path, "<key>"), None)
            return out
        if isinstance(event, yaml.SequenceStartEvent):
            items = []
            i = 0
            while not loader.check_event(yaml.SequenceEndEvent):
                if self._track:
                    self.lines[(*path, i)] = loader.peek_event().start_mark.line + 1
                items.append(self.build_next((*path, i)))
                i += 1
            loader.get_event()
            return items
        text = self._interpolate(str(event.value), line, path)
        if tag == _PLAIN:
            return resolve_plain(text)
        return _explicit(kind or "str", text, line, path, self.problems)

    def _skip_node(self) -> None:
        """Consume the next node's events without building it (as the node builder never
        visits a value it refused)."""
        event = self._loader.get_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise _Fallback
        if isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
            self._skip_rest(1)

    def _skip_rest(self, depth: int) -> None:
        while depth:
            event = self._loader.get_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise _Fallback
            if isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
                depth += 1
            elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
                depth -= 1


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
