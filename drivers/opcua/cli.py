"""`edge-agent opcua ...`: browse a server, show our certificate, trust a server.

`add_opcua_commands(subparsers)` registers the commands; each sets `func`, a callable
taking the parsed arguments and returning the exit code. asyncua is imported only when
a command runs.

Every command takes its settings either from options or from a device of a config file
(`--config FILE --device NAME`: endpoint, cert_dir, application_uri, security policy and
mode, server certificate pin, user name and password, with the file's `${VAR}`
interpolation). An option given as well overrides the config's value.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from drivers.opcua.config import OpcUaDevice

DEFAULT_CERT_DIR = "pki"
DEFAULT_APPLICATION_URI = "urn:edge-agent:opcua-client"
DEFAULT_SECURITY_POLICY = "None"


def add_opcua_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register `opcua browse`, `opcua cert` and `opcua trust`."""
    opcua = subparsers.add_parser("opcua", help="OPC UA tools: browse, cert, trust")
    sub = opcua.add_subparsers(dest="opcua_command", required=True)

    b = sub.add_parser("browse", help="list the variables of a server")
    b.add_argument("endpoint", nargs="?", help="opc.tcp://host:port[/path] (or --config)")
    b.add_argument("--root", default="i=85", help="node id to start from (default Objects)")
    b.add_argument("--depth", type=int, default=3, help="levels to descend (default 3)")
    b.add_argument("--format", choices=("table", "yaml"), default="table")
    _config_args(b)
    _security_args(b)
    b.set_defaults(func=_browse)

    c = sub.add_parser("cert", help="show (and generate if missing) our client certificate")
    _config_args(c)
    c.add_argument(
        "--cert-dir", default=None, help=f"default: the config's, else {DEFAULT_CERT_DIR}"
    )
    c.add_argument("--application-uri", default=None)
    c.set_defaults(func=_cert)

    t = sub.add_parser("trust", help="fetch a server's certificate and trust it")
    t.add_argument("endpoint", nargs="?", help="opc.tcp://host:port[/path] (or --config)")
    _config_args(t)
    t.add_argument(
        "--cert-dir", default=None, help=f"default: the config's, else {DEFAULT_CERT_DIR}"
    )
    t.set_defaults(func=_trust)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="take the settings from this config file")
    p.add_argument(
        "--device", default=None, help="the OPC UA device of --config (needed if it has several)"
    )


def _security_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cert-dir", default=None, help=f"default: the config's, else {DEFAULT_CERT_DIR}"
    )
    p.add_argument(
        "--security-policy",
        default=None,
        choices=("None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"),
    )
    p.add_argument("--security-mode", choices=("Sign", "SignAndEncrypt"), default=None)
    p.add_argument("--username", default=None)
    p.add_argument(
        "--password-env", default=None, help="name of the environment variable with the password"
    )
    p.add_argument("--application-uri", default=None)


class _Refused(Exception):
    """A command line that cannot work: the message is printed, the exit code is 2."""


@dataclass
class _Settings:
    """What a command uses, from options over the config's device over the defaults."""

    endpoint: str | None = None
    cert_dir: str = DEFAULT_CERT_DIR
    application_uri: str = DEFAULT_APPLICATION_URI
    security_policy: str = DEFAULT_SECURITY_POLICY
    security_mode: str | None = None
    username: str | None = None
    password: str | None = None
    server_certificate_thumbprint: str | None = None
    timeout_s: float | None = None


def config_device(path: str, name: str | None) -> OpcUaDevice:
    """The OPC UA device `name` of a config file (the only one, when name is None).
    Raises _Refused with the config's problems or what is missing."""
    from agent.config import ConfigError, load_config
    from drivers.opcua.config import OpcUaDevice

    try:
        config = load_config(path)
    except ConfigError as exc:
        raise _Refused("\n".join(exc.problems)) from None
    devices = [d for d in config.devices if isinstance(d, OpcUaDevice)]
    names = ", ".join(d.name for d in devices) or "none"
    if name is None:
        if len(devices) == 1:
            return devices[0]
        raise _Refused(
            f"{path} has {len(devices)} OPC UA devices ({names}); choose one with --device"
        )
    for d in devices:
        if d.name == name:
            return d
    raise _Refused(f"{path} has no OPC UA device named {name!r}; its OPC UA devices: {names}")


def _settings(args: argparse.Namespace) -> _Settings:
    out = _Settings()
    config = getattr(args, "config", None)
    if config is None and getattr(args, "device", None) is not None:
        raise _Refused("--device needs --config FILE")
    if config is not None:
        dev = config_device(config, args.device)
        out = _Settings(
            endpoint=dev.endpoint,
            cert_dir=dev.cert_dir,
            application_uri=dev.application_uri,
            security_policy=dev.security_policy,
            security_mode=dev.security_mode,
            username=dev.username,
            password=dev.password.get_secret_value() if dev.password is not None else None,
            server_certificate_thumbprint=dev.server_certificate_thumbprint,
            timeout_s=dev.timeout_s,
        )
    for key in ("endpoint", "cert_dir", "application_uri", "security_policy", "security_mode"):
        value = getattr(args, key, None)
        if value is not None:
            setattr(out, key, value)
    if getattr(args, "username", None) is not None:
        out.username = args.username
        out.password = None  # a user given here needs its password given here too
    password_env = getattr(args, "password_env", None)
    if password_env is not None:
        import os

        out.password = os.environ.get(password_env)
        if out.password is None:
            raise _Refused(f"--password-env {password_env}: that variable is not set")
    if out.username is not None and out.password is None:
        raise _Refused("--username needs --password-env NAME (the password is never an argument)")
    return out


def _run(name: str, args: argparse.Namespace, body: Any) -> int:
    try:
        settings = _settings(args)
        return int(body(settings))
    except _Refused as exc:
        print(f"opcua {name}: {exc}", file=sys.stderr)
        return 2


def _need_endpoint(s: _Settings) -> str:
    if s.endpoint is None:
        raise _Refused("give an ENDPOINT, or --config FILE [--device NAME]")
    return s.endpoint


def _browse(args: argparse.Namespace) -> int:
    return _run("browse", args, lambda s: _browse_with(args, s))


def _browse_with(args: argparse.Namespace, s: _Settings) -> int:
    from drivers.base import DriverError
    from drivers.opcua.browse import browse, to_table, to_yaml

    endpoint = _need_endpoint(s)
    try:
        found = asyncio.run(
            browse(
                endpoint,
                root=args.root,
                depth=args.depth,
                cert_dir=s.cert_dir,
                security_policy=s.security_policy,
                security_mode=s.security_mode,
                username=s.username,
                password=s.password,
                application_uri=s.application_uri,
                server_certificate_thumbprint=s.server_certificate_thumbprint,
                timeout_s=s.timeout_s,
                progress=_TerminalProgress() if sys.stderr.isatty() else None,
            )
        )
    except DriverError as exc:
        _clear_progress()
        print(f"opcua browse: {exc}", file=sys.stderr)
        return 1
    _clear_progress()
    print(to_yaml(found) if args.format == "yaml" else to_table(found))
    return 0


class _TerminalProgress:
    """`browsing: N nodes, M variables` on one terminal line, at most 10 updates a second."""

    def __init__(self) -> None:
        self._last = 0.0

    def __call__(self, nodes: int, variables: int) -> None:
        import time

        now = time.monotonic()
        if now - self._last >= 0.1:
            self._last = now
            sys.stderr.write(f"\rbrowsing: {nodes} nodes, {variables} variables ")
            sys.stderr.flush()


def _clear_progress() -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()


def _cert(args: argparse.Namespace) -> int:
    return _run("cert", args, _cert_with)


def _cert_with(s: _Settings) -> int:
    from drivers.base import DriverError
    from drivers.opcua import certs

    try:
        paths = certs.ensure_own_certificate(s.cert_dir, s.application_uri)
    except DriverError as exc:
        print(f"opcua cert: {exc}", file=sys.stderr)
        return 1
    der = paths.cert.read_bytes()
    print(f"certificate: {paths.cert}")
    print(f"application uri: {certs.application_uri_of(der)}")
    print(f"sha1: {certs.sha1_thumbprint(der)}")
    print(f"sha256: {certs.sha256_thumbprint(der)}")
    print(f"trusted server certificates: {paths.trusted}")
    return 0


def _trust(args: argparse.Namespace) -> int:
    return _run("trust", args, _trust_with)


def _trust_with(s: _Settings) -> int:
    from drivers.opcua import certs

    endpoint = _need_endpoint(s)
    try:
        ders = asyncio.run(_server_certificates(endpoint))
    except (OSError, TimeoutError) as exc:
        print(f"opcua trust: cannot reach {endpoint}: {exc}", file=sys.stderr)
        return 1
    if not ders:
        print(f"opcua trust: {endpoint} presents no certificate", file=sys.stderr)
        return 1
    trusted = certs.CertPaths(Path(s.cert_dir)).trusted
    for der in ders:
        path = certs.trust_certificate(der, trusted)
        print(f"trusted {path}")
        print(f"  sha1: {certs.sha1_thumbprint(der)}")
        print(f"  sha256: {certs.sha256_thumbprint(der)}")
    print("compare the thumbprint with the one the server shows before relying on it")
    return 0


async def _server_certificates(endpoint: str) -> list[bytes]:
    from asyncua.client.client import Client

    from drivers.opcua import certs

    client = Client(endpoint, timeout=5)
    found: list[bytes] = []
    for ep in await client.connect_and_get_server_endpoints():
        if ep.ServerCertificate:
            der = certs.first_certificate(ep.ServerCertificate)
            if der not in found:
                found.append(der)
    return found
