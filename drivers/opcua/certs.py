"""Certificates of OPC UA applications: our own instance certificate, and trust of servers.

Layout of a certificate directory (`cert_dir` in the device config)::

    <cert_dir>/own/cert.der          this client's application instance certificate
    <cert_dir>/own/private/key.pem   its private key (mode 0600)
    <cert_dir>/trusted/*.der         server certificates the operator trusts

The client certificate is generated once, with the ApplicationUri in its SubjectAltName,
and then kept: servers trust it by its thumbprint, so regenerating it silently would
break every server that trusted it. If the stored one does not carry the configured
ApplicationUri we refuse, rather than replace it.

asyncua does not check a server certificate against anything unless told to (see
docs/library-notes.md), so the trust decision is ours: a server certificate is trusted when an
identical certificate is in `trusted/`, or when its SHA-1 or SHA-256 thumbprint equals
the pinned `server_certificate_thumbprint`.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from drivers.base import DriverConfigError


@dataclass(frozen=True, slots=True)
class CertPaths:
    """Where a certificate directory keeps its files."""

    root: Path

    @property
    def cert(self) -> Path:
        return self.root / "own" / "cert.der"

    @property
    def key(self) -> Path:
        return self.root / "own" / "private" / "key.pem"

    @property
    def trusted(self) -> Path:
        return self.root / "trusted"


def sha1_thumbprint(der: bytes) -> str:
    """Lower-case hex SHA-1 of a DER certificate (what most OPC UA tools show)."""
    return hashlib.sha1(der, usedforsecurity=False).hexdigest()


def sha256_thumbprint(der: bytes) -> str:
    """Lower-case hex SHA-256 of a DER certificate."""
    return hashlib.sha256(der).hexdigest()


def first_certificate(data: bytes) -> bytes:
    """The leaf certificate of a DER blob that may hold a whole chain."""
    cert = x509.load_der_x509_certificate(_first_der(data))
    return cert.public_bytes(serialization.Encoding.DER)


def _first_der(data: bytes) -> bytes:
    # A DER SEQUENCE: 0x30, then the length (short or long form).
    if len(data) < 2 or data[0] != 0x30:
        return data
    first = data[1]
    if first < 0x80:
        return data[: 2 + first]
    n = first & 0x7F
    length = int.from_bytes(data[2 : 2 + n], "big")
    return data[: 2 + n + length]


def application_uri_of(der: bytes) -> str | None:
    """The URI in a certificate's SubjectAltName, if any."""
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def ensure_own_certificate(
    cert_dir: str | Path,
    application_uri: str,
    *,
    server: bool = False,
    host_name: str | None = None,
) -> CertPaths:
    """Return the certificate directory, generating its instance certificate the first time.

    `server=True` makes a certificate for a server (the simulator). Raises
    DriverConfigError when a stored certificate names another ApplicationUri.
    """
    paths = CertPaths(Path(cert_dir))
    paths.trusted.mkdir(parents=True, exist_ok=True)
    if paths.cert.is_file() and paths.key.is_file():
        uri = application_uri_of(paths.cert.read_bytes())
        if uri != application_uri:
            raise DriverConfigError(
                "certificate application uri mismatch",
                f"{paths.cert} carries ApplicationUri {uri!r} but the config says "
                f"{application_uri!r}; set application_uri to {uri!r}, or move the "
                "directory away to generate a new certificate (servers must then trust "
                "the new one)",
            )
        return paths
    # Deferred: asyncua is only imported when a certificate really has to be made.
    from asyncua.crypto import cert_gen

    paths.key.parent.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    host = host_name or socket.gethostname()
    usage = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = cert_gen.generate_self_signed_app_certificate(
        key,
        application_uri,
        {},
        [x509.UniformResourceIdentifier(application_uri), x509.DNSName(host)],
        extended=usage,
        days=3650,
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(paths.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    return paths


def trusted_certificates(trust_dir: str | Path) -> list[bytes]:
    """Every certificate in a trust directory (.der, .pem or .crt), as DER."""
    out: list[bytes] = []
    root = Path(trust_dir)
    if not root.is_dir():
        return out
    for p in sorted(root.iterdir()):
        if p.suffix.lower() not in (".der", ".pem", ".crt", ".cer"):
            continue
        data = p.read_bytes()
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                cert = x509.load_pem_x509_certificate(data)
            else:
                cert = x509.load_der_x509_certificate(data)
        except ValueError:
            continue  # not a certificate: it cannot make anything trusted
        out.append(cert.public_bytes(serialization.Encoding.DER))
    return out


def is_trusted(der: bytes, trust_dir: str | Path, pinned_thumbprint: str | None = None) -> bool:
    """True when `der` is in the trust directory or matches the pinned thumbprint."""
    if pinned_thumbprint is not None and pinned_thumbprint.lower() in (
        sha1_thumbprint(der),
        sha256_thumbprint(der),
    ):
        return True
    return der in trusted_certificates(trust_dir)


def trust_certificate(der: bytes, trust_dir: str | Path) -> Path:
    """Copy a certificate into the trust directory (named by its thumbprint)."""
    root = Path(trust_dir)
    root.mkdir(parents=True, exist_ok=True)
    cert = x509.load_der_x509_certificate(der)
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    label = "".join(c if c.isalnum() else "_" for c in (str(cn[0].value) if cn else "server"))
    path = root / f"{label[:40]}_{sha1_thumbprint(der)}.der"
    path.write_bytes(der)
    return path


def untrusted_error(
    der: bytes, endpoint: str, trust_dir: str | Path, cert_dir: str | Path | None = None
) -> DriverConfigError:
    """The error telling an operator which certificate was refused and how to trust it
    (the trust command names `cert_dir`, the device's certificate directory)."""
    command = f"edge-agent opcua trust {shlex.quote(endpoint)}"
    if cert_dir is not None:
        command += f" --cert-dir {shlex.quote(str(cert_dir))}"
    return DriverConfigError(
        "untrusted server certificate",
        f"{endpoint} presented a certificate with SHA-1 thumbprint {sha1_thumbprint(der)} "
        f"(SHA-256 {sha256_thumbprint(der)}) that is not in {trust_dir}; after checking the "
        f"thumbprint on the server, trust it with `{command}` or set "
        "server_certificate_thumbprint",
    )
