"""The agent's configuration: one YAML file, checked once, every problem reported at once.

Loading never opens a socket or touches the buffer. `load_config(path)` either returns a
valid `Config` or raises `ConfigError` whose `problems` are lines of the form
``configs/line4.yaml:17 devices[0].tags[3].type: Input should be 'bool', 'bit', ...``.

YAML is read with a loader of our own (see `agent.yamlsafe`): safe constructors only,
duplicate keys and anchors/aliases rejected, YAML 1.2 scalars (`no` stays a string,
`010` is ten), and a line number kept for every node so errors can point at it.
`${VAR}` and `${VAR:-default}` in plain scalars are replaced from the environment
before the scalar's type is decided, so `port: ${MQTT_PORT:-1883}` is an int.

Beyond the fields, the loader makes every check that starting the agent would make, so
that `validate` accepts exactly what `run` can run (docs/configuration.md, "Checks beyond
the keys"): each device's own `check()` (the Modbus request plan, say), every name that
ends up in an MQTT topic (no `+`, `#`, `/`, NUL, control characters; topics not starting
with `$` and at most 65,535 bytes once expanded; Sparkplug's ids), and, when the caller
says whether it runs simulators (`simulate`), endpoint ports of 0.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import ipaddress
import math
import re
import string
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self, Union
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, create_model, model_validator
from pydantic_core import ErrorDetails

from agent.command.checks import Broker, command_problems
from agent.command.config import CommandsConfig
from agent.derive.config import check_device as check_derive
from agent.profiles import Expanded, Located, expand_profiles, merge_located
from agent.publish import cloud
from agent.yamlsafe import YamlProblem, load_yaml
from drivers import registry
from drivers.base import ConfigModel, DeviceCommon
from drivers.links import LinkConfig, check_link_references


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


class AzureIotHub(ConfigModel):
    """Azure IoT Hub login (``mqtt.profile: azure-iot-hub``); see docs/cloud.md."""

    hub_host: str = Field(
        min_length=1,
        description="The hub's host name, e.g. myhub.azure-devices.net; also the default "
        "mqtt.host.",
    )
    device_id: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9\-.%_*?!(),:=@$']+$",
        description="The device identity registered in the hub (also the MQTT client id).",
    )
    device_key: SecretStr | None = Field(
        default=None,
        description="The device's symmetric key (base64) for SAS tokens; use ${ENV_VAR}. "
        "Without a key, the TLS client certificate (X.509) is the login.",
    )
    device_key_file: str | None = Field(
        default=None, description="File whose first line is the device key (instead of device_key)."
    )
    sas_ttl_s: int = Field(
        default=3600,
        ge=300,
        le=86400,
        description="Lifetime of each SAS token; the agent reconnects with a fresh token "
        "after 80 % of it.",
    )

    @model_validator(mode="after")
    def _one_key(self) -> AzureIotHub:
        if self.device_key is not None and self.device_key_file is not None:
            raise ValueError("give device_key or device_key_file, not both")
        return self

    def resolved_device_key(self) -> str | None:
        return read_secret(self.device_key, self.device_key_file)


class MqttConfig(ConfigModel):
    """The broker the samples are published to."""

    profile: Literal["generic", "aws-iot-core", "azure-iot-hub"] = Field(
        default="generic",
        description="generic: any MQTT broker; aws-iot-core / azure-iot-hub: keep to that "
        "platform's rules (checked by validate; docs/cloud.md).",
    )
    azure: AzureIotHub | None = Field(
        default=None, description="Azure IoT Hub login; required with profile azure-iot-hub."
    )
    max_publishes_per_s: float | None = Field(
        default=None,
        gt=0,
        description="Publishes per second on one connection (a token bucket; messages wait, "
        "none is dropped); default: the profile's (aws-iot-core 90), else no limit.",
    )

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
    layout: Literal["lean", "compact", "device", "tag", "sparkplug"] = Field(
        default="lean",
        description="lean (default): one message per device per poll, names and units "
        "once, quality only where not good (schema edge-agent/batch/2); compact: values by "
        "index, with a retained metadata message per device on topic_meta "
        "(edge-agent/compact/1); device: one message per device per poll with every "
        "sample in full (edge-agent/batch/1, the former default); tag: one message per "
        "sample on topic_tag; sparkplug: Sparkplug B edge node (needs the sparkplug "
        "section). See docs/layouts.md.",
    )
    sparkplug: SparkplugConfig | None = Field(
        default=None, description="Sparkplug B settings; required with layout: sparkplug."
    )
    topic: str = Field(
        default="edge/{agent}/{device}",
        description="Topic of the data messages (layouts lean, compact, device); fields "
        "{agent} {site} {area} {line} {device}.",
    )
    topic_tag: str = Field(
        default="edge/{agent}/{device}/{tag}",
        description="Topic of the tag layout; fields as topic, plus {tag}.",
    )
    topic_meta: str = Field(
        default="edge-meta/{agent}/{device}/{meta}",
        description="Layout compact: where each device's metadata (index -> tag, type, "
        "unit) is retained; fields as topic, plus {meta} (the metadata id, with -<part> "
        "when it is sent in parts).",
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
        description="A record the broker refuses with a reason that may pass (e.g. 0x97 "
        "Quota exceeded) this many times is moved to the dead-letter store; permanent "
        "refusals (0x87 Not authorized, 0x90, 0x99) are moved at once.",
    )
    max_message_bytes: int | None = Field(
        default=None,
        ge=1024,
        description="Largest MQTT packet to send (e.g. a cloud broker's message limit); a "
        "record whose message would be larger is split into as many messages as needed, "
        "with exact seq ranges. Default: the broker's Maximum Packet Size from the MQTT 5 "
        "CONNACK when it announces one, else 131072 (128 KiB). A broker's announced limit "
        "always applies on top of this.",
    )
    dead_letter_max_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=65536,
        description="Bound of the dead-letter store (sample data, bytes); when full its "
        "oldest entries are deleted, counted and logged.",
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

    @model_validator(mode="after")
    def _meta_topic(self) -> MqttConfig:
        if self.layout == "compact":
            missing = [f for f in ("{device}", "{meta}") if f not in self.topic_meta]
            if missing:
                raise ValueError(
                    f"layout compact: topic_meta must contain {' and '.join(missing)} (each "
                    "device's metadata, and each version of it, is retained on a topic of "
                    "its own)"
                )
        return self

    @model_validator(mode="before")
    @classmethod
    def _tls_port(cls, data: Any) -> Any:
        # 8883 is the registered MQTT-over-TLS port; an explicit port always wins.
        if isinstance(data, dict) and data.get("tls") is not None and "port" not in data:
            return {**data, "port": 8883}
        return data

    @model_validator(mode="before")
    @classmethod
    def _azure_defaults(cls, data: Any) -> Any:
        # Azure IoT Hub fixes the protocol, host, client id and topics: fill in what the
        # file leaves out; what it sets otherwise is refused by the start checks.
        if not isinstance(data, dict) or data.get("profile") != cloud.AZURE:
            return data
        azure = data.get("azure")
        if not isinstance(azure, dict):
            return data
        out = {**data}
        out.setdefault("protocol", "3.1.1")
        if isinstance(azure.get("hub_host"), str):
            out.setdefault("host", azure["hub_host"])
        device_id = azure.get("device_id")
        if isinstance(device_id, str):
            layout = data.get("layout", "lean")
            for key, template in cloud.azure_topics(device_id, str(layout)).items():
                out.setdefault(key, template)
        return out

    def resolved_client_id(self, agent_id: str) -> str:
        if self.profile == cloud.AZURE and self.azure is not None:
            return self.azure.device_id
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


class _DeviceModels(Mapping[str, type[DeviceCommon]]):
    """protocol name → device model, read live from `drivers.registry`."""

    def __getitem__(self, protocol: str) -> type[DeviceCommon]:
        try:
            return registry.get(protocol).device_model
        except registry.UnknownProtocol:
            raise KeyError(protocol) from None

    def __iter__(self) -> Iterator[str]:
        return iter(registry.protocols())

    def __len__(self) -> int:
        return len(registry.protocols())


#: protocol name → device model of every registered protocol (a live view).
DEVICE_MODELS: Mapping[str, type[DeviceCommon]] = _DeviceModels()


class SupervisionConfig(ConfigModel):
    """How the agent treats a task that fails or stops making progress (docs/operating.md)."""

    max_failures: int = Field(
        default=5, ge=1, description="A task failing this often within window_s stops the agent."
    )
    window_s: float = Field(default=60.0, gt=0, description="The window of max_failures.")
    stall_s: float = Field(
        default=60.0,
        gt=0,
        description="A task with work waiting and no progress for this long fails /healthz.",
    )


_TOPIC_FIELDS = {"agent", "site", "area", "line", "device"}


class Config(ConfigModel):
    """The whole configuration file."""

    # `devices` is a union of the registered protocols' device models, discriminated by
    # `protocol`, built from drivers.registry when a config is validated (config_model()),
    # so a protocol registered after import is accepted. Validating or asking for the
    # schema through Config itself goes through config_model() too.
    agent: AgentSection
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    links: dict[str, LinkConfig] = Field(
        default_factory=dict,
        description="Shared serial lines, serial device servers and TCP gateways by name; "
        "devices on one give `link: NAME` and their `unit_id`.",
    )
    devices: list[DeviceCommon] = Field(min_length=1)
    profiles: dict[str, str] = Field(
        default_factory=dict,
        description="Device profiles by name: name → YAML file of device keys (protocol, "
        "tags, poll groups, ...), relative to this file; a device uses one with `profile:`.",
    )
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    http: HttpConfig | None = Field(
        default=None, description="The metrics/health/status endpoint; off when absent."
    )
    supervision: SupervisionConfig = Field(default_factory=SupervisionConfig)
    commands: CommandsConfig = Field(
        default_factory=CommandsConfig,
        description="Writes from the platform (docs/commands.md); off unless enabled.",
    )

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Self:
        if cls is Config:
            return config_model().model_validate(obj, **kwargs)  # type: ignore[return-value]
        return super().model_validate(obj, **kwargs)

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if cls is Config:
            return config_model().model_json_schema(*args, **kwargs)
        return super().model_json_schema(*args, **kwargs)


_model_lock = threading.Lock()
_model_cache: tuple[int, type[Config]] | None = None


def config_model() -> type[Config]:
    """The Config model whose `devices` accept every protocol registered now."""
    global _model_cache
    with _model_lock:
        gen = registry.generation()
        if _model_cache is None or _model_cache[0] != gen:
            models = tuple(p.device_model for p in registry.protocols().values())
            member: Any = Union[models] if len(models) > 1 else models[0]  # noqa: UP007
            device = Annotated[member, Field(discriminator="protocol")]
            built = create_model(
                "Config",
                __base__=Config,
                __module__=__name__,
                __doc__=Config.__doc__,
                devices=(list[device], Field(min_length=1)),
            )
            _model_cache = (gen, built)
        return _model_cache[1]


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


def load_config(path: str | Path, *, simulate: bool | None = None) -> Config:
    """Read, interpolate and validate a config file. Raises ConfigError.

    simulate: True for simulator mode (`run --simulate`, `simulate`), False for a run
    against real devices (`run`, `validate`): then an endpoint port of 0, which only a
    simulator can serve, is an error. None (the default) leaves endpoint ports alone."""
    path = Path(path)
    shown = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{shown}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ConfigError(
            [f"{shown}:{line} not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"]
        ) from None
    return parse_config(text, shown, base_dir=path.parent, simulate=simulate)


def parse_config(
    text: str,
    shown: str = "<config>",
    base_dir: Path | None = None,
    *,
    simulate: bool | None = None,
) -> Config:
    """Validate config text; `shown` is the file name used in error messages, `base_dir`
    the folder profile files are relative to (default: the working directory),
    `simulate` as for `load_config`."""
    # A valid file needs no line numbers: read it without them first (a 10,000-tag file
    # holds ~100,000 of them), and again with them only to report problems.
    try:
        data, _, yaml_problems = load_yaml(text, lines=False)
    except YamlProblem:
        pass
    else:
        if not yaml_problems and isinstance(data, dict):
            expanded = expand_profiles(data, {}, shown, base_dir, track_lines=False)
            if not expanded.problems:
                with contextlib.suppress(ValidationError):
                    config = config_model().model_validate(expanded.data)
                    if not _cross_checks(expanded.data) and not _start_checks(
                        config.agent,
                        config.mqtt,
                        list(enumerate(config.devices)),
                        simulate,
                        buffer=config.buffer,
                        http=config.http,
                        commands=config.commands,
                    ):
                        return config
            del expanded
        del data
    return _parse_reporting(text, shown, base_dir, simulate)


def _parse_reporting(
    text: str, shown: str, base_dir: Path | None = None, simulate: bool | None = None
) -> Config:
    try:
        data, lines, yaml_problems = load_yaml(text)
    except YamlProblem as exc:
        raise ConfigError([f"{shown}:{p.line} {p.message}" for p in exc.problems]) from None
    located = [
        Located(shown, p.line, _path(p.path) if p.path else "", p.message) for p in yaml_problems
    ]
    if not isinstance(data, dict):
        raise ConfigError(
            merge_located(
                [
                    *located,
                    Located(
                        shown, 1, "", "the file must be a mapping with agent, mqtt, devices, ..."
                    ),
                ],
                shown,
            )
        )
    bad_paths = {p.path for p in yaml_problems}
    expanded = expand_profiles(data, lines, shown, base_dir)
    located.extend(expanded.problems)
    data, lines = expanded.data, expanded.lines
    config: Config | None = None
    try:
        config = config_model().model_validate(data)
    except ValidationError as exc:
        by_loc: dict[tuple[Any, ...], list[str]] = {}
        for err in exc.errors():
            loc, message = _describe_error(err)
            loc = _in_file(loc, lines, err["type"])
            if loc in bad_paths or expanded.follows_from_profile(loc):
                continue  # already reported (an unset variable, an unusable profile)
            by_loc.setdefault(loc, []).append(message)
        for loc, messages in by_loc.items():
            # A union (int | str, say) reports one error per member: say them together.
            text = "; or ".join(dict.fromkeys(messages))
            located.append(_locate(loc, text, expanded, shown))
    located.extend(
        _locate(loc, msg, expanded, shown)
        for loc, msg in _cross_checks(data)
        if not expanded.follows_from_profile(loc)
    )
    agent: AgentSection | None
    mqtt: MqttConfig | None
    devices: list[tuple[int, DeviceCommon]]
    buffer: BufferConfig | None = None
    http: HttpConfig | None = None
    commands: CommandsConfig | None = None
    if config is not None:
        agent, mqtt, devices = config.agent, config.mqtt, list(enumerate(config.devices))
        buffer, http, commands = config.buffer, config.http, config.commands
    else:
        # Check what did validate, so these problems come together with the others.
        agent, mqtt, devices = _valid_sections(data)
        with contextlib.suppress(ValidationError):
            buffer = BufferConfig.model_validate(data.get("buffer", {}))
        with contextlib.suppress(ValidationError):
            raw_http = data.get("http")
            http = HttpConfig.model_validate(raw_http) if raw_http is not None else None
        with contextlib.suppress(ValidationError):
            commands = CommandsConfig.model_validate(data.get("commands", {}))
    located.extend(
        _locate(loc, msg, expanded, shown)
        for loc, msg in _start_checks(
            agent, mqtt, devices, simulate, buffer=buffer, http=http, commands=commands
        )
    )
    if located or config is None:
        raise ConfigError(merge_located(located, shown))
    return config


def _locate(loc: tuple[Any, ...], message: str, expanded: Expanded, shown: str) -> Located:
    """Where a problem at `loc` is reported: the config file's line, or, for a node taken
    from a profile, the profile's file and line (with the path inside the profile)."""
    lines = expanded.lines
    n = len(loc)
    while n > 0 and loc[:n] not in lines:
        n -= 1
    line = lines.get(loc[:n], 1)
    profile = expanded.files.get(loc[:n])
    if profile is None:
        return Located(shown, line, _path(loc), message)
    device = expanded.data["devices"][loc[1]]
    name = device.get("name") if isinstance(device, dict) else None
    return Located(profile, line, _path(loc[2:]), message, str(name or f"devices[{loc[1]}]"))


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
            ("topic_meta", _TOPIC_FIELDS | {"meta"}),
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


def _valid_sections(
    data: dict[str, Any],
) -> tuple[AgentSection | None, MqttConfig | None, list[tuple[int, DeviceCommon]]]:
    """The agent and mqtt sections and the devices of a file that did not validate as a
    whole, each where it validates on its own."""
    agent: AgentSection | None = None
    mqtt: MqttConfig | None = None
    with contextlib.suppress(ValidationError):
        agent = AgentSection.model_validate(data.get("agent"))
    with contextlib.suppress(ValidationError):
        mqtt = MqttConfig.model_validate(data.get("mqtt", {}))
    devices: list[tuple[int, DeviceCommon]] = []
    raw = data.get("devices")
    if isinstance(raw, list):
        for i, dev in enumerate(raw):
            if not isinstance(dev, dict):
                continue
            protocol = dev.get("protocol")
            if not isinstance(protocol, str) or protocol not in DEVICE_MODELS:
                continue
            with contextlib.suppress(ValidationError):
                devices.append((i, DEVICE_MODELS[protocol].model_validate(dev)))
    return agent, mqtt, devices


# ------------------------------------------------------------------ start-up checks

Problem = tuple[tuple[Any, ...], str]

#: The longest topic MQTT can carry (a two-byte length prefix), in UTF-8 bytes.
TOPIC_MAX_BYTES = 65_535

_NOT_IN_NAMES = {
    "+": "'+' (an MQTT wildcard)",
    "#": "'#' (an MQTT wildcard)",
    "/": "'/' (it would add a topic level)",
}


def utf8_problem(text: str) -> str | None:
    """Why `text` is not a valid MQTT UTF-8 string (MQTT 5, 1.5.4), or None: it must be
    encodable (no lone surrogates) and hold no NUL, no control characters (U+0001..U+001F,
    U+007F..U+009F: brokers such as mosquitto refuse them) and no noncharacters."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"not valid Unicode (lone surrogate U+{ord(text[exc.start]):04X})"
    if text.isascii() and text.isprintable():
        return None
    for ch in text:
        cp = ord(ch)
        if cp == 0:
            return "NUL (U+0000) is not allowed in MQTT strings"
        if cp < 0x20 or 0x7F <= cp <= 0x9F:
            return f"control character U+{cp:04X} is not allowed in MQTT strings"
        if 0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE:
            return f"noncharacter U+{cp:04X} is not allowed in MQTT strings"
    return None


def topic_name_problem(name: str) -> str | None:
    """Why `name` cannot be one level of an MQTT topic (a device or tag name, a site,
    a Sparkplug id), or None."""
    if name == "":
        return "an empty name makes an empty topic level"
    for ch, what in _NOT_IN_NAMES.items():
        if ch in name:
            return f"{_short(name)}: {what} is not allowed in a name that goes into MQTT topics"
    problem = utf8_problem(name)
    return f"{_short(name)}: {problem}" if problem is not None else None


def _template_fields(template: str) -> list[str] | None:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError:
        return None


def _template_problem(template: str) -> str | None:
    """Problems of a template's own text (outside its {fields})."""
    try:
        literal = "".join(t for t, _, _, _ in string.Formatter().parse(template))
    except ValueError:
        return None  # reported by _check_template
    for ch in "+#":
        if ch in literal:
            return f"{template!r}: {_NOT_IN_NAMES[ch]} is not allowed in a topic"
    if template.startswith("$"):
        return f"{template!r}: topics starting with '$' are reserved for the broker ($SYS)"
    problem = utf8_problem(literal)
    return f"{template!r}: {problem}" if problem is not None else None


_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


def host_problem(host: str) -> str | None:
    """Why `host` is neither an IP address nor a host name (RFC 1123 syntax; nothing is
    resolved here), or None."""
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host.strip("[]"))
        return None
    name = host[:-1] if host.endswith(".") else host
    if 0 < len(name) <= 253 and all(_HOST_LABEL.match(label) for label in name.split(".")):
        return None
    return f"{host!r} is neither an IP address nor a host name"


def _buffer_path_problem(buffer: BufferConfig) -> str | None:
    """A buffer file that can never be opened: the path is a directory, or one of its
    parents is a file. (A missing directory is created at start; a disk that fails is a
    run-time condition: see docs/operating.md.)"""
    if buffer.kind != "sqlite":
        return None
    path = Path(buffer.path)
    try:
        if path.is_dir():
            return f"{buffer.path} is a directory; give a file, e.g. {path / 'buffer.db'}"
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    return f"{parent} is a file, so {buffer.path} cannot be created"
                return None
    except OSError:
        return None  # unreadable: open() at start reports it
    return None


def _start_checks(
    agent: AgentSection | None,
    mqtt: MqttConfig | None,
    devices: list[tuple[int, DeviceCommon]],
    simulate: bool | None,
    *,
    buffer: BufferConfig | None = None,
    http: HttpConfig | None = None,
    commands: CommandsConfig | None = None,
) -> list[Problem]:
    """What starting the agent would otherwise find out: each device's own checks,
    names and topics MQTT cannot carry, endpoint ports of 0 outside simulator mode,
    host names that cannot be, a buffer path that can never be a file, writes that
    cannot be (agent.command.checks)."""
    out: list[Problem] = []
    broker = (
        Broker(
            tls=mqtt.tls is not None,
            authenticated=mqtt.username is not None
            or (mqtt.tls is not None and mqtt.tls.cert_file is not None),
            mqtt5=mqtt.protocol == "5",
            sparkplug=mqtt.layout == "sparkplug",
        )
        if mqtt is not None
        else None
    )
    out.extend(command_problems(commands, devices, broker, simulate))
    if buffer is not None:
        problem = _buffer_path_problem(buffer)
        if problem is not None:
            out.append((("buffer", "path"), problem))
    if http is not None:
        problem = host_problem(http.host)
        if problem is not None:
            out.append((("http", "host"), problem))
    if mqtt is not None:
        problem = host_problem(mqtt.host)
        if problem is not None:
            # Under azure-iot-hub the host is, unless given, the hub's host name.
            at = "host"
            if mqtt.azure is not None and mqtt.host == mqtt.azure.hub_host:
                at = "azure.hub_host"
            out.append((("mqtt", *at.split(".")), problem))
    for i, device in devices:
        out.extend((("devices", i, *loc), msg) for loc, msg in device.check(simulate=simulate))
        out.extend((("devices", i, *loc), msg) for loc, msg in check_derive(device))
        for j, tag in enumerate(getattr(device, "tags", [])):
            for key in ("scale", "offset"):
                number = getattr(tag, key, 0.0)
                if isinstance(number, float) and not math.isfinite(number):
                    out.append(
                        (
                            ("devices", i, "tags", j, key),
                            f"{number!r} is not a finite number (every value would be bad)",
                        )
                    )
        endpoint = getattr(device, "endpoint", None)
        if simulate is False and isinstance(endpoint, str):
            with contextlib.suppress(ValueError):
                if urlsplit(endpoint).port == 0:
                    out.append(
                        (
                            ("devices", i, "endpoint"),
                            "port 0 is only for simulator mode (run --simulate)",
                        )
                    )
    if mqtt is not None:
        for key in ("client_id", "username"):
            value = getattr(mqtt, key)
            if isinstance(value, str):
                problem = utf8_problem(value)
                size = len(value.encode("utf-8", "replace"))
                if problem is None and size > TOPIC_MAX_BYTES:
                    problem = f"{size:,} bytes, over the {TOPIC_MAX_BYTES:,} of an MQTT string"
                if problem is not None:
                    out.append((("mqtt", key), problem))
    if agent is None or mqtt is None:
        return out
    if mqtt.profile != "generic" or mqtt.azure is not None:
        out.extend(_profile_checks(agent, mqtt, devices))
    if mqtt.layout == "sparkplug":
        out.extend(_sparkplug_checks(agent, mqtt, devices))
        return out
    templates = {
        "topic_tag" if mqtt.layout == "tag" else "topic": _TOPIC_FIELDS
        | ({"tag"} if mqtt.layout == "tag" else set()),
        "status_topic": _TOPIC_FIELDS - {"device"},
        "device_status_topic": _TOPIC_FIELDS,
    }
    values: dict[str, str | None] = {
        "agent": agent.id,
        "site": agent.site,
        "area": agent.area,
        "line": agent.line,
    }
    reported: set[tuple[Any, ...]] = set()

    def name_at(loc: tuple[Any, ...], name: str, problem: str | None = None) -> None:
        problem = problem or topic_name_problem(name)
        if problem is not None and loc not in reported:
            reported.add(loc)
            out.append((loc, problem))

    for key, allowed in templates.items():
        template: str = getattr(mqtt, key)
        fields = _template_fields(template)
        if fields is None or set(fields) - allowed:
            continue  # reported by _check_template
        if any(f in values and f != "agent" and values[f] is None for f in fields):
            continue  # {site} without agent.site: reported by _check_template
        problem = _template_problem(template)
        if problem is not None:
            out.append((("mqtt", key), problem))
            continue
        for f in ("site", "area", "line"):
            value = values[f]
            if f in fields and value is not None:
                name_at(("agent", f), value)
        if not template:
            out.append((("mqtt", key), "the topic is empty"))
            continue
        first = fields[0] if fields and template.startswith("{") else None
        if first in values and str(values[first]).startswith("$"):
            out.append((("mqtt", key), "the topic would start with '$' (reserved for the broker)"))
        out.extend(
            (("mqtt", key), msg)
            for msg in _length_problems(template, fields, values, devices, name_at)
        )
    return out


def _short(name: str, keep: int = 40) -> str:
    """A name as shown in a message: quoted, the middle of a very long one left out."""
    if len(name) <= keep:
        return repr(name)
    return f"{name[: keep // 2]!r}...{name[-keep // 2 :]!r} ({len(name):,} characters)"


def _length_problems(
    template: str,
    fields: list[str],
    values: dict[str, str | None],
    devices: list[tuple[int, DeviceCommon]],
    name_at: Any,
) -> list[str]:
    """Names of devices and tags the template uses, and topics over TOPIC_MAX_BYTES."""
    out: list[str] = []

    def expand(**extra: str) -> str | None:
        try:
            return template.format(**values, **extra)
        except (KeyError, IndexError, ValueError):
            return None

    if "device" not in fields:
        topic = expand()
        size = len(topic.encode("utf-8", "replace")) if topic is not None else 0
        if size > TOPIC_MAX_BYTES:
            out.append(f"the topic is {size:,} bytes, over MQTT's {TOPIC_MAX_BYTES:,}")
        return out
    for i, device in devices:
        name_at(("devices", i, "name"), device.name)
        longest_tag = ""
        if "tag" in fields:
            longest = -1
            for j, tag in enumerate(getattr(device, "tags", [])):
                name_at(("devices", i, "tags", j, "name"), tag.name)
                if template.startswith("{tag}") and tag.name.startswith("$"):
                    name_at(
                        ("devices", i, "tags", j, "name"),
                        tag.name,
                        "the topic would start with '$' (reserved for the broker)",
                    )
                size = len(tag.name.encode("utf-8", "replace"))
                if size > longest:
                    longest, longest_tag = size, tag.name
        topic = (
            expand(device=device.name, tag=longest_tag)
            if "tag" in fields
            else expand(device=device.name)
        )
        if topic is None:
            continue
        size = len(topic.encode("utf-8", "replace"))
        if size > TOPIC_MAX_BYTES:
            what = f"device {_short(device.name)}" + (
                f" tag {_short(longest_tag)}" if "tag" in fields else ""
            )
            out.append(f"the topic of {what} is {size:,} bytes, over MQTT's {TOPIC_MAX_BYTES:,}")
    return out


_AWS_THING_NAME = re.compile(r"^[A-Za-z0-9:_-]{1,128}$")


def _profile_checks(
    agent: AgentSection, mqtt: MqttConfig, devices: list[tuple[int, DeviceCommon]]
) -> list[Problem]:
    """mqtt.profile: what the cloud platform would refuse (agent.publish.cloud)."""
    out: list[Problem] = []
    profile = mqtt.profile
    if mqtt.azure is not None and profile != cloud.AZURE:
        out.append(
            (("mqtt", "azure"), "the azure section is used only with profile: azure-iot-hub")
        )
    limit = cloud.message_limit(profile)
    if limit is not None and mqtt.max_message_bytes is not None and mqtt.max_message_bytes > limit:
        out.append(
            (
                ("mqtt", "max_message_bytes"),
                f"{mqtt.max_message_bytes:,} is above {profile}'s message limit of {limit:,} bytes",
            )
        )
    if profile == cloud.AWS:
        out.extend(_aws_checks(agent, mqtt, devices))
    elif profile == cloud.AZURE:
        out.extend(_azure_checks(mqtt, devices))
    return out


def _topics_in_use(mqtt: MqttConfig) -> list[str]:
    if mqtt.layout == "sparkplug":
        return []
    topics = ["topic_tag" if mqtt.layout == "tag" else "topic"]
    if mqtt.layout == "compact":
        topics.append("topic_meta")
    return [*topics, "status_topic", "device_status_topic"]


def _aws_checks(
    agent: AgentSection, mqtt: MqttConfig, devices: list[tuple[int, DeviceCommon]]
) -> list[Problem]:
    out: list[Problem] = []
    if mqtt.client_id is None:
        out.append(
            (
                ("mqtt", "client_id"),
                "aws-iot-core: set client_id to the thing name (AWS IoT Core identifies "
                "the connection by it)",
            )
        )
    elif not _AWS_THING_NAME.match(mqtt.client_id):
        out.append(
            (
                ("mqtt", "client_id"),
                f"aws-iot-core: {_short(mqtt.client_id)} is not a thing name "
                "(1-128 characters: letters, digits, ':', '_', '-')",
            )
        )
    if mqtt.tls is None:
        out.append(
            (
                ("mqtt", "tls"),
                "aws-iot-core needs mutual TLS: a tls section with cert_file and key_file "
                "(the thing's certificate)",
            )
        )
    elif mqtt.tls.cert_file is None:
        out.append(
            (
                ("mqtt", "tls"),
                "aws-iot-core needs the thing's client certificate: set tls.cert_file and "
                "tls.key_file",
            )
        )
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(mqtt.host.strip("[]"))
        out.append(
            (
                ("mqtt", "host"),
                "aws-iot-core: give the endpoint's host name (e.g. "
                "abc123-ats.iot.eu-west-1.amazonaws.com), not an address: TLS must send the "
                "name (SNI), AWS refuses a connection without it",
            )
        )
    rate = mqtt.max_publishes_per_s
    if rate is not None and rate > cloud.AWS_PUBLISH_LIMIT_PER_S:
        out.append(
            (
                ("mqtt", "max_publishes_per_s"),
                f"{rate:g} is above aws-iot-core's {cloud.AWS_PUBLISH_LIMIT_PER_S} publishes "
                "per second per connection",
            )
        )
    values = {"agent": agent.id, "site": agent.site, "area": agent.area, "line": agent.line}
    for key in _topics_in_use(mqtt):
        template: str = getattr(mqtt, key)
        try:
            literal = "".join(t for t, _, _, _ in string.Formatter().parse(template))
        except ValueError:
            continue  # reported by _check_template
        slashes = literal.count("/")
        if slashes > cloud.AWS_MAX_SLASHES:
            out.append(
                (
                    ("mqtt", key),
                    f"aws-iot-core allows at most {cloud.AWS_MAX_SLASHES} '/' in a topic; "
                    f"{template!r} has {slashes}",
                )
            )
        longest = _longest_topic(template, values, devices)
        size = len(longest.encode("utf-8", "replace")) if longest is not None else 0
        if longest is not None and size > cloud.AWS_TOPIC_MAX_BYTES:
            out.append(
                (
                    ("mqtt", key),
                    f"aws-iot-core allows topics of at most {cloud.AWS_TOPIC_MAX_BYTES} bytes; "
                    f"{_short(longest, 60)} is {size}",
                )
            )
    if mqtt.layout == "sparkplug" and mqtt.sparkplug is not None:
        edge = mqtt.sparkplug.edge_node_id or agent.id
        for i, d in devices:
            topic = f"spBv1.0/{mqtt.sparkplug.group_id}/DBIRTH/{edge}/{d.name}"
            size = len(topic.encode("utf-8", "replace"))
            if size > cloud.AWS_TOPIC_MAX_BYTES:
                out.append(
                    (
                        ("devices", i, "name"),
                        f"aws-iot-core allows topics of at most {cloud.AWS_TOPIC_MAX_BYTES} "
                        f"bytes; the Sparkplug topic {_short(topic, 60)} is {size}",
                    )
                )
    return out


def _longest_topic(
    template: str, values: dict[str, str | None], devices: list[tuple[int, DeviceCommon]]
) -> str | None:
    """The longest topic `template` makes for these devices and tags (None: cannot say)."""
    fields = _template_fields(template) or []
    best: str | None = None
    names = [d.name for _, d in devices] if "device" in fields else [""]
    tags = [""]
    if "tag" in fields:
        tags = [t.name for _, d in devices for t in getattr(d, "tags", [])] or [""]
    device = max(names, key=lambda n: len(n.encode("utf-8", "replace")), default="")
    tag = max(tags, key=lambda n: len(n.encode("utf-8", "replace")), default="")
    with contextlib.suppress(KeyError, IndexError, ValueError):
        best = template.format(
            **{k: v or "" for k, v in values.items()},
            device=device,
            tag=tag,
            meta="f" * 16 + "-99999",  # layout compact's metadata id, with a part number
        )
    return best


def _azure_checks(mqtt: MqttConfig, devices: list[tuple[int, DeviceCommon]]) -> list[Problem]:
    out: list[Problem] = []
    azure = mqtt.azure
    if azure is None:
        out.append(
            (
                ("mqtt", "profile"),
                "azure-iot-hub needs an azure section: hub_host, device_id and device_key "
                "(or a TLS client certificate)",
            )
        )
        return out
    if mqtt.protocol != "3.1.1":
        out.append(
            (
                ("mqtt", "protocol"),
                "azure-iot-hub speaks MQTT 3.1.1 only: remove protocol or set it to '3.1.1'",
            )
        )
    has_key = azure.device_key is not None or azure.device_key_file is not None
    has_cert = mqtt.tls is not None and mqtt.tls.cert_file is not None
    if mqtt.tls is None:
        out.append(
            (
                ("mqtt", "tls"),
                "azure-iot-hub accepts TLS connections only: add a tls section "
                "(tls: {} trusts the system's CAs)",
            )
        )
    if not has_key and not has_cert:
        out.append(
            (
                ("mqtt", "azure"),
                "azure-iot-hub needs a login: azure.device_key (SAS token) or tls.cert_file "
                "and tls.key_file (X.509)",
            )
        )
    elif has_key and has_cert:
        out.append(
            (
                (
                    "mqtt",
                    "azure",
                    "device_key" if azure.device_key is not None else "device_key_file",
                ),
                "give azure.device_key or a TLS client certificate, not both",
            )
        )
    if azure.device_key is not None:
        problem = cloud.key_problem(azure.device_key.get_secret_value())
        if problem is not None:
            out.append((("mqtt", "azure", "device_key"), f"the device key is {problem}"))
    if mqtt.layout == "sparkplug":
        out.append(
            (
                ("mqtt", "layout"),
                "azure-iot-hub has fixed topics (devices/{device_id}/messages/events/): "
                "layout sparkplug cannot be used there; use lean, compact, device or tag",
            )
        )
    fixed = cloud.azure_topics(azure.device_id, mqtt.layout)
    for key, template in fixed.items():
        if getattr(mqtt, key) != template:
            out.append(
                (
                    ("mqtt", key),
                    f"azure-iot-hub publishes to devices/{azure.device_id}/messages/events/ "
                    f"with the names in the message properties: remove {key}",
                )
            )
    if mqtt.client_id is not None and mqtt.client_id != azure.device_id:
        out.append(
            (
                ("mqtt", "client_id"),
                "azure-iot-hub: the client id is azure.device_id; remove client_id",
            )
        )
    for key in ("username", "password", "password_file"):
        if getattr(mqtt, key) is not None:
            out.append(
                (
                    ("mqtt", key),
                    f"azure-iot-hub: the login is made from the azure section (device key or "
                    f"certificate); remove {key}",
                )
            )
    if mqtt.retain_last:
        out.append(
            (
                ("mqtt", "retain_last"),
                "azure-iot-hub keeps no retained messages: remove retain_last",
            )
        )
    for i, device in devices:
        names: list[tuple[tuple[Any, ...], str]] = [(("devices", i, "name"), device.name)]
        if mqtt.layout == "tag":
            names += [
                (("devices", i, "tags", j, "name"), t.name)
                for j, t in enumerate(getattr(device, "tags", []))
            ]
        for loc, name in names:
            if name and not set(name) <= cloud.URL_UNRESERVED:
                out.append(
                    (
                        loc,
                        f"{_short(name)}: azure-iot-hub carries this name in the message "
                        "properties; use only letters, digits and - . _ ~",
                    )
                )
    return out


def _sparkplug_checks(
    agent: AgentSection, mqtt: MqttConfig, devices: list[tuple[int, DeviceCommon]]
) -> list[Problem]:
    """Sparkplug B ids (group, edge node, device) are topic levels: UTF-8 without the
    reserved '+', '/' and '#' (Sparkplug 3.0, topic namespace)."""
    assert mqtt.sparkplug is not None
    out: list[Problem] = []
    sp = mqtt.sparkplug
    ids: list[tuple[tuple[Any, ...], str]] = [(("mqtt", "sparkplug", "group_id"), sp.group_id)]
    if sp.edge_node_id is not None:
        ids.append((("mqtt", "sparkplug", "edge_node_id"), sp.edge_node_id))
    else:
        ids.append((("agent", "id"), agent.id))
    ids.extend((("devices", i, "name"), d.name) for i, d in devices)
    for loc, name in ids:
        problem = topic_name_problem(name)
        if problem is not None:
            out.append((loc, f"Sparkplug id {problem}"))
    edge = sp.edge_node_id or agent.id
    for i, d in devices:
        topic = f"spBv1.0/{sp.group_id}/DBIRTH/{edge}/{d.name}"
        size = len(topic.encode("utf-8", "replace"))
        if size > TOPIC_MAX_BYTES:
            out.append(
                (
                    ("devices", i, "name"),
                    f"the Sparkplug topic is {size:,} bytes, over MQTT's {TOPIC_MAX_BYTES:,}",
                )
            )
    return out


def config_hash(text: str) -> str:
    """Short stable hash of a config text (for status messages)."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ------------------------------------------------------------------ error formatting


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
