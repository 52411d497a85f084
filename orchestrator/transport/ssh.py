"""SSH to one host with paramiko: strict host keys, key auth, a timeout on every step.

Errors from paramiko and sockets are translated here, once, into TransportError (cannot
reach or authenticate; the host counts as failed) or StepTimeout. Ferry prefers
aes128-gcm@openssh.com: on this machine paramiko moves ~100 MB/s with it against ~60 MB/s
with its default aes128-ctr (../shared/notes/fleet.md). Unknown host keys are refused
(RejectPolicy); there is no way to turn that off.

fabric's Connection is not used: by default it accepts unknown host keys, and it starts
threads for every command; Ferry wants neither.
"""

from __future__ import annotations

import shlex
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import paramiko

from orchestrator.errors import TransportError
from orchestrator.inventory import Host, SSHSettings

_SLOW_CIPHERS = [
    "aes128-ctr", "aes192-ctr", "aes256-ctr", "aes128-cbc", "aes192-cbc", "aes256-cbc",
    "3des-cbc",
]  # fmt: skip
# ML-KEM hybrid key exchange is computed in Python by paramiko: slower logins at 200 hosts
_DISABLED = {"ciphers": _SLOW_CIPHERS, "kex": ["mlkem768x25519-sha256"]}


class StepTimeout(TransportError):
    pass


@dataclass(frozen=True)
class CommandResult:
    rc: int
    output: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.rc == 0


def quote_env(env: dict[str, str]) -> str:
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))


class SSHHost:
    """One host's connection, opened lazily and reused by every step of a deployment."""

    def __init__(self, host: Host, ssh: SSHSettings, *, connect_timeout: float | None = None):
        self.host = host
        self.ssh = ssh
        self.connect_timeout = connect_timeout or ssh.connect_timeout
        self._client: paramiko.SSHClient | None = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.host.name

    def _connect(self) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        client.load_host_keys(str(self.ssh.known_hosts))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(
                self.host.address,
                port=self.host.port,
                username=self.ssh.user,
                key_filename=str(self.ssh.identity_file),
                timeout=self.connect_timeout,
                banner_timeout=self.connect_timeout,
                auth_timeout=self.connect_timeout,
                channel_timeout=self.connect_timeout,
                look_for_keys=False,
                allow_agent=False,
                disabled_algorithms=_DISABLED,
            )
        except paramiko.BadHostKeyException:
            client.close()
            raise TransportError(
                self.name, "host key does not match known_hosts (refused; possible MITM)"
            ) from None
        except paramiko.SSHException as exc:
            client.close()
            if "not found in known_hosts" in str(exc):
                raise TransportError(
                    self.name, f"host key unknown: {self.host.address} is not in known_hosts"
                ) from None
            raise TransportError(self.name, f"SSH failed: {exc}") from None
        except (OSError, EOFError) as exc:
            client.close()
            raise TransportError(self.name, f"unreachable: {exc}") from None
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(5)
        return client

    def client(self) -> paramiko.SSHClient:
        with self._lock:
            if self._client is None or not self._alive(self._client):
                if self._client is not None:
                    self._client.close()
                self._client = self._connect()
            return self._client

    @staticmethod
    def _alive(client: paramiko.SSHClient) -> bool:
        transport = client.get_transport()
        return transport is not None and transport.is_active()

    def open(self, command: str, timeout: float) -> paramiko.Channel:
        transport = self.client().get_transport()
        assert transport is not None
        try:
            chan = transport.open_session(timeout=min(timeout, self.connect_timeout))
            chan.set_combine_stderr(True)
            chan.settimeout(timeout)
            chan.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self.close()
            raise TransportError(self.name, f"cannot open a session: {exc or 'timeout'}") from None
        return chan

    def run(
        self,
        command: str,
        *,
        timeout: float,
        stdin: bytes | None = None,
        env: dict[str, str] | None = None,
    ) -> CommandResult:
        """Run a shell command; the remote side is killed at the timeout too (coreutils)."""
        wrapped = f"timeout -k 5 {max(1, int(timeout))} sh -c {shlex.quote(command)}"
        if env:
            wrapped = f"env {quote_env(env)} {wrapped}"
        start = time.monotonic()
        chan = self.open(wrapped, timeout)
        try:
            if stdin is not None:
                chan.sendall(stdin)
            chan.shutdown_write()
            output = read_all(chan, start + timeout, self.name)
            rc = wait_exit(chan, start + timeout, self.name)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            if isinstance(exc, socket.timeout | TimeoutError):
                raise StepTimeout(self.name, f"timed out after {timeout:.0f}s") from None
            raise TransportError(self.name, f"connection lost: {exc}") from None
        finally:
            chan.close()
        return CommandResult(rc, output.decode(errors="replace"), time.monotonic() - start)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


def read_all(chan: paramiko.Channel, deadline: float, name: str) -> bytes:
    parts: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise StepTimeout(name, "timed out")
        chan.settimeout(left)
        try:
            data = chan.recv(1 << 16)
        except TimeoutError:
            raise StepTimeout(name, "timed out waiting for output") from None
        if not data:
            return b"".join(parts)
        parts.append(data)


def read_line(chan: paramiko.Channel, deadline: float, name: str) -> bytes:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise StepTimeout(name, "timed out")
        chan.settimeout(left)
        try:
            b = chan.recv(1)
        except TimeoutError:
            raise StepTimeout(name, "timed out waiting for the agent") from None
        if not b:
            break
        buf += b
    return bytes(buf)


def wait_exit(chan: paramiko.Channel, deadline: float, name: str) -> int:
    if not chan.status_event.wait(max(0.0, deadline - time.monotonic()) + 1):
        raise StepTimeout(name, "timed out waiting for the exit status")
    return chan.recv_exit_status()


class Stream(Protocol):
    """A remote command's byte streams: what `stage` needs from either transport."""

    def sendall(self, data: bytes) -> None: ...
    def sendfile(self, path: Path) -> int: ...
    def read_line(self) -> bytes: ...
    def finish(self) -> tuple[int, bytes]: ...
    def close(self) -> None: ...


class ChannelStream:
    """Stream over a paramiko channel of an open connection."""

    def __init__(self, conn: SSHHost, command: str, timeout: float) -> None:
        self.name = conn.name
        self.deadline = time.monotonic() + timeout
        self.chan = conn.open(command, timeout)

    def sendall(self, data: bytes) -> None:
        self.chan.sendall(data)

    def sendfile(self, path: Path) -> int:
        sent = 0
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                self.chan.sendall(chunk)
                sent += len(chunk)
        return sent

    def read_line(self) -> bytes:
        return read_line(self.chan, self.deadline, self.name)

    def finish(self) -> tuple[int, bytes]:
        self.chan.shutdown_write()
        rest = read_all(self.chan, self.deadline, self.name)
        return wait_exit(self.chan, self.deadline, self.name), rest

    def close(self) -> None:
        self.chan.close()
