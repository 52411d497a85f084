"""The OpenSSH client's command line for agent sessions (orchestrator.transport.session).

On this machine the OpenSSH client moves ~270 MB/s (aes128-gcm) where paramiko moves ~100
(../shared/notes/fleet.md), so agent sessions — and with them the package's bytes — go
through `ssh` when it is installed (`ssh.bulk: openssh`, the default) and through paramiko
otherwise. Same security:
StrictHostKeyChecking=yes against the inventory's known_hosts only, key auth only, batch
mode; curve25519 key exchange (OpenSSH's default sntrup761 costs ~190 ms CPU per login).
"""

from __future__ import annotations

import shutil

from orchestrator.inventory import Host, SSHSettings


def available() -> bool:
    return shutil.which("ssh") is not None


def argv(host: Host, ssh: SSHSettings, connect_timeout: float, command: str) -> list[str]:
    return [
        "ssh",
        "-F", "/dev/null",
        "-i", str(ssh.identity_file),
        "-p", str(host.port),
        "-l", ssh.user,
        "-o", "BatchMode=yes",
        "-o", "IdentitiesOnly=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={ssh.known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "UpdateHostKeys=no",
        "-o", f"ConnectTimeout={max(1, int(connect_timeout))}",
        "-o", "ServerAliveInterval=5",
        "-o", "ServerAliveCountMax=3",
        "-o", "KexAlgorithms=curve25519-sha256,curve25519-sha256@libssh.org",
        "-o", "Ciphers=aes128-gcm@openssh.com,aes256-gcm@openssh.com,aes128-ctr",
        "-o", "Compression=no",
        "-o", "LogLevel=ERROR",
        host.address,
        command,
    ]  # fmt: skip
