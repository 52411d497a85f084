"""SSH to one host with paramiko: strict host keys, key auth, a timeout on every step.

Used for agent sessions where the OpenSSH client is missing (orchestrator.transport.session).
Errors from paramiko and sockets are translated here, once, into TransportError (cannot
reach or authenticate; the host counts as failed) or StepTimeout. Ferry prefers
aes128-gcm@openssh.com: on this machine paramiko moves ~100 MB/s with it against ~60 MB/s
with its default aes128-ctr (../shared/notes/fleet.md). Unknown host keys are refused
(RejectPolicy); there is no way to turn that off.

fabric's Connection is not used: by default it accepts unknown host keys, and it starts
threads for every command; Ferry wants neither.
"""

from __future__ import annotations

import threading

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

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
