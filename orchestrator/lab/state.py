"""DIR/fleet.json: every PID, namespace, link and mount a fleet made, written before use.

Names are recorded before the thing they name is created, so `down` after a crash at any
point finds and removes exactly what exists (and nothing it did not make).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class HostState:
    name: str
    index: int
    address: str
    port: int
    root_dir: str  # the host's deploy root as seen from the root namespace
    netns: str | None = None
    veth: str | None = None
    pid: int | None = None  # sshd (the boot chain execs into it, so the PID stays)
    pid_start: int | None = None
    proxy_pid: int | None = None
    proxy_start: int | None = None
    mounts: list[str] = field(default_factory=list)  # inside the host's mount namespace
    faults: list[str] = field(default_factory=list)


@dataclass
class FleetState:
    id: str
    mode: str  # "netns" or "loopback"
    dir: str
    user: str
    port: int
    deploy_root: str
    slot: int | None = None
    bridge: str | None = None
    bridge_cidr: str | None = None
    up_seconds: float | None = None
    hosts: dict[str, HostState] = field(default_factory=dict)
    bastion: HostState | None = None  # the one way in to the hosts, when there is one
    deploy_user: str | None = None  # the machine's non-root lab user, once added (machine.py)

    @classmethod
    def read(cls, path: Path) -> FleetState:
        raw = json.loads(path.read_text())
        hosts = {name: HostState(**h) for name, h in raw.pop("hosts").items()}
        bastion = raw.pop("bastion", None)
        return cls(**raw, hosts=hosts, bastion=HostState(**bastion) if bastion else None)

    def write(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)
