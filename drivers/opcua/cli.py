"""`edge-agent opcua ...`: browse a server, show our certificate, trust a server.

`add_opcua_commands(subparsers)` registers the commands; each sets `func`, a callable
taking the parsed arguments and returning the exit code. asyncua is imported only when
a command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

DEFAULT_CERT_DIR = "pki"
DEFAULT_APPLICATION_URI = "urn:edge-agent:opcua-client"


def add_opcua_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register `opcua browse`, `opcua cert` and `opcua trust`."""
    opcua = subparsers.add_parser("opcua", help="OPC UA tools: browse, cert, trust")
    sub = opcua.add_subparsers(dest="opcua_command", required=True)

    b = sub.add_parser("browse", help="list the variables of a server")
    b.add_argument("endpoint", help="opc.tcp://host:port[/path]")
    b.add_argument("--root", default="i=85", help="node id to start from (default Objects)")
    b.add_argument("--depth", type=int, default=3, help="levels to descend (default 3)")
    b.add_argument("--format", choices=("table", "yaml"), default="table")
    _security_args(b)
    b.set_defaults(func=_browse)

    c = sub.add_parser("cert", help="show (and generate if missing) our client certificate")
    c.add_argument("--cert-dir", default=DEFAULT_CERT_DIR)
    c.add_argument("--application-uri", default=DEFAULT_APPLICATION_URI)
    c.set_defaults(func=_cert)

    t = sub.add_parser("trust", help="fetch a server's certificate and trust it")
    t.add_argument("endpoint", help="opc.tcp://host:port[/path]")
    t.add_argument("--cert-dir", default=DEFAULT_CERT_DIR)
    t.set_defaults(func=_trust)


def _security_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cert-dir", default=DEFAULT_CERT_DIR)
    p.add_argument(
        "--security-policy",
        default="None",
        choices=("None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"),
    )
    p.add_argument("--security-mode", choices=("Sign", "SignAndEncrypt"), default=None)
    p.add_argument("--username", default=None)
    p.add_argument(
        "--password-env", default=None, help="name of the environment variable with the password"
    )
    p.add_argument("--application-uri", default=DEFAULT_APPLICATION_URI)


def _browse(args: argparse.Namespace) -> int:
    import os

    from drivers.base import DriverError
    from drivers.opcua.browse import browse, to_table, to_yaml

    password = os.environ.get(args.password_env) if args.password_env else None
    if args.username and password is None:
        print(
            "--username needs --password-env NAME (the password is never an argument)",
            file=sys.stderr,
        )
        return 2
    try:
        found = asyncio.run(
            browse(
                args.endpoint,
                root=args.root,
                depth=args.depth,
                cert_dir=args.cert_dir,
                security_policy=args.security_policy,
                security_mode=args.security_mode,
                username=args.username,
                password=password,
                application_uri=args.application_uri,
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
    from drivers.base import DriverError
    from drivers.opcua import certs

    try:
        paths = certs.ensure_own_certificate(args.cert_dir, args.application_uri)
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
    from drivers.opcua import certs

    try:
        ders = asyncio.run(_server_certificates(args.endpoint))
    except (OSError, TimeoutError) as exc:
        print(f"opcua trust: cannot reach {args.endpoint}: {exc}", file=sys.stderr)
        return 1
    if not ders:
        print(f"opcua trust: {args.endpoint} presents no certificate", file=sys.stderr)
        return 1
    trusted = certs.CertPaths(Path(args.cert_dir)).trusted
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
