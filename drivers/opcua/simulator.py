"""Simulated OPC UA servers serving the configured devices' tags (simulator mode, tests).

One asyncua Server per device, on 127.0.0.1, at the port of the device's endpoint (a
free port when that is 0 or busy; `endpoints` tells the actual URLs). Every tag's node is
created at exactly its configured NodeId or browse path, in its configured namespace
(index or URI), with the data type named by the tag's `type` (Double by default), as an
array when `array_length` is set, or as a structure of its `fields`. Values come from
drivers.generators and are written only when they change, so a value set with
`set_value` stays until the generator next moves. A value a client writes (the Write
service) stays for good: that node stops following its generator, so a commissioning
can be rehearsed. Every node is writable except the tags named in `read_only`, whose
AccessLevel lacks CurrentWrite; asyncua's server refuses a write to them with
BadUserAccessDenied.

Security is explicit: the server offers exactly the device's policy and mode (asyncua's
default would also offer no security), with the simulator's own certificate kept in
`cert_dir`; a device with a username gets a user manager that accepts only that user.
`max_nodes_per_read` sets the OperationLimits node *and enforces it*: a larger Read is
refused with BadTooManyOperations, as a strict PLC would.

`trusted_clients` (a directory of client certificates) makes the servers strict about
client certificates, as real PLCs are: an OpenSecureChannel whose certificate is not in
that directory is refused with BadSecurityChecksFailed, either as a ServiceFault in the
OpenSecureChannel reply (`rejection="service_fault"`, what several PLC stacks send) or
as a transport ERR message (`"error_message"`, what the specification asks for); the
connection is then closed. asyncua's server alone checks client certificates only at
CreateSession, so the check is added to each connection's message processor.

Diagnostics for tests running the simulator in another process: namespace
`urn:edge-agent:simulator` holds `s=Sim.Sessions`, `s=Sim.Subscriptions` and
`s=Sim.ReadCalls` under Objects/Simulator.

Run it alone: ``python -m drivers.opcua.simulator CONFIG [--cert-dir DIR]
[--trusted-clients DIR]`` prints one
JSON line per device (name, endpoint, certificate) and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlparse

from asyncua import ua
from asyncua.common.callback import CallbackType, ServerItemCallback
from asyncua.common.node import Node
from asyncua.common.structures104 import new_struct, new_struct_field
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.server import Server
from asyncua.server.user_managers import UserManager
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.ua_binary import struct_from_binary, uatcp_to_binary

from drivers.base import Scalar
from drivers.generators import Generator, Kind, default_spec, make_generator
from drivers.opcua import certs
from drivers.opcua.config import (
    OpcUaDevice,
    OpcUaTag,
    ScalarTypeName,
    parse_browse_path,
    parse_node_id,
)

SIM_NAMESPACE = "urn:edge-agent:simulator"
SIM_APPLICATION_URI = "urn:edge-agent:simulator"

_POLICY_TYPES: dict[tuple[str, str], ua.SecurityPolicyType] = {
    ("None", "None"): ua.SecurityPolicyType.NoSecurity,
    ("Basic256Sha256", "Sign"): ua.SecurityPolicyType.Basic256Sha256_Sign,
    ("Basic256Sha256", "SignAndEncrypt"): ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
    ("Aes128_Sha256_RsaOaep", "Sign"): ua.SecurityPolicyType.Aes128Sha256RsaOaep_Sign,
    ("Aes128_Sha256_RsaOaep", "SignAndEncrypt"): (
        ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt
    ),
    ("Aes256_Sha256_RsaPss", "Sign"): ua.SecurityPolicyType.Aes256Sha256RsaPss_Sign,
    ("Aes256_Sha256_RsaPss", "SignAndEncrypt"): (
        ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt
    ),
}

_VARIANT: dict[ScalarTypeName, ua.VariantType] = {
    "Boolean": ua.VariantType.Boolean,
    "SByte": ua.VariantType.SByte,
    "Byte": ua.VariantType.Byte,
    "Int16": ua.VariantType.Int16,
    "UInt16": ua.VariantType.UInt16,
    "Int32": ua.VariantType.Int32,
    "UInt32": ua.VariantType.UInt32,
    "Int64": ua.VariantType.Int64,
    "UInt64": ua.VariantType.UInt64,
    "Float": ua.VariantType.Float,
    "Double": ua.VariantType.Double,
    "String": ua.VariantType.String,
    "DateTime": ua.VariantType.DateTime,
    "ByteString": ua.VariantType.ByteString,
    "Guid": ua.VariantType.Guid,
    "LocalizedText": ua.VariantType.LocalizedText,
}
_INT_RANGE: dict[str, tuple[float, float]] = {
    "SByte": (-128, 127),
    "Byte": (0, 255),
    "Int16": (-32768, 32767),
    "UInt16": (0, 65535),
    "Int32": (-(2**31), 2**31 - 1),
    "UInt32": (0, 2**32 - 1),
    "Int64": (-(2**63), 2**63 - 1),
    "UInt64": (0, 2**64 - 1),
}


def _kind(t: ScalarTypeName) -> Kind:
    if t == "Boolean":
        return "bool"
    if t in _INT_RANGE:
        return "int"
    if t in ("String", "ByteString", "Guid", "LocalizedText", "DateTime"):
        return "str"
    return "float"


def _to_ua(t: ScalarTypeName, v: Scalar) -> Any:
    """A generated scalar as the Python value asyncua expects for type `t`."""
    if t == "DateTime":
        return datetime.now(UTC)
    if t == "ByteString":
        return str(v).encode()
    if t == "Guid":
        return uuid.uuid5(uuid.NAMESPACE_URL, str(v))
    if t == "LocalizedText":
        return ua.LocalizedText(str(v))
    return v


def _scalar_generator(tag: OpcUaTag, t: ScalarTypeName, seed: int) -> Generator:
    kind = _kind(t)
    lo, hi = _INT_RANGE.get(t, (None, None))
    spec = tag.simulate or default_spec(kind, lo, hi)
    return make_generator(spec, kind, lo=lo, hi=hi, seed=seed)


@dataclass
class _Var:
    tag: OpcUaTag
    node: Node
    make: Any  # () -> (python value, VariantType)
    last: Any = None
    held: bool = False  # written by a client: the generator no longer drives it


@dataclass
class _Served:
    device: OpcUaDevice
    server: Server
    endpoint: str
    certificate: Path | None
    variables: dict[str, _Var] = field(default_factory=dict)
    read_calls: list[int] = field(default_factory=list)
    diag: dict[str, Node] = field(default_factory=dict)
    writes: int = 0


class _Users(UserManager):
    def __init__(self, users: dict[str, str]) -> None:
        self._users = users

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        if username is not None and self._users.get(username) == password:
            return User(role=UserRole.User, name=username)
        return None


def _free_port(wanted: int) -> int:
    """`wanted` if it can be bound on 127.0.0.1, else a port the OS picks."""
    for port in ([wanted] if wanted else []) + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # As asyncio's server does: a restarted simulator gets its port back even
            # while connections of the previous one linger in TIME_WAIT.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError("no free port")


Rejection = Literal["service_fault", "error_message"]


class _StrictClients(list[Any]):
    """The server's list of connections; each new one (appended right after its message
    processor is made, before any data is read) gets a processor that refuses
    OpenSecureChannel from a client certificate not in `trusted`."""

    def __init__(self, trusted: Path, rejection: Rejection) -> None:
        super().__init__()
        self._trusted = trusted
        self._rejection = rejection
        self.rejected = 0

    def append(self, protocol: Any) -> None:
        processor = protocol.processor
        if processor is not None:
            processor.open_secure_channel = self._strict(processor, protocol.transport)
        super().append(protocol)

    def _strict(self, processor: Any, transport: Any) -> Any:
        original = processor.open_secure_channel

        def open_secure_channel(algohdr: Any, seqhdr: Any, body: Any) -> None:
            der = algohdr.SenderCertificate
            if not der or certs.is_trusted(certs.first_certificate(der), self._trusted):
                original(algohdr, seqhdr, body)
                return
            self.rejected += 1
            code = ua.StatusCode(StatusCodes.BadSecurityChecksFailed)  # type: ignore[arg-type]
            if self._rejection == "error_message":
                err = ua.ErrorMessage(code, "client certificate not trusted")  # type: ignore[arg-type]
                transport.write(uatcp_to_binary(ua.MessageType.Error, err))  # type: ignore[arg-type]
            else:
                request = struct_from_binary(ua.OpenSecureChannelRequest, body)
                # The reply must be secured with the client's key like any OPN reply.
                processor._connection.select_policy(
                    algohdr.SecurityPolicyURI, der, request.Parameters.SecurityMode
                )
                fault = ua.ServiceFault()
                fault.ResponseHeader.ServiceResult = code
                processor.send_response(
                    request.RequestHeader.RequestHandle, seqhdr, fault, ua.MessageType.SecureOpen
                )
            transport.close()

        return open_secure_channel


class OpcUaSimulator:
    """Async context manager serving `devices` (OPC UA devices only) on 127.0.0.1.

    `cert_dir`: where the simulator keeps its own certificate (generated once);
    `max_nodes_per_read`: announce and enforce this OperationLimit (None: asyncua's);
    `update_interval_s`: how often generated values are refreshed;
    `trusted_clients`: accept only client certificates in this directory (strict
    servers, see the module docstring), refused the `rejection` way;
    `read_only`: device name → tags served without write access.
    """

    def __init__(
        self,
        devices: Sequence[OpcUaDevice],
        *,
        cert_dir: str | Path = "pki/simulator",
        max_nodes_per_read: int | None = None,
        update_interval_s: float = 0.1,
        trusted_clients: str | Path | None = None,
        rejection: Rejection = "service_fault",
        read_only: dict[str, set[str]] | None = None,
    ) -> None:
        self._devices = list(devices)
        self._read_only = {k: set(v) for k, v in (read_only or {}).items()}
        self._trusted_clients = Path(trusted_clients) if trusted_clients is not None else None
        self._rejection: Rejection = rejection
        self._cert_dir = Path(cert_dir)
        self._max_nodes_per_read = max_nodes_per_read
        self._interval = update_interval_s
        self._served: dict[str, _Served] = {}
        self._task: asyncio.Task[None] | None = None
        self._start = time.monotonic()

    # ---------------------------------------------------------------- public API

    @property
    def endpoints(self) -> dict[str, str]:
        """Device name → the endpoint URL actually served."""
        return {name: s.endpoint for name, s in self._served.items()}

    def certificate(self, device: str) -> bytes | None:
        """The DER certificate the device's server presents (None without security)."""
        path = self._served[device].certificate
        return path.read_bytes() if path is not None else None

    def rejected_clients(self, device: str) -> int:
        """OpenSecureChannel requests refused for an untrusted client certificate."""
        clients = self._served[device].server.bserver
        listed = clients.clients if clients is not None else None
        return listed.rejected if isinstance(listed, _StrictClients) else 0

    def write_count(self, device: str) -> int:
        """Nodes a client wrote successfully (the Write service) since start."""
        return self._served[device].writes

    def read_calls(self, device: str) -> list[int]:
        """Sizes of the external Read requests served so far, in order."""
        return list(self._served[device].read_calls)

    def subscription_count(self, device: str) -> int:
        """Subscriptions currently alive on the device's server."""
        return len(self._served[device].server.iserver.subscription_service.subscriptions)

    def session_count(self, device: str) -> int:
        """Client sessions currently open on the device's server."""
        return len(self._served[device].server.iserver._external_sessions)

    async def drop_subscriptions(self, device: str) -> int:
        """Delete every subscription on the device's server, as a server that lost them
        would (a restart of its subscription engine, a lifetime expiry it did not
        report): the client gets no error, its Publish requests just stop being
        answered. Returns how many were deleted."""
        service = self._served[device].server.iserver.subscription_service
        ids = list(service.subscriptions)
        await service.delete_subscriptions(ids)
        return len(ids)

    async def set_value(self, device: str, tag: str, value: Any) -> None:
        """Write a tag's value (until its generator next changes it)."""
        var = self._served[device].variables[tag]
        _, vtype = var.make()
        await var.node.write_value(ua.Variant(value, vtype))

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> OpcUaSimulator:
        try:
            for dev in self._devices:
                self._served[dev.name] = await self._start_device(dev)
        except BaseException:
            await self._stop_all()
            raise
        self._start = time.monotonic()
        await self._update()
        self._task = asyncio.create_task(self._run(), name="opcua-simulator-values")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
            self._task = None
        await self._stop_all()

    async def _stop_all(self) -> None:
        served, self._served = self._served, {}
        for s in served.values():
            with contextlib.suppress(Exception):
                await s.server.stop()

    async def _run(self) -> None:
        # At a fixed rate: sleeping a whole interval after each round would make the
        # period interval + round time (10,000 writes take a good part of a second).
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += self._interval
            await asyncio.sleep(max(0.0, due - loop.time()))
            await self._update()
            due = max(due, loop.time() - self._interval)  # overran: skip, do not queue

    async def _update(self) -> None:
        t = time.monotonic() - self._start
        now = datetime.now(UTC)
        for s in self._served.values():
            # Server.write_attribute_value writes the address space directly (no write
            # service request per node): a round of 10,000 changes fits in the 1 s
            # interval, which awaiting Node.write_value per node did not.
            write = s.server.write_attribute_value
            for var in s.variables.values():
                if var.held:
                    continue
                value, vtype = var.make(t)
                if value == var.last:
                    continue
                var.last = value
                await write(
                    var.node.nodeid,
                    ua.DataValue(
                        ua.Variant(value, vtype),
                        SourceTimestamp=now,  # type: ignore[arg-type]
                        ServerTimestamp=now,  # type: ignore[arg-type]
                    ),
                )
            counts = {
                "Sessions": len(s.server.iserver._external_sessions),
                "Subscriptions": len(s.server.iserver.subscription_service.subscriptions),
                "ReadCalls": len(s.read_calls),
            }
            for key, n in counts.items():
                await s.diag[key].write_value(ua.Variant(n, ua.VariantType.UInt32))

    # ------------------------------------------------------------------ building

    async def _start_device(self, dev: OpcUaDevice) -> _Served:
        users: dict[str, str] = {}
        if dev.username is not None and dev.password is not None:
            users[dev.username] = dev.password.get_secret_value()
        server = Server(user_manager=_Users(users) if users else None)
        await server.init()
        url = urlparse(dev.endpoint)
        port = _free_port(url.port or 0)
        endpoint = f"opc.tcp://127.0.0.1:{port}{url.path}"
        server.set_endpoint(endpoint)
        server.set_server_name(f"edge-agent simulator {dev.name}")
        await server.set_application_uri(SIM_APPLICATION_URI)
        mode = dev.resolved_security_mode()
        server.set_security_policy([_POLICY_TYPES[(dev.security_policy, mode)]])
        tokens: list[type] = [ua.UserNameIdentityToken] if users else [ua.AnonymousIdentityToken]
        server.set_identity_tokens(tokens)
        cert_path: Path | None = None
        if dev.security_policy != "None" or users:
            paths = certs.ensure_own_certificate(
                self._cert_dir, SIM_APPLICATION_URI, server=True, host_name="127.0.0.1"
            )
            await server.load_certificate(str(paths.cert))
            await server.load_private_key(str(paths.key))
            cert_path = paths.cert
        served = _Served(dev, server, endpoint, cert_path)
        await self._build(served)
        if self._max_nodes_per_read is not None:
            limit = self._max_nodes_per_read
            await server.write_attribute_value(
                ua.NodeId(ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead),  # type: ignore[arg-type]
                ua.DataValue(ua.Variant(limit, ua.VariantType.UInt32)),
            )

        async def pre_read(event: ServerItemCallback, _dispatcher: Any) -> None:
            if not event.is_external:
                return
            n = len(event.request_params.NodesToRead)
            served.read_calls.append(n)
            if self._max_nodes_per_read is not None and n > self._max_nodes_per_read:
                raise ServiceError(StatusCodes.BadTooManyOperations)

        server.subscribe_server_callback(CallbackType.PreRead, pre_read)
        by_node = {var.node.nodeid: var for var in served.variables.values()}

        async def post_write(event: ServerItemCallback, _dispatcher: Any) -> None:
            if not event.is_external or event.response_params is None:
                return
            for item, result in zip(
                event.request_params.NodesToWrite, event.response_params, strict=False
            ):
                var = by_node.get(item.NodeId)
                if var is not None and result.is_good() and item.AttributeId == AttributeIds.Value:
                    var.held = True
                    served.writes += 1

        server.subscribe_server_callback(CallbackType.PostWrite, post_write)
        await server.start()
        if self._trusted_clients is not None and server.bserver is not None:
            # No connection exists yet: every one will be made with the strict list.
            server.bserver.clients = _StrictClients(self._trusted_clients, self._rejection)
        return served

    async def _ns(self, server: Server, index: int | None, uri: str | None) -> int:
        if uri is not None:
            return int(await server.register_namespace(uri))
        assert index is not None
        names = await server.get_namespace_array()
        while len(names) <= index:
            await server.register_namespace(f"urn:edge-agent:simulator:ns{len(names)}")
            names = await server.get_namespace_array()
        return index

    async def _build(self, s: _Served) -> None:
        server = s.server
        sim_ns = await server.register_namespace(SIM_NAMESPACE)
        sim = await server.nodes.objects.add_object(
            _sid("Simulator", sim_ns), ua.QualifiedName("Simulator", sim_ns)
        )
        for key in ("Sessions", "Subscriptions", "ReadCalls"):
            s.diag[key] = await sim.add_variable(
                _sid(f"Sim.{key}", sim_ns),
                ua.QualifiedName(key, sim_ns),
                ua.Variant(0, ua.VariantType.UInt32),
            )
        device_folder: Node | None = None
        struct_types: dict[str, ua.NodeId] = {}
        for tag in s.device.tags:
            if tag.type == "Structure" and tag.fields:
                dtype, _ = await new_struct(
                    server,
                    sim_ns,
                    _struct_name(s.device, tag),
                    [new_struct_field(n, _VARIANT[t]) for n, t in tag.fields.items()],
                )
                struct_types[tag.name] = dtype.nodeid
        if struct_types:
            await server.load_data_type_definitions()
        by_id = sum(1 for tag in s.device.tags if tag.node_id is not None)
        parts: dict[int, Node] = {}
        n_id = 0
        for i, tag in enumerate(s.device.tags):
            if tag.node_id is not None:
                parsed = parse_node_id(tag.node_id)
                idx = await self._ns(server, parsed.ns_index, parsed.ns_uri)
                if device_folder is None:
                    device_folder = await server.nodes.objects.add_folder(
                        _sid(f"Sim.{s.device.name}", sim_ns),
                        ua.QualifiedName(s.device.name, sim_ns),
                    )
                parent = device_folder
                if by_id > FOLDER_CHILDREN:
                    # asyncua checks every new node against all its siblings' references,
                    # so one folder of 10,000 variables takes minutes to build; folders of
                    # FOLDER_CHILDREN keep it linear (node ids are what clients use).
                    part = n_id // FOLDER_CHILDREN
                    if part not in parts:
                        parts[part] = await device_folder.add_folder(
                            _sid(f"Sim.{s.device.name}.part{part:03d}", sim_ns),
                            ua.QualifiedName(f"part{part:03d}", sim_ns),
                        )
                    parent = parts[part]
                n_id += 1
                nodeid = ua.NodeId.from_string(parsed.with_index(idx))
                bname = ua.QualifiedName(tag.name, idx)
            else:
                assert tag.browse_path is not None
                elements = parse_browse_path(tag.browse_path)
                if elements and elements[0].name == "Root":
                    elements = elements[1:]
                if not elements or elements[0].name != "Objects" or len(elements) < 2:
                    raise ValueError(
                        f"tag {tag.name}: the simulator serves browse paths under 0:Objects"
                    )
                parent = server.nodes.objects
                prefix = ""
                for el in elements[1:-1]:
                    idx = await self._ns(server, el.ns_index, el.ns_uri)
                    prefix += f"{el.name}."
                    child = await _child(parent, idx, el.name)
                    if child is None:
                        child = await parent.add_object(
                            _sid(f"Sim.{prefix[:-1]}", idx), ua.QualifiedName(el.name, idx)
                        )
                    parent = child
                last = elements[-1]
                idx = await self._ns(server, last.ns_index, last.ns_uri)
                nodeid = _sid(f"{prefix}{last.name}", idx)
                bname = ua.QualifiedName(last.name, idx)
            make = self._maker(s.device, tag, i)
            value, vtype = make(0.0)
            if tag.type == "Structure":
                node = await parent.add_variable(
                    nodeid, bname, ua.Variant(value, vtype), datatype=struct_types[tag.name]
                )
            else:
                node = await parent.add_variable(nodeid, bname, ua.Variant(value, vtype))
            if tag.name not in self._read_only.get(s.device.name, set()):
                await node.set_writable()
            s.variables[tag.name] = _Var(tag, node, make)

    def _maker(self, dev: OpcUaDevice, tag: OpcUaTag, seed: int) -> Any:
        if tag.type == "Structure":
            assert tag.fields is not None
            gens = {
                n: (t, _scalar_generator(tag, t, seed + k))
                for k, (n, t) in enumerate(tag.fields.items())
            }
            cls_name = _struct_name(dev, tag)

            def make_struct(t: float = 0.0) -> tuple[Any, ua.VariantType]:
                cls = getattr(ua, cls_name)
                return (
                    cls(**{n: _to_ua(ft, g(t)) for n, (ft, g) in gens.items()}),
                    ua.VariantType.ExtensionObject,
                )

            return make_struct
        t_name: ScalarTypeName = tag.type
        gen = _scalar_generator(tag, t_name, seed)
        vtype = _VARIANT[t_name]
        length = tag.array_length

        def make(t: float = 0.0) -> tuple[Any, ua.VariantType]:
            v = gen(t)
            if length is None:
                return _to_ua(t_name, v), vtype
            return [_to_ua(t_name, _shift(v, k, t_name)) for k in range(length)], vtype

        return make


FOLDER_CHILDREN = 100
"""Node-id tags per simulator folder, when a device has more than this many."""


def _sid(name: str, ns: int) -> ua.NodeId:
    # asyncua annotates NodeId parts with its own Int16/String classes; build from text.
    return ua.NodeId.from_string(f"ns={ns};s={name}")


def _struct_name(dev: OpcUaDevice, tag: OpcUaTag) -> str:
    return f"{dev.name}_{tag.name}_Type".replace("-", "_").replace(".", "_")


def _shift(v: Scalar, k: int, t: ScalarTypeName) -> Scalar:
    """Array element k: the generated value offset by k, within the type's range."""
    if isinstance(v, bool):
        return v if k % 2 == 0 else not v
    if isinstance(v, int):
        lo, hi = _INT_RANGE.get(t, (-(2**63), 2**63 - 1))
        return int(min(max(v + k, lo), hi))
    if isinstance(v, float):
        return v + k
    return f"{v}{k}"


async def _child(parent: Node, ns: int, name: str) -> Node | None:
    for child in await parent.get_children():
        bn = await child.read_browse_name()
        if bn.Name == name and bn.NamespaceIndex == ns:
            return child
    return None


# ------------------------------------------------------------------------- process


def load_devices(path: str | Path) -> list[OpcUaDevice]:
    """The OPC UA devices of an agent config file (only those are validated here)."""
    from agent.yamlsafe import load_yaml

    data, _, problems = load_yaml(Path(path).read_text(encoding="utf-8"))
    if problems:
        raise ValueError("; ".join(f"line {p.line}: {p.message}" for p in problems))
    devices = data.get("devices", []) if isinstance(data, dict) else []
    return [
        OpcUaDevice.model_validate(d)
        for d in devices
        if isinstance(d, dict) and d.get("protocol") == "opcua"
    ]


async def _serve(args: argparse.Namespace) -> int:
    devices = load_devices(args.config)
    if not devices:
        print(f"{args.config}: no OPC UA devices", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with OpcUaSimulator(
        devices,
        cert_dir=args.cert_dir,
        max_nodes_per_read=args.max_nodes_per_read,
        trusted_clients=args.trusted_clients,
    ) as sim:
        for name, url in sim.endpoints.items():
            cert = sim._served[name].certificate
            line = {"device": name, "endpoint": url, "certificate": str(cert) if cert else None}
            print(json.dumps(line), flush=True)
        await stop.wait()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m drivers.opcua.simulator CONFIG`: serve until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m drivers.opcua.simulator")
    parser.add_argument("config", help="agent config file (its OPC UA devices are served)")
    parser.add_argument("--cert-dir", default="pki/simulator", help="simulator certificate dir")
    parser.add_argument("--max-nodes-per-read", type=int, default=None)
    parser.add_argument(
        "--trusted-clients",
        default=None,
        help="strict: accept only client certificates in this directory",
    )
    return asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
