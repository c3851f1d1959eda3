"""Optional HMAC-SHA256 signatures on command requests, with a timestamp window.

The signer computes ``HMAC-SHA256(key, hex(correlation data) + "\\n" + payload)`` over the
exact payload bytes it publishes and sends the hex digest as the MQTT 5 user property
``signature``. The payload's ``ts`` (the time it was sent) must lie within `window_s` of
the agent's clock. Together with the idempotency by correlation id this means a captured
request is never carried out twice: replayed within the window it gets its first result
again (marked duplicate); replayed later it is refused as expired; altered in any byte,
or given another correlation id, its signature no longer matches.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

from agent.command.guards import Refusal

SIGNATURE_PROPERTY = "signature"


class KeyProblem(Exception):
    """The key file cannot serve as a signing key."""


def read_key(path: str | Path) -> bytes:
    """The key's bytes (one trailing newline dropped). Raises KeyProblem."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
        data = p.read_bytes()
    except OSError as exc:
        raise KeyProblem(f"cannot read {path}: {exc.strerror or exc}") from None
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyProblem(f"{path} is readable by group or others; chmod 600 {path}")
    if data.endswith(b"\n"):
        data = data[:-1]
        if data.endswith(b"\r"):
            data = data[:-1]
    if len(data) < 16:
        raise KeyProblem(f"{path} holds {len(data)} bytes; a key needs at least 16")
    return data


def signing_input(correlation: bytes, payload: bytes) -> bytes:
    return correlation.hex().encode("ascii") + b"\n" + payload


def sign(key: bytes, correlation: bytes, payload: bytes) -> str:
    """The signature a sender puts in the `signature` user property."""
    return hmac.new(key, signing_input(correlation, payload), hashlib.sha256).hexdigest()


def signature_refusal(
    key: bytes,
    correlation: bytes,
    payload: bytes,
    signature: str | None,
    sent_at: float | None,
    now: float,
    window_s: float,
) -> Refusal | None:
    """None when the request is signed with `key` and sent within the window."""
    if signature is None:
        return Refusal(
            "unsigned", "the request is not signed (signing is on: user property 'signature')"
        )
    expected = sign(key, correlation, payload)
    if not hmac.compare_digest(expected, signature.strip().lower()):
        return Refusal("bad_signature", "the signature does not match the request")
    if sent_at is None:
        return Refusal("no_timestamp", "a signed request needs 'ts' (the time it was sent)")
    age = now - sent_at
    if age > window_s:
        return Refusal(
            "expired", f"the request was sent {age:.1f} s ago; the window is {window_s:g} s"
        )
    if -age > window_s:
        return Refusal(
            "from_the_future",
            f"the request is dated {-age:.1f} s ahead of the agent's clock; "
            f"the window is {window_s:g} s",
        )
    return None
