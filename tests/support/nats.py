"""A real NATS server with its MQTT listener, as a second broker implementation for tests.

`NatsBroker` runs Debian's `nats-server` (installed by scripts/bootstrap) with a config
file of its own in a temporary directory: the MQTT listener on 127.0.0.1 and a port the
OS chose, the NATS client port on another free port, JetStream (which NATS needs to keep
MQTT sessions, QoS 1 messages and retained messages) in that directory, the log in a file.

NATS speaks MQTT 3.1.1 only (a CONNECT for MQTT 5 gets return code 1, unacceptable
protocol version): clients must use protocol "3.1.1". docs/library-notes.md lists what
else differs from mosquitto.

`require_nats()` skips the calling test when the binary is missing, except under CI
(env CI=true), where it fails: CI installs it, so a missing binary is a broken pipeline.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from tests.support.broker import BrokerError, find_binary, free_port, require_binary

_FALLBACK_PATHS = ("/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server")


def nats_path() -> str | None:
    return find_binary("nats-server", _FALLBACK_PATHS)


def require_nats() -> str:
    """The nats-server binary; skips the test when missing (fails instead when CI=true)."""
    return require_binary("nats-server", _FALLBACK_PATHS)


class NatsBroker:
    """nats-server with an MQTT listener on 127.0.0.1 and a free port, for one test."""

    protocol = "3.1.1"  # all NATS's MQTT listener speaks
    name = "nats"

    def __init__(self, *, binary: str | None = None, start_timeout_s: float = 15.0) -> None:
        self.host = "127.0.0.1"
        self._binary = binary
        self._start_timeout_s = start_timeout_s
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The MQTT listener's port."""
        if self._port is None:
            raise RuntimeError("broker not started")
        return self._port

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        if self._dir is None:
            return ""
        try:
            return (self._dir / "nats.log").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def start(self) -> NatsBroker:
        if self.running:
            return self
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="nats-test-"))
            self._port = free_port(self.host)
            client_port = free_port(self.host)
            (self._dir / "nats.conf").write_text(
                "\n".join(
                    [
                        f"listen: {self.host}:{client_port}",
                        "server_name: edge-agent-test",
                        f'log_file: "{self._dir / "nats.log"}"',
                        f'jetstream {{ store_dir: "{self._dir / "js"}" }}',
                        f"mqtt {{ listen: {self.host}:{self._port} }}",
                    ]
                )
                + "\n",
                encoding="utf-8",
            )
        binary = self._binary or nats_path()
        if binary is None:
            raise BrokerError("nats-server is not installed")
        stderr_path = self._dir / "stderr.log"
        with stderr_path.open("ab") as stderr:
            self._proc = subprocess.Popen(
                [binary, "-c", str(self._dir / "nats.conf")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        deadline = time.monotonic() + self._start_timeout_s
        while True:
            if self._proc.poll() is not None:
                err = stderr_path.read_text(encoding="utf-8", errors="replace")
                self._proc = None
                raise BrokerError(f"nats-server exited at start: {err}\n{self.log_text()[-2000:]}")
            if self._port_open():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(
                    f"nats-server did not listen on {self._port} within {self._start_timeout_s} s"
                )
            time.sleep(0.02)

    def stop(self, timeout_s: float = 5.0) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
        self._proc = None

    def close(self) -> None:
        try:
            self.stop()
        finally:
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None

    def _port_open(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            return s.connect_ex((self.host, self.port)) == 0

    def __enter__(self) -> NatsBroker:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
