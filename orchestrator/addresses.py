"""Host addresses resolved before anything is recorded: a name that does not resolve is
exit 2 naming the inventory's field, not a failed canary after the RFC was used.

Only where this machine resolves the name: through a bastion (`ssh.proxy_jump`) the
bastion does, and an `ssh_config` may map the name to another (HostName), so those are
left to the connection.
"""

from __future__ import annotations

import ipaddress
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from orchestrator.errors import SpecError
from orchestrator.inventory import Host, SSHSettings


def _literal(address: str) -> bool:
    try:
        ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    return True


def _problem(host: Host) -> str | None:
    try:
        socket.getaddrinfo(host.address, host.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        return getattr(exc, "strerror", None) or str(exc)
    return None


def require_resolvable(hosts: list[Host], ssh: SSHSettings, inventory: Path | str) -> None:
    if ssh.proxy_jump or ssh.ssh_config:
        return
    names = [h for h in hosts if not _literal(h.address)]
    if not names:
        return
    with ThreadPoolExecutor(max_workers=min(16, len(names))) as pool:
        problems = list(pool.map(_problem, names))
    for host, problem in zip(names, problems, strict=True):
        if problem:
            raise SpecError(
                str(inventory),
                f"hosts.{host.name}.address",
                f"{host.address!r} does not resolve ({problem})",
                "fix the address, or the name service",
            )
