"""TLS for the MQTT connection: the SSL context, and failures in words an operator acts on.

The context is built by us, not by paho's ``tls_set``, so that every setting is explicit:
certificate verification and hostname check always on (there is no "insecure" switch),
TLS 1.2 or newer, the client certificate and key for mutual TLS, optional ALPN.

Every problem becomes one short sentence that names the file or the broker and says what
to check; the publisher logs it once and retries with backoff. A TLS failure never leads
to a plaintext attempt. The key passphrase is read when the context is built and handed
straight to ``load_cert_chain``; it is never stored, logged or put in an exception.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import stat
from typing import Any

from agent.config import MqttTls

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

# OpenSSL alert/reason names → what the operator should read. Matched as substrings of
# the lower-cased error text because Python exposes them only there for alerts raised
# after the handshake (TLS 1.3 sends the client-certificate verdict with the first read).
_ALERTS: tuple[tuple[str, str], ...] = (
    (
        "certificate required",
        "the broker requires a client certificate (set tls.cert_file and tls.key_file)",
    ),
    ("certificate expired", "the broker rejected our client certificate: it has expired"),
    ("unknown ca", "the broker rejected our client certificate: signed by a CA it does not trust"),
    ("bad certificate", "the broker rejected our client certificate"),
    ("certificate unknown", "the broker rejected our client certificate"),
    ("protocol version", "no TLS version in common with the broker (tls.min_version)"),
    ("wrong version number", "the broker did not answer with TLS (plain MQTT port?)"),
    ("handshake failure", "TLS handshake refused by the broker (no common cipher or ALPN)"),
    (
        "eof occurred in violation of protocol",
        "the broker closed the TLS connection during "
        "setup (if it requires client certificates, it may have rejected ours: see its log)",
    ),
    ("no application protocol", "the broker accepts none of the ALPN protocols in tls.alpn"),
)


#: The reason for a TLS connection the broker just closed: it says less than an alert, and
#: the same refusal sometimes shows as an alert, sometimes as this (a race between the
#: broker's alert and its close), so the publisher does not log it over a precise reason.
VAGUE_CLOSE = _ALERTS[-2][1]


class TlsSetupError(Exception):
    """The TLS settings cannot be used as they are (file missing, unreadable, unsafe)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_key_file(path: str) -> None:
    """Refuse a private key that group or others may read (as ssh does): a copy of it
    lets anyone impersonate this gateway."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise TlsSetupError(f"tls.key_file {path}: {exc.strerror or exc}") from None
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TlsSetupError(
            f"tls.key_file {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
        )


class TrackingContext(ssl.SSLContext):
    """An SSLContext that remembers the sockets it wrapped, so that a failed handshake
    inside paho's connect() (which then drops the wrapped socket unclosed) can be
    cleaned up by the caller with `close_wrapped()`."""

    wrapped: list[ssl.SSLSocket]

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock = super().wrap_socket(*args, **kwargs)
        if not hasattr(self, "wrapped"):
            self.wrapped = []
        self.wrapped.append(sock)
        return sock

    def close_wrapped(self) -> None:
        for sock in getattr(self, "wrapped", []):
            with contextlib.suppress(OSError):
                sock.close()
        self.wrapped = []


def ssl_context(tls: MqttTls) -> TrackingContext:
    """The client context for `tls`. Raises TlsSetupError with a sentence to log."""
    ctx = TrackingContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls.ca_file is None:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = _VERSIONS[tls.min_version]
    if tls.ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=tls.ca_file)
        except FileNotFoundError:
            raise TlsSetupError(f"tls.ca_file {tls.ca_file}: no such file") from None
        except OSError as exc:
            raise TlsSetupError(f"tls.ca_file {tls.ca_file}: {exc.strerror or exc}") from None
        except ssl.SSLError:
            raise TlsSetupError(
                f"tls.ca_file {tls.ca_file}: not a PEM file of CA certificates"
            ) from None
    if tls.cert_file is not None and tls.key_file is not None:
        check_key_file(tls.key_file)
        try:
            password = tls.resolved_key_password()
        except OSError as exc:
            raise TlsSetupError(
                f"tls.key_password_file {tls.key_password_file}: {exc.strerror or exc}"
            ) from None
        try:
            ctx.load_cert_chain(tls.cert_file, tls.key_file, password=password)
        except FileNotFoundError as exc:
            raise TlsSetupError(f"{exc.filename or tls.cert_file}: no such file") from None
        except ssl.SSLError as exc:
            raise TlsSetupError(_key_problem(tls, exc)) from None
        except OSError as exc:
            raise TlsSetupError(f"tls.cert_file/key_file: {exc.strerror or exc}") from None
        finally:
            password = None
    if tls.alpn:
        ctx.set_alpn_protocols(tls.alpn)
    return ctx


def _key_problem(tls: MqttTls, exc: ssl.SSLError) -> str:
    text = str(exc).lower()
    # OpenSSL reports a wrong passphrase only as "PEM lib": look at the key itself.
    try:
        with open(str(tls.key_file), "rb") as f:
            encrypted = b"ENCRYPTED" in f.read(4096)
    except OSError:
        encrypted = False
    if encrypted or "bad decrypt" in text:
        return f"tls.key_file {tls.key_file}: wrong or missing passphrase"
    if "key values mismatch" in text:
        return f"tls.key_file {tls.key_file} does not belong to tls.cert_file {tls.cert_file}"
    return (
        f"tls.cert_file {tls.cert_file} / key_file {tls.key_file}: cannot load "
        f"({exc.reason or 'not PEM'})"
    )


def describe(exc: BaseException, host: str) -> str:
    """One sentence for a TLS failure while connecting to `host`."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = (exc.verify_message or str(exc)).lower()
        if "hostname mismatch" in message or "ip address mismatch" in message:
            return (
                f"the broker's certificate is not valid for {host!r} (hostname check "
                "failed; connect with a name the certificate lists)"
            )
        if "expired" in message:
            return "the broker's certificate has expired"
        if "not yet valid" in message:
            return "the broker's certificate is not yet valid (check the clock)"
        if "self-signed" in message or "local issuer" in message or "unable to get" in message:
            return (
                "the broker's certificate is not signed by a trusted CA "
                f"({exc.verify_message}; check tls.ca_file)"
            )
        return f"the broker's certificate was refused: {exc.verify_message or exc}"
    return describe_text(str(exc))


def describe_text(text: str) -> str:
    """One sentence for an SSL error known only by its text (e.g. from paho's log)."""
    lowered = text.lower()
    for needle, sentence in _ALERTS:
        if needle in lowered:
            return sentence
    return f"TLS error: {text}"


__all__ = [
    "TlsSetupError",
    "TrackingContext",
    "check_key_file",
    "describe",
    "describe_text",
    "ssl_context",
]
