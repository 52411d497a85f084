"""The OpenSSH client's command line for agent sessions (orchestrator.transport.session).

On this machine the OpenSSH client moves ~270 MB/s (aes128-gcm) where paramiko moves ~100
(../shared/notes/fleet.md), so agent sessions — and with them the package's bytes — go
through `ssh` when it is installed (`ssh.bulk: openssh`, the default) and through paramiko
otherwise. Same security:
StrictHostKeyChecking=yes against the inventory's known_hosts only, key auth only, batch
mode; curve25519 key exchange (OpenSSH's default sntrup761 costs ~190 ms CPU per login).

What the inventory may change (orchestrator.inventory.SSHSettings) goes on the command
line, and so does everything that keeps host keys strict, because a `-o` on the command
line beats any ssh_config file the inventory names:

- keys: `-i FILE` with IdentitiesOnly (the agent, when allowed, may hold FILE decrypted),
  or with `agent: true` alone every key the agent holds and no file of ~/.ssh;
- the route: a bastion is reached with an explicit ProxyCommand running this same command
  line (`ssh … -W host:port bastion`), not with `-J`: OpenSSH hands a `-J` jump only `-l`,
  `-p` and `-F`, so the bastion's key would be checked against ~/.ssh/known_hosts with
  ssh_config's policy. A ProxyJump/ProxyCommand from ssh_config is overridden for the same
  reason;
- nothing that bypasses or weakens the check: no multiplexing (a ControlMaster's clients
  skip host key checks), no KnownHostsCommand, no DNS host keys, HostName pinned to the
  inventory's address; no tty, forwarding, RemoteCommand or LocalCommand.
"""

from __future__ import annotations

import shlex
import shutil
from functools import lru_cache

from orchestrator.inventory import Host, SSHSettings

KEX = ("curve25519-sha256", "curve25519-sha256@libssh.org")
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr")

# what a login that `become`s root runs first: a sudo that would ask for a password (or
# is missing) says so in one line instead of hanging or failing deep in the session
BECOME_FIX = (
    "Ferry runs its agent as root with `sudo -n`, which never prompts: allow the login "
    "user passwordless sudo (NOPASSWD), or set ssh.become: false"
)


def available() -> bool:
    return _ssh_path() is not None


@lru_cache(maxsize=1)
def _ssh_path() -> str | None:
    """Where `ssh` is, looked up once per command rather than by every host's session (a
    walk of PATH: ~0.1 ms each, measured)."""
    return shutil.which("ssh")


def argv(host: Host, ssh: SSHSettings, connect_timeout: float, command: str) -> list[str]:
    return [
        "ssh",
        "-F", str(ssh.ssh_config or "/dev/null"),
        "-p", str(host.port),
        "-l", ssh.user,
        *_identity(ssh),
        *_strict(ssh, connect_timeout),
        *_route(ssh, connect_timeout),
        "-o", f"HostName={host.address}",
        "-o", "RequestTTY=no",  # the session is a byte stream: a tty would mangle it
        "-o", "RemoteCommand=none",
        "-o", "SessionType=default",
        "-o", "StdinNull=no",
        "-o", "ForkAfterAuthentication=no",
        "-o", "EscapeChar=none",
        host.address,
        command,
    ]  # fmt: skip


def become(command: str, user: str) -> str:
    """`command` run as root through `sudo -n`, after a check that names sudo -n if it fails."""
    fail = shlex.quote(f"become: `sudo -n` as {user} failed (")
    fix = shlex.quote(f"). {BECOME_FIX}")
    # ${err##*<newline>}: sudo's last line (it may warn first, e.g. about the host name)
    return (
        f"if ! err=$(sudo -n true 2>&1); then "
        f"printf '%s%s%s\\n' {fail} \"${{err##*\n}}\" {fix} >&2; exit 1; fi; "
        f"exec sudo -n {command}"
    )


def _identity(ssh: SSHSettings) -> list[str]:
    if ssh.identity_file is not None:
        out = ["-i", str(ssh.identity_file), "-o", "IdentitiesOnly=yes"]
    else:  # the agent's keys only: none of ~/.ssh's default files
        out = ["-o", "IdentityFile=none", "-o", "IdentitiesOnly=no"]
    agent = "IdentityAgent=SSH_AUTH_SOCK" if ssh.agent else "IdentityAgent=none"
    return [*out, "-o", agent, "-o", "AddKeysToAgent=no"]


def _strict(ssh: SSHSettings, connect_timeout: float) -> list[str]:
    """Host keys from the inventory's known_hosts, nothing else, no questions; the algorithms."""
    out = [
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={_value(str(ssh.known_hosts))}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "UpdateHostKeys=no",
        "-o", "KnownHostsCommand=none",
        "-o", "VerifyHostKeyDNS=no",
        "-o", "CanonicalizeHostname=no",
        "-o", "ControlMaster=no",
        "-o", "ControlPath=none",
        "-o", "ForwardAgent=no",
        "-o", "ForwardX11=no",
        "-o", "ClearAllForwardings=yes",
        "-o", "PermitLocalCommand=no",
        "-o", f"ConnectTimeout={max(1, int(connect_timeout))}",
        "-o", "ServerAliveInterval=5",
        "-o", "ServerAliveCountMax=3",
        "-o", f"KexAlgorithms={','.join(ssh.kex or KEX)}",
        "-o", f"Ciphers={','.join(ssh.ciphers or CIPHERS)}",
        "-o", "Compression=no",
        # INFO, not ERROR: a connection that went away is said only at INFO ("Timeout,
        # server … not responding."), and without it a cut link reads as the agent dying
        "-o", "LogLevel=INFO",
    ]  # fmt: skip
    return out + (["-o", f"MACs={','.join(ssh.macs)}"] if ssh.macs else [])


def _route(ssh: SSHSettings, connect_timeout: float) -> list[str]:
    """Direct, or through the bastion with the same keys and the same strict checks."""
    if ssh.jump is None:
        return ["-o", "ProxyCommand=none", "-o", "ProxyJump=none"]
    user, bastion, port = ssh.jump
    hop = [
        _ssh_path() or "ssh",
        "-F", str(ssh.ssh_config or "/dev/null"),
        "-p", str(port),
        "-l", user,
        *_identity(ssh),
        *_strict(ssh, connect_timeout),
        "-o", f"HostName={bastion}",
        "-o", "ProxyCommand=none",
        "-o", "ProxyJump=none",
    ]  # fmt: skip
    # ProxyCommand expands %-tokens: ours are %h and %p (the host, as HostName pins it)
    words = [shlex.quote(w.replace("%", "%%")) for w in hop]
    command = " ".join([*words, "-W", "'[%h]:%p'", shlex.quote(bastion.replace("%", "%%"))])
    return ["-o", f"ProxyCommand={command}", "-o", "ProxyJump=none"]


def _value(text: str) -> str:
    """A `-o` value: OpenSSH splits it at spaces unless quoted."""
    return f'"{text}"' if any(c.isspace() for c in text) else text
