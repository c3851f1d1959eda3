"""A throw-away PKI for TLS tests: a CA, server and client certificates, and bad variants.

    pki = TestPki.create(tmp_path)          # writes PEM files, keys mode 0600
    pki.ca, pki.server_cert, pki.server_key, pki.client_cert, pki.client_key
    pki.other_ca                            # a CA nobody trusts
    pki.expired_client_cert / _key          # signed by the CA, expired yesterday
    pki.rogue_client_cert / _key            # signed by other_ca
    pki.wrong_host_server_cert / _key       # valid, but only for 'elsewhere.invalid'
    pki.expired_server_cert / _key

Keys are EC P-256: fast to generate, accepted by every TLS 1.2/1.3 stack.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_DAY = dt.timedelta(days=1)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass(frozen=True)
class _Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _ca(cn: str) -> _Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + 30 * _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _Issued(cert, key)


def _leaf(
    ca: _Issued,
    cn: str,
    *,
    server: bool,
    names: tuple[str, ...] = (),
    expired: bool = False,
) -> _Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    before, after = (now - 10 * _DAY, now - _DAY) if expired else (now - _DAY, now + 30 * _DAY)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(before)
        .not_valid_after(after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if names:
        alt: list[x509.GeneralName] = []
        for n in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                alt.append(x509.DNSName(n))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return _Issued(builder.sign(ca.key, hashes.SHA256()), key)


def _write(directory: Path, stem: str, issued: _Issued) -> tuple[Path, Path]:
    cert = directory / f"{stem}.pem"
    key = directory / f"{stem}.key"
    cert.write_bytes(issued.cert.public_bytes(serialization.Encoding.PEM))
    key.touch(mode=0o600)
    key.chmod(0o600)
    key.write_bytes(
        issued.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key


@dataclass(frozen=True)
class TestPki:
    """Paths of the PEM files (see the module docstring)."""

    __test__ = False  # not a pytest test class

    directory: Path
    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    expired_client_cert: Path
    expired_client_key: Path
    rogue_client_cert: Path
    rogue_client_key: Path
    wrong_host_server_cert: Path
    wrong_host_server_key: Path
    expired_server_cert: Path
    expired_server_key: Path

    @classmethod
    def create(
        cls, directory: Path, *, host_names: tuple[str, ...] = ("127.0.0.1", "localhost")
    ) -> TestPki:
        directory.mkdir(parents=True, exist_ok=True)
        ca = _ca("edge-agent test CA")
        other = _ca("untrusted test CA")
        ca_path = directory / "ca.pem"
        ca_path.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
        other_path = directory / "other-ca.pem"
        other_path.write_bytes(other.cert.public_bytes(serialization.Encoding.PEM))
        server = _write(directory, "server", _leaf(ca, "broker", server=True, names=host_names))
        client = _write(directory, "client", _leaf(ca, "gateway-1", server=False))
        expired_client = _write(
            directory, "client-expired", _leaf(ca, "gateway-1", server=False, expired=True)
        )
        rogue = _write(directory, "client-rogue", _leaf(other, "gateway-1", server=False))
        wrong_host = _write(
            directory,
            "server-wrong-host",
            _leaf(ca, "broker", server=True, names=("elsewhere.invalid",)),
        )
        expired_server = _write(
            directory,
            "server-expired",
            _leaf(ca, "broker", server=True, names=host_names, expired=True),
        )
        return cls(
            directory,
            ca_path,
            other_path,
            *server,
            *client,
            *expired_client,
            *rogue,
            *wrong_host,
            *expired_server,
        )


def encrypt_key(key_path: Path, out: Path, passphrase: str) -> Path:
    """Write `key_path`'s key to `out` encrypted with `passphrase` (PKCS#8, mode 0600)."""
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    out.touch(mode=0o600)
    out.chmod(0o600)
    out.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase.encode()),
        )
    )
    return out
