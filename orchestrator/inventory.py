"""Inventory: the hosts Ferry can reach, their addresses, groups and deploy roots.

```yaml
ssh:                          # how to reach every host (strict host keys, always)
  user: root
  identity_file: client_key   # paths relative to the inventory file
  known_hosts: known_hosts
  port: 22
  connect_timeout: 10
  bulk: openssh               # package transfer: openssh (fast) or paramiko
deploy_root: /srv/app         # default for every host
hosts:
  h1: {address: 198.18.0.11, groups: [canary, web]}
  h2: {address: 198.18.0.12, groups: [web], deploy_root: /srv/app}
```
Groups are read from the hosts; `all` is every host. Host order is the file's order.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from orchestrator.errors import PlanError, SpecError
from orchestrator.yamlfile import parse_model

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SSHSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    user: str = "root"
    identity_file: Path
    known_hosts: Path
    port: int = Field(22, ge=1, le=65535)
    connect_timeout: float = Field(10.0, gt=0)
    # package bytes go through the OpenSSH client when installed (~2.7x paramiko's speed)
    bulk: Literal["openssh", "paramiko"] = "openssh"

    @field_validator("identity_file", "known_hosts")
    @classmethod
    def _relative_to_file(cls, value: Path, info: ValidationInfo) -> Path:
        base = (info.context or {}).get("base_dir")
        return (Path(base) / value).resolve() if base and not value.is_absolute() else value


class HostEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    address: str
    groups: tuple[str, ...] = ()
    port: int | None = Field(None, ge=1, le=65535)
    deploy_root: str | None = None


class Host(BaseModel):
    """One host, fully resolved (inventory defaults applied)."""

    model_config = ConfigDict(frozen=True)
    name: str
    address: str
    port: int
    groups: tuple[str, ...]
    deploy_root: str


class Inventory(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    ssh: SSHSettings
    deploy_root: str = "/srv/app"
    hosts: dict[str, HostEntry]

    @field_validator("hosts")
    @classmethod
    def _names(cls, hosts: dict[str, HostEntry]) -> dict[str, HostEntry]:
        if not hosts:
            raise ValueError("an inventory needs at least one host")
        for name in hosts:
            if not _NAME.match(name):
                raise ValueError(f"host name {name!r} may use letters, digits, '.', '_', '-'")
        return hosts

    def host(self, name: str) -> Host:
        entry = self.hosts[name]
        return Host(
            name=name,
            address=entry.address,
            port=entry.port or self.ssh.port,
            groups=entry.groups,
            deploy_root=entry.deploy_root or self.deploy_root,
        )

    def all_hosts(self) -> list[Host]:
        return [self.host(n) for n in self.hosts]

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {"all": list(self.hosts)}
        for name, entry in self.hosts.items():
            for g in entry.groups:
                out.setdefault(g, []).append(name)
        return out

    def select(self, targets: str | list[str]) -> list[Host]:
        """Hosts named by groups, host names or glob patterns, in inventory order."""
        wanted = [targets] if isinstance(targets, str) else list(targets)
        groups = self.groups()
        chosen: set[str] = set()
        for item in wanted:
            for part in (p.strip() for p in item.split(",")):
                if not part:
                    continue
                if part in groups:
                    chosen.update(groups[part])
                    continue
                matched = [n for n in self.hosts if fnmatch.fnmatchcase(n, part)]
                if not matched:
                    raise PlanError(
                        f"targets: {part!r} is no group, host or pattern of the inventory "
                        f"(groups: {', '.join(sorted(groups))})"
                    )
                chosen.update(matched)
        return [self.host(n) for n in self.hosts if n in chosen]


def load_inventory(path: Path) -> Inventory:
    inventory = parse_model(Inventory, path)
    require_files(inventory.ssh, str(path))
    return inventory


def inventory_path(
    *, override: Path | None, plan_inventory: Path | None, default: Path | None, plan_file: str
) -> Path:
    """The one order, for deploy and drift alike: `--inventory`, then the plan's
    `inventory:`, then the settings' (FERRY_INVENTORY or ferry.toml)."""
    path = override or plan_inventory or default
    if path is None:
        raise SpecError(
            plan_file,
            "inventory",
            "no inventory given",
            "set inventory: in the plan, FERRY_INVENTORY, or pass --inventory",
        )
    return Path(path)


def require_files(ssh: SSHSettings, where: str) -> None:
    """The identity and known_hosts files must be there before anything is recorded."""
    for field in ("identity_file", "known_hosts"):
        path = Path(getattr(ssh, field))
        if not path.is_file():
            raise SpecError(
                where,
                f"ssh.{field}",
                f"{path} does not exist",
                "fix the path (relative paths are relative to the inventory file)",
            )
