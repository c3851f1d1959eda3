"""The agent's configuration: one YAML file, checked once, every problem reported at once.

Loading never opens a socket or touches the buffer. `load_config(path)` either returns a
valid `Config` or raises `ConfigError` whose `problems` are lines of the form
``configs/line4.yaml:17 devices[0].tags[3].type: Input should be 'bool', 'bit', ...``.

YAML is read with a loader of our own (see `agent.yamlsafe`): safe constructors only,
duplicate keys and anchors/aliases rejected, YAML 1.2 scalars (`no` stays a string,
`010` is ten), and a line number kept for every node so errors can point at it.
`${VAR}` and `${VAR:-default}` in plain scalars are replaced from the environment
before the scalar's type is decided, so `port: ${MQTT_PORT:-1883}` is an int.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import string
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_core import ErrorDetails

from agent.yamlsafe import YamlProblem, load_yaml
from drivers.base import ConfigModel, DeviceCommon
from drivers.links import LinkConfig, check_link_references
from drivers.modbus.config import ModbusDevice
from drivers.opcua.config import OpcUaDevice


def read_secret(value: SecretStr | None, file: str | None) -> str | None:
    """A secret given inline (from ${ENV}) or as a file whose first line is the secret."""
    if value is not None:
        return value.get_secret_value()
    if file is not None:
        text = Path(file).read_text(encoding="utf-8")
        return text.splitlines()[0] if text else ""
    return None


class AgentSection(ConfigModel):
    """Who this agent is; the names appear in topics and payloads."""

    id: str = Field(
        min_length=1,
        pattern=r"^[A-Za-z0-9_.\-]+$",
        description="Agent id, unique among the plant's gateways.",
    )
    site: str | None = Field(default=None, description="Site (plant) name for topics.")
    area: str | None = Field(default=None, description="Area name for topics.")
    line: str | None = Field(default=None, description="Production line name for topics.")


class BufferConfig(ConfigModel):
    """The store-and-forward buffer between the pollers and the broker."""

    kind: Literal["sqlite", "memory"] = Field(
        default="sqlite",
        description="sqlite: durable on disk (default); memory: lost on restart, for tests.",
    )
    path: str = Field(
        default="data/buffer.db",
        description="SQLite file; relative paths are relative to the working directory.",
    )
    max_bytes: int = Field(
        default=1 << 30, ge=1 << 20, description="Size limit of the buffered data in bytes."
    )
    when_full: Literal["drop_oldest", "drop_newest"] = Field(
        default="drop_oldest", description="What to drop when max_bytes is reached."
    )
    durability: Literal["process_crash", "power_loss"] = Field(
        default="process_crash",
        description="process_crash: survives a crash of the agent (SQLite synchronous=NORMAL); "
        "power_loss: also survives power loss (synchronous=FULL, slower).",
    )
    max_age_s: float | None = Field(
        default=None,
        gt=0,
        description="Drop records older than this many seconds (reported as gaps with "
        "reason max_age); default: keep until delivered or pushed out by max_bytes.",
    )
    memory_fallback_bytes: int = Field(
        default=64 << 20,
        ge=1 << 20,
        description="When the buffer's disk fails (full, read-only, I/O error), keep up to "
        "this many bytes of the newest data in memory until the disk works again.",
    )


class MqttTls(ConfigModel):
    """TLS to the broker. Present means on: the agent never falls back to plaintext."""

    ca_file: str | None = Field(
        default=None,
        description="PEM file of the CA(s) that signed the broker's certificate; "
        "default: the system's trusted CAs.",
    )
    cert_file: str | None = Field(
        default=None, description="PEM client certificate (mutual TLS); needs key_file."
    )
    key_file: str | None = Field(
        default=None,
        description="PEM private key of cert_file; must not be readable by group or others.",
    )
    key_password: SecretStr | None = Field(
        default=None, description="Passphrase of key_file; use ${ENV_VAR} rather than writing it."
    )
    key_password_file: str | None = Field(
        default=None, description="File whose first line is the key passphrase."
    )
    min_version: Literal["1.2", "1.3"] = Field(
        default="1.2", description="Lowest TLS version accepted."
    )
    alpn: list[str] = Field(
        default_factory=list,
        description="ALPN protocols to offer, e.g. ['mqtt'] (AWS IoT on port 443 wants it).",
    )

    @model_validator(mode="after")
    def _pairs(self) -> MqttTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give cert_file and key_file together (mutual TLS)")
        if self.key_password is not None and self.key_password_file is not None:
            raise ValueError("give key_password or key_password_file, not both")
        return self

    def resolved_key_password(self) -> str | None:
        return read_secret(self.key_password, self.key_password_file)


class SparkplugConfig(ConfigModel):
    """Sparkplug B edge node settings (``mqtt.layout: sparkplug``); see docs/sparkplug.md."""

    group_id: str = Field(
        min_length=1,
        pattern=r"^[^/+#]+$",
        description="Sparkplug group id: the second level of every spBv1.0/... topic.",
    )
    edge_node_id: str | None = Field(
        default=None,
        pattern=r"^[^/+#]+$",
        description="Edge node id in the topics; default agent.id.",
    )
    qos: Literal[0, 1] = Field(
        default=1,
        description="QoS of NBIRTH, DBIRTH, NDATA, DDATA and DDEATH. 1 (default, a documented "
        "deviation): data leaves the buffer only once the broker acknowledged it. 0: as the "
        "specification says; a message lost on the way is not sent again.",
    )
    backlog: Literal["send", "drop"] = Field(
        default="send",
        description="send (default): buffered data goes out with is_historical=true after an "
        "outage. drop: backlog is discarded, only live data is published (counted, logged).",
    )


class MqttConfig(ConfigModel):
    """The broker the samples are published to."""

    host: str = Field(default="127.0.0.1", description="Broker host name or address.")
    port: int = Field(default=1883, ge=1, le=65535, description="Broker TCP port.")
    protocol: Literal["5", "3.1.1"] = Field(
        default="5", description="MQTT version: '5' (default) or '3.1.1'."
    )
    client_id: str | None = Field(
        default=None, description="MQTT client id; default 'edge-agent-<agent.id>'."
    )
    username: str | None = Field(default=None, description="User name, if the broker needs one.")
    password: SecretStr | None = Field(
        default=None, description="Password; use ${ENV_VAR} rather than writing it here."
    )
    password_file: str | None = Field(
        default=None, description="File whose first line is the password (instead of password)."
    )
    keepalive_s: int = Field(default=30, ge=5, le=65535, description="MQTT keep-alive.")
    layout: Literal["device", "tag", "sparkplug"] = Field(
        default="device",
        description="device: one message per device per poll with all its samples; "
        "tag: one message per sample on topic_tag; sparkplug: Sparkplug B edge node "
        "(needs the sparkplug section).",
    )
    sparkplug: SparkplugConfig | None = Field(
        default=None, description="Sparkplug B settings; required with layout: sparkplug."
    )
    topic: str = Field(
        default="edge/{agent}/{device}",
        description="Topic of the device layout; fields {agent} {site} {area} {line} {device}.",
    )
    topic_tag: str = Field(
        default="edge/{agent}/{device}/{tag}",
        description="Topic of the tag layout; fields as topic, plus {tag}.",
    )
    max_inflight: int = Field(
        default=100, ge=1, le=1000, description="Messages sent and not yet acknowledged."
    )
    publish_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="A message not acknowledged by then counts as not delivered.",
    )
    reconnect_min_s: float = Field(default=0.5, gt=0, description="First reconnect delay.")
    reconnect_max_s: float = Field(default=30.0, gt=0, description="Largest reconnect delay.")
    tls: MqttTls | None = Field(
        default=None, description="TLS settings; when present the port defaults to 8883."
    )
    status_topic: str = Field(
        default="edge-status/{agent}",
        description="Retained agent status (online on connect, offline as the will); "
        "fields {agent} {site} {area} {line}.",
    )
    device_status_topic: str = Field(
        default="edge-status/{agent}/{device}",
        description="Retained device status (up/down, reason, since); fields as topic.",
    )
    retain_last: bool = Field(
        default=False,
        description="Tag layout: publish live (not historical) values retained, so a new "
        "subscriber gets each tag's last value at once.",
    )
    max_refusals: int = Field(
        default=5,
        ge=1,
        description="A record the broker refuses (PUBACK reason >= 0x80) this many times is "
        "moved to the dead-letter store instead of being retried forever.",
    )

    @model_validator(mode="after")
    def _one_password(self) -> MqttConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        return self

    @model_validator(mode="after")
    def _sparkplug_section(self) -> MqttConfig:
        if self.layout == "sparkplug" and self.sparkplug is None:
            raise ValueError(
                "layout sparkplug needs a sparkplug section with at least group_id, "
                "e.g. sparkplug: {group_id: plant1}"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _tls_port(cls, data: Any) -> Any:
        # 8883 is the registered MQTT-over-TLS port; an explicit port always wins.
        if isinstance(data, dict) and data.get("tls") is not None and "port" not in data:
            return {**data, "port": 8883}
        return data

    def resolved_client_id(self, agent_id: str) -> str:
        return self.client_id or f"edge-agent-{agent_id}"

    def resolved_password(self) -> str | None:
        return read_secret(self.password, self.password_file)


class LoggingConfig(ConfigModel):
    """Where and how the agent logs (always to stderr)."""

    level: Literal["debug", "info", "warning", "error"] = Field(default="info")
    format: Literal["auto", "console", "json"] = Field(
        default="auto", description="auto: console on a terminal, JSON otherwise."
    )


class HttpConfig(ConfigModel):
    """The local HTTP endpoint: /metrics (Prometheus), /healthz, /readyz, /api/status and
    the status page at /. Present only when this section is in the file."""

    host: str = Field(
        default="127.0.0.1",
        description="Address to listen on. 127.0.0.1 keeps it on this machine; 0.0.0.0 "
        "exposes it to the network (the endpoint has no authentication).",
    )
    port: int = Field(
        default=9108,
        ge=0,
        le=65535,
        description="TCP port (0: any free port, logged as http.listening; "
        "`edge-agent status` and `reload` need a fixed port).",
    )


Device = Annotated[ModbusDevice | OpcUaDevice, Field(discriminator="protocol")]
# protocol name → device model; the discriminated union above must list the same models.
DEVICE_MODELS: dict[str, type[DeviceCommon]] = {"modbus": ModbusDevice, "opcua": OpcUaDevice}

_TOPIC_FIELDS = {"agent", "site", "area", "line", "device"}


class Config(ConfigModel):
    """The whole configuration file."""

    agent: AgentSection
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    links: dict[str, LinkConfig] = Field(
        default_factory=dict,
        description="Shared serial lines, serial device servers and TCP gateways by name; "
        "devices on one give `link: NAME` and their `unit_id`.",
    )
    devices: list[Device] = Field(min_length=1)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    http: HttpConfig | None = Field(
        default=None, description="The metrics/health/status endpoint; off when absent."
    )


def _check_template(template: str, allowed: set[str], agent: dict[str, Any]) -> list[str]:
    """Problems of a topic template: unknown {fields}, or fields whose value is unset."""
    problems = []
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        return [f"{template!r}: {exc}"]
    for f in sorted(fields - allowed):
        problems.append(
            f"unknown field {{{f}}}; allowed: " + ", ".join("{" + a + "}" for a in sorted(allowed))
        )
    for f in sorted(fields & {"site", "area", "line"}):
        if agent.get(f) is None:
            problems.append(f"uses {{{f}}} but agent.{f} is not set")
    return problems


class ConfigError(Exception):
    """The configuration is invalid; `problems` lists every problem, one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def load_config(path: str | Path) -> Config:
    """Read, interpolate and validate a config file. Raises ConfigError."""
    path = Path(path)
    shown = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{shown}: cannot read: {exc.strerror or exc}"]) from None
    return parse_config(text, shown)


def parse_config(text: str, shown: str = "<config>") -> Config:
    """Validate config text; `shown` is the file name used in error messages."""
    # A valid file needs no line numbers: read it without them first (a 10,000-tag file
    # holds ~100,000 of them), and again with them only to report problems.
    try:
        data, _, yaml_problems = load_yaml(text, lines=False)
    except YamlProblem:
        pass
    else:
        if not yaml_problems and isinstance(data, dict):
            with contextlib.suppress(ValidationError):
                config = Config.model_validate(data)
                if not _cross_checks(data):
                    return config
        del data
    return _parse_reporting(text, shown)


def _parse_reporting(text: str, shown: str) -> Config:
    try:
        data, lines, yaml_problems = load_yaml(text)
    except YamlProblem as exc:
        raise ConfigError([f"{shown}:{p.line} {p.message}" for p in exc.problems]) from None
    problems = [
        f"{shown}:{p.line} {_path(p.path) + ': ' if p.path else ''}{p.message}"
        for p in yaml_problems
    ]
    if not isinstance(data, dict):
        raise ConfigError(
            [*problems, f"{shown}:1 the file must be a mapping with agent, mqtt, devices, ..."]
        )
    bad_paths = {p.path for p in yaml_problems}
    config: Config | None = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        by_loc: dict[tuple[Any, ...], list[str]] = {}
        for err in exc.errors():
            loc, message = _describe_error(err)
            loc = _in_file(loc, lines, err["type"])
            if loc in bad_paths:
                continue  # already reported (an unset variable, say)
            by_loc.setdefault(loc, []).append(message)
        for loc, messages in by_loc.items():
            # A union (int | str, say) reports one error per member: say them together.
            text = "; or ".join(dict.fromkeys(messages))
            problems.append(f"{shown}:{_line_of(loc, lines)} {_path(loc)}: {text}")
    problems.extend(
        f"{shown}:{_line_of(loc, lines)} {_path(loc)}: {msg}" for loc, msg in _cross_checks(data)
    )
    if problems or config is None:
        prefix = len(shown) + 1
        ordered = sorted(_dedupe(problems), key=lambda p: int(p[prefix:].split(" ", 1)[0]))
        raise ConfigError(ordered)
    return config


def _cross_checks(data: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """Checks across list items, done on the raw data so they are reported together with
    every other problem: unique device and tag names, known poll groups."""
    out: list[tuple[tuple[Any, ...], str]] = []
    mqtt = data.get("mqtt")
    agent_raw = data.get("agent")
    agent: dict[str, Any] = agent_raw if isinstance(agent_raw, dict) else {}
    if isinstance(mqtt, dict):
        for key, allowed in (
            ("topic", _TOPIC_FIELDS),
            ("topic_tag", _TOPIC_FIELDS | {"tag"}),
            ("status_topic", _TOPIC_FIELDS - {"device"}),
            ("device_status_topic", _TOPIC_FIELDS),
        ):
            if isinstance(mqtt.get(key), str):
                out.extend(
                    (("mqtt", key), msg) for msg in _check_template(mqtt[key], allowed, agent)
                )
    out.extend(check_link_references(data))
    devices = data.get("devices")
    if not isinstance(devices, list):
        return out
    names: dict[str, int] = {}
    for i, dev in enumerate(devices):
        if not isinstance(dev, dict):
            continue
        name = dev.get("name")
        if isinstance(name, str):
            if name in names:
                out.append(
                    (
                        ("devices", i, "name"),
                        f"duplicate device name {name!r} (also devices[{names[name]}])",
                    )
                )
            else:
                names[name] = i
        groups = {"default"}
        if isinstance(dev.get("poll_groups"), dict):
            groups |= {str(g) for g in dev["poll_groups"]}
        tags = dev.get("tags")
        if not isinstance(tags, list):
            continue
        seen: dict[str, int] = {}
        for j, tag in enumerate(tags):
            if not isinstance(tag, dict):
                continue
            tname = tag.get("name")
            if isinstance(tname, str):
                if tname in seen:
                    out.append(
                        (
                            ("devices", i, "tags", j, "name"),
                            f"duplicate tag name {tname!r} (also tags[{seen[tname]}])",
                        )
                    )
                else:
                    seen[tname] = j
            group = tag.get("group", "default")
            if isinstance(group, str) and group not in groups:
                out.append(
                    (
                        ("devices", i, "tags", j, "group"),
                        f"unknown poll group {group!r}; defined: {', '.join(sorted(groups))}",
                    )
                )
    return out


def config_hash(text: str) -> str:
    """Short stable hash of a config text (for status messages)."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ------------------------------------------------------------------ error formatting


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top)"


def _in_file(loc: tuple[Any, ...], lines: dict[tuple[Any, ...], int], kind: str) -> tuple[Any, ...]:
    """Cut pydantic's location down to a path that exists in the file: union members
    ('int', 'str', 'function-after[...]') are not keys of the user's YAML. A missing or
    unknown key keeps its own name."""
    n = 0
    while n < len(loc) and loc[: n + 1] in lines:
        n += 1
    if n < len(loc) and kind in ("missing", "extra_forbidden") and n == len(loc) - 1:
        return loc
    return loc[:n] if n else loc


def _line_of(loc: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> int:
    """Line of the deepest node of `loc` that exists in the file."""
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return 1


def _model_at(loc: tuple[Any, ...]) -> type[ConfigModel] | None:
    """The config model that the mapping at `loc` is validated against (for suggestions)."""
    model: Any = Config
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _inner_model(field.annotation)
    return model if isinstance(model, type) and issubclass(model, ConfigModel) else None


def _inner_model(annotation: Any) -> Any:
    args = getattr(annotation, "__args__", None)
    if isinstance(annotation, type) and issubclass(annotation, ConfigModel):
        return annotation
    if args:
        for a in args:
            found = _inner_model(a)
            if found is not None:
                return found
    meta = getattr(annotation, "__metadata__", None)
    if meta is not None:
        return _inner_model(annotation.__origin__)
    return None


def _describe_error(err: ErrorDetails) -> tuple[tuple[Any, ...], str]:
    """(path in the file, message a person can act on) of one pydantic error."""
    loc = tuple(err["loc"])
    # A discriminated union puts the protocol name into the path: devices.0.modbus.port.
    protocol: str | None = None
    if len(loc) >= 3 and loc[0] == "devices" and loc[2] in DEVICE_MODELS:
        protocol = str(loc[2])
        loc = loc[:2] + loc[3:]
    if len(loc) >= 3 and loc[0] == "links" and loc[2] in ("serial", "rtu_over_tcp", "tcp"):
        loc = loc[:2] + loc[3:]  # the link union puts the type into the path too
    kind = err["type"]
    msg = err["msg"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        if protocol is not None:
            model = _device_model(DEVICE_MODELS[protocol], loc[:-1])
        else:
            model = _model_at(loc[:-1])
        hint = ""
        if model is not None:
            close = difflib.get_close_matches(key, list(model.model_fields), n=1, cutoff=0.6)
            if close:
                hint = f"; did you mean {close[0]!r}?"
            allowed = ", ".join(sorted(model.model_fields))
            hint += f" (allowed: {allowed})"
        msg = f"unknown key {key!r}{hint}"
    elif kind == "missing":
        msg = "required key is missing"
    elif kind.startswith("union_tag") and loc[:1] == ("links",):
        msg = "link type must be one of: serial, rtu_over_tcp, tcp"
        loc = (*loc, "type")
    elif kind == "union_tag_invalid":
        ctx = err.get("ctx") or {}
        msg = f"unknown protocol {ctx.get('tag')!r}; allowed: {', '.join(DEVICE_MODELS)}"
        loc = (*loc, "protocol")
    elif kind == "union_tag_not_found":
        msg = f"missing 'protocol' (one of: {', '.join(DEVICE_MODELS)})"
    elif kind.startswith("value_error"):
        msg = msg.removeprefix("Value error, ")
    return loc, msg


def _device_model(device: type[DeviceCommon], loc: tuple[Any, ...]) -> type[ConfigModel] | None:
    """Model of a mapping inside devices[i] (devices are a union, resolved by protocol)."""
    rest = loc[2:]
    model: Any = device
    for part in rest:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _inner_model(field.annotation)
        if model is None:
            return None
    return model if isinstance(model, type) and issubclass(model, ConfigModel) else None
