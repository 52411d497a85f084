"""SSH to one host with paramiko: strict host keys, key auth, a timeout on every step.

Used for agent sessions where the OpenSSH client is missing (orchestrator.transport.session).
Errors from paramiko and sockets are translated here, once, into TransportError (cannot
reach or authenticate; the host counts as failed) or StepTimeout. Ferry prefers
aes128-gcm@openssh.com: on this machine paramiko moves ~100 MB/s with it against ~60 MB/s
with its default aes128-ctr (../shared/notes/fleet.md). Unknown host keys are refused
(RejectPolicy); there is no way to turn that off.

The inventory's other settings, as OpenSSH applies them (orchestrator.transport.openssh):
`agent: true` alone offers the agent's keys; with `identity_file` too, only the agent's copy
of that key (IdentitiesOnly), else the file. A bastion (`proxy_jump`) is a first SSHClient,
as strict (same known_hosts, RejectPolicy, same keys), whose direct-tcpip channel carries
the host's connection. `kex`/`ciphers`/`macs` become paramiko's disabled_algorithms.
`become: true` checks `sudo -n` on its own channel first: that check's words would be lost
in the session's combined stream. `ssh_config` is the OpenSSH client's only.

fabric's Connection is not used: by default it accepts unknown host keys, and it starts
threads for every command; Ferry wants neither.
"""

from __future__ import annotations

import threading
from typing import Any

import paramiko

from orchestrator.errors import TransportError
from orchestrator.inventory import Host, SSHSettings, read_identity
from orchestrator.transport.openssh import BECOME_FIX

_SLOW_CIPHERS = [
    "aes128-ctr", "aes192-ctr", "aes256-ctr", "aes128-cbc", "aes192-cbc", "aes256-cbc",
    "3des-cbc",
]  # fmt: skip
# ML-KEM hybrid key exchange is computed in Python by paramiko: slower logins at 200 hosts
_DISABLED = {"ciphers": _SLOW_CIPHERS, "kex": ["mlkem768x25519-sha256"]}
# OpenSSH's name and paramiko's for one algorithm
_SAME = {"curve25519-sha256": "curve25519-sha256@libssh.org"}
PASSPHRASE = (
    "the identity file is passphrase-protected: load it into ssh-agent (ssh-add) "
    "and set ssh.agent: true"
)


class StepTimeout(TransportError):
    pass


class SSHHost:
    """One host's connection, opened lazily and reused by every step of a deployment."""

    def __init__(self, host: Host, ssh: SSHSettings, *, connect_timeout: float | None = None):
        self.host = host
        self.ssh = ssh
        self.connect_timeout = connect_timeout or ssh.connect_timeout
        self._client: paramiko.SSHClient | None = None
        self._jump: paramiko.SSHClient | None = None  # the bastion's, when there is one
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.host.name

    def _connect(self) -> paramiko.SSHClient:
        if self.ssh.ssh_config is not None:
            raise TransportError(
                self.name, "ssh.ssh_config is read by the OpenSSH client, which is not installed"
            )
        disabled = disabled_algorithms(self.name, self.ssh)
        jump, sock = None, None
        if self.ssh.jump is not None:
            user, bastion, port = self.ssh.jump
            jump = self._login(bastion, port, user, disabled, None, f"bastion {bastion}: ")
            try:
                transport = jump.get_transport()
                assert transport is not None
                sock = transport.open_channel(
                    "direct-tcpip",
                    (self.host.address, self.host.port),
                    ("127.0.0.1", 0),
                    timeout=self.connect_timeout,
                )
            except (paramiko.SSHException, OSError, EOFError) as exc:
                jump.close()
                raise TransportError(
                    self.name, f"unreachable through bastion {bastion}: {exc or 'timeout'}"
                ) from None
        try:
            client = self._login(self.host.address, self.host.port, self.ssh.user, disabled, sock)
        except BaseException:
            if jump is not None:
                jump.close()
            raise
        self._jump = jump
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(5)
        return client

    def _login(
        self,
        address: str,
        port: int,
        user: str,
        disabled: dict[str, list[str]],
        sock: paramiko.Channel | None,
        where: str = "",
    ) -> paramiko.SSHClient:
        """One strict login (the host, or the bastion: `where` says which in each error)."""
        client = paramiko.SSHClient()
        client.load_host_keys(str(self.ssh.known_hosts))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        agent = self._agent()
        try:
            client.connect(
                address,
                port=port,
                username=user,
                sock=sock,
                timeout=self.connect_timeout,
                banner_timeout=self.connect_timeout,
                auth_timeout=self.connect_timeout,
                channel_timeout=self.connect_timeout,
                look_for_keys=False,
                disabled_algorithms=disabled,
                **self._keys(agent),
            )
        except paramiko.BadHostKeyException:
            client.close()
            raise TransportError(
                self.name, f"{where}host key does not match known_hosts (refused; possible MITM)"
            ) from None
        except paramiko.PasswordRequiredException:
            client.close()
            raise TransportError(self.name, PASSPHRASE) from None
        except paramiko.SSHException as exc:
            client.close()
            if "not found in known_hosts" in str(exc):
                raise TransportError(
                    self.name, f"{where}host key unknown: {address} is not in known_hosts"
                ) from None
            raise TransportError(self.name, f"{where}SSH failed: {exc}") from None
        except (OSError, EOFError) as exc:
            client.close()
            raise TransportError(self.name, f"{where}unreachable: {exc}") from None
        finally:
            if agent is not None:
                agent.close()  # its keys have signed: the login is done
        return client

    def _agent(self) -> paramiko.Agent | None:
        if not self.ssh.agent:
            return None
        try:
            return paramiko.Agent()
        except (paramiko.SSHException, OSError) as exc:
            raise TransportError(
                self.name, f"cannot reach the ssh-agent at SSH_AUTH_SOCK: {exc}"
            ) from None

    def _keys(self, agent: paramiko.Agent | None) -> dict[str, Any]:
        """connect()'s key arguments, as OpenSSH's IdentitiesOnly would choose."""
        file = self.ssh.identity_file
        if file is None:  # agent only: whatever it holds
            if agent is None or not agent.get_keys():
                raise TransportError(
                    self.name, "the ssh-agent at SSH_AUTH_SOCK holds no key: ssh-add one"
                )
            return {"allow_agent": True}
        identity = read_identity(file)
        if agent is not None and identity.public_blob is not None:
            for key in agent.get_keys():
                if key.asbytes() == identity.public_blob:
                    return {"pkey": key, "allow_agent": False}
        if identity.encrypted:
            held = " and the ssh-agent does not hold it" if agent is not None else ""
            raise TransportError(
                self.name,
                f"the identity file is passphrase-protected{held}: load it into ssh-agent "
                f"(ssh-add {file}) and set ssh.agent: true",
            )
        return {"key_filename": str(file), "allow_agent": False}

    def client(self) -> paramiko.SSHClient:
        with self._lock:
            if self._client is None or not self._alive(self._client):
                for stale in (self._client, self._jump):
                    if stale is not None:
                        stale.close()
                self._client = self._jump = None
                self._client = self._connect()
            return self._client

    @staticmethod
    def _alive(client: paramiko.SSHClient) -> bool:
        transport = client.get_transport()
        return transport is not None and transport.is_active()

    def open(self, command: str, timeout: float) -> paramiko.Channel:
        transport = self.client().get_transport()
        assert transport is not None
        if self.ssh.become:
            self._check_sudo(transport, timeout)
        try:
            chan = transport.open_session(timeout=min(timeout, self.connect_timeout))
            chan.set_combine_stderr(True)
            chan.settimeout(timeout)
            chan.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self.close()
            raise TransportError(self.name, f"cannot open a session: {exc or 'timeout'}") from None
        return chan

    def _check_sudo(self, transport: paramiko.Transport, timeout: float) -> None:
        try:
            chan = transport.open_session(timeout=min(timeout, self.connect_timeout))
            chan.settimeout(timeout)
            chan.exec_command("sudo -n true")
            err = chan.makefile_stderr("rb").read().decode(errors="replace").strip()
            code = chan.recv_exit_status()
            chan.close()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self.close()
            raise TransportError(self.name, f"cannot open a session: {exc or 'timeout'}") from None
        if code != 0:
            self.close()
            words = err.splitlines()[-1] if err else f"exit {code}"
            raise TransportError(
                self.name, f"become: `sudo -n` as {self.ssh.user} failed ({words}). {BECOME_FIX}"
            )

    def close(self) -> None:
        with self._lock:
            for client in (self._client, self._jump):
                if client is not None:
                    client.close()
            self._client = self._jump = None


def disabled_algorithms(name: str, ssh: SSHSettings) -> dict[str, list[str]]:
    """paramiko's disabled_algorithms: Ferry's defaults, or all but the inventory's lists."""
    disabled = dict(_DISABLED)
    offered = {
        "kex": paramiko.Transport._preferred_kex,
        "ciphers": paramiko.Transport._preferred_ciphers,
        "macs": paramiko.Transport._preferred_macs,
    }
    for kind, wanted in (("kex", ssh.kex), ("ciphers", ssh.ciphers), ("macs", ssh.macs)):
        if wanted is None:
            continue
        names = set(wanted) | {_SAME[w] for w in wanted if w in _SAME}
        if not names & set(offered[kind]):
            raise TransportError(
                name,
                f"ssh.{kind}: paramiko has none of {', '.join(wanted)} "
                f"(it has {', '.join(offered[kind])})",
            )
        disabled[kind] = [a for a in offered[kind] if a not in names]
    return disabled
