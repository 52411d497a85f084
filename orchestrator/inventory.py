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
  h3: {address: 198.18.0.13, window: "Sat,Sun 02:00-04:00 Europe/Berlin"}
```
`window`: the host's own maintenance window, in the change calendar's grammar
(`orchestrator.change.calendar`); a pull plan with `apply: window` applies only inside it.
Groups are read from the hosts; `all` is every host. Host order is the file's order.
SSHSettings says what else `ssh:` takes: an ssh-agent, a bastion, an ssh_config, sudo,
algorithm lists.
"""

from __future__ import annotations

import base64
import fnmatch
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from orchestrator.change.calendar import RecurringWindow
from orchestrator.errors import PlanError, SpecError
from orchestrator.yamlfile import parse_model

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# directories of the system itself: a deploy root there would mix Ferry's releases/,
# current and shared/ into them, and a prune or backout would act on system files
SYSTEM_ROOTS = frozenset(
    "/ /bin /boot /dev /etc /home /lib /lib32 /lib64 /libx32 /media /mnt /opt /proc /root "
    "/run /sbin /srv /sys /tmp /usr /usr/bin /usr/lib /usr/local /usr/sbin /usr/share /var "
    "/var/lib /var/log /var/tmp".split()
)


def deploy_root_problem(value: str) -> str | None:
    """Why `value` cannot be a deploy root (None: it can): absolute, normal, its own."""
    if not value.startswith("/"):
        return (
            f"deploy_root {value!r} is relative (it would land under the login user's home): "
            "use an absolute path, e.g. /srv/app"
        )
    parts = value.split("/")[1:]
    if any(p in (".", "..") for p in parts) or "//" in value or "\0" in value:
        return f"deploy_root {value!r} must be a plain absolute path (no '.', '..' or '//')"
    norm = value.rstrip("/") or "/"
    if norm in SYSTEM_ROOTS:
        return (
            f"deploy_root {value!r} is a system directory: give the application a directory "
            f"of its own, e.g. {'/srv/app' if norm != '/srv' else '/srv/shop'}"
        )
    if not re.fullmatch(r"[A-Za-z0-9_./@+-]+", value):
        return f"deploy_root {value!r} may use letters, digits and . _ - + @ / only"
    return None


def _deploy_root(value: str | None) -> str | None:
    if value is not None and (why := deploy_root_problem(value)):
        raise ValueError(why)
    return value


_JUMP = re.compile(
    r"^(?:(?P<user>[A-Za-z0-9_][A-Za-z0-9_.-]*)@)?"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*)(?::(?P<port>[0-9]{1,5}))?$"
)
_ALGORITHM = re.compile(r"^[a-z0-9][a-z0-9@._-]*$")


class SSHSettings(BaseModel):
    """How Ferry logs in to every host. Host keys are checked strictly in every case: only
    the inventory's known_hosts counts — for the bastion too — and an unknown or changed
    key is refused; nothing here can turn that off.

    ```yaml
    ssh:
      user: deploy
      agent: true                 # sign with the ssh-agent at SSH_AUTH_SOCK
      identity_file: deploy_key   # optional with agent: true, else required; with both,
                                  #   only this key is offered and the agent may hold it
                                  #   decrypted (how a passphrase-protected key is used)
      known_hosts: known_hosts    # every host's key, and the bastion's
      proxy_jump: jump@bastion.example.com:22   # one bastion: [user@]host[:port]
      ssh_config: ~/.ssh/config   # read by the OpenSSH client (default: none, -F /dev/null)
      become: true                # the agent, and so every hook, runs as root: `sudo -n`
      kex: [ecdh-sha2-nistp256]   # exact algorithm lists, e.g. for a FIPS-only host;
      ciphers: [aes256-gcm@openssh.com]       # unset: curve25519-sha256, aes-gcm
      macs: [hmac-sha2-256]                   #   (and the client's default MACs)
    ```

    - `agent: true` without `identity_file`: every key the agent holds is offered, and no
      file of ~/.ssh. A passphrase-protected `identity_file` needs `agent: true` and the key
      loaded (`ssh-add FILE`): Ferry never asks for a passphrase.
    - `proxy_jump`: the bastion's user defaults to `user`, its port to 22; Ferry logs in to
      it with the same key(s) and the same strict checks, then on to each host.
    - `ssh_config`: its settings apply except what Ferry forces on the command line (which
      wins): host key checking, known_hosts, batch mode, the route (ProxyJump/ProxyCommand
      come from `proxy_jump` only), multiplexing, forwarding, tty, the algorithm lists.
      The OpenSSH client only (not `bulk: paramiko`).
    - `become: true`: the login user needs passwordless sudo (NOPASSWD) for `python3`; a
      sudo that would ask for a password fails at once with a message naming `sudo -n`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    user: str = "root"
    identity_file: Path | None = None
    known_hosts: Path
    port: int = Field(22, ge=1, le=65535)
    connect_timeout: float = Field(10.0, gt=0, le=3600)
    # package bytes go through the OpenSSH client when installed (~2.7x paramiko's speed)
    bulk: Literal["openssh", "paramiko"] = "openssh"
    agent: bool = False
    proxy_jump: str | None = None
    ssh_config: Path | None = None
    become: bool = False
    # None: Ferry's defaults (orchestrator.transport.openssh / ssh)
    kex: tuple[str, ...] | None = None
    ciphers: tuple[str, ...] | None = None
    macs: tuple[str, ...] | None = None

    @field_validator("identity_file", "known_hosts", "ssh_config")
    @classmethod
    def _relative_to_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        try:
            value = value.expanduser()
        except RuntimeError:  # `~name` of a user this machine does not have
            raise ValueError(f"{value}: no user's home directory is called that") from None
        base = (info.context or {}).get("base_dir")
        return (Path(base) / value).resolve() if base and not value.is_absolute() else value

    @field_validator("proxy_jump")
    @classmethod
    def _one_bastion(cls, value: str | None) -> str | None:
        if value is None:
            return None
        m = _JUMP.match(value)
        port = int(m["port"]) if m and m["port"] else 22
        if not m or not 1 <= port <= 65535:
            hint = " (one bastion only)" if "," in value else ""
            raise ValueError(f"{value!r} is not [user@]host[:port]{hint}, e.g. jump@bastion:22")
        return value

    @field_validator("kex", "ciphers", "macs")
    @classmethod
    def _algorithms(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("an empty list allows nothing: leave it out for Ferry's default")
        for name in value:
            if not _ALGORITHM.match(name):
                raise ValueError(
                    f"{name!r} is not an algorithm name (an exact list: no +, - or ^ prefixes)"
                )
        return value

    @model_validator(mode="after")
    def _some_key(self) -> SSHSettings:
        if self.identity_file is None and not self.agent:
            raise ValueError("ssh.identity_file is required unless ssh.agent: true")
        return self

    @property
    def jump(self) -> tuple[str, str, int] | None:
        """The bastion as (user, host, port), or None for direct logins."""
        m = _JUMP.match(self.proxy_jump or "")
        if not m:
            return None
        return m["user"] or self.user, m["host"].strip("[]"), int(m["port"] or 22)


def is_address(value: str) -> bool:
    """A host name, an IPv4 address, or an IPv6 one (bare or in brackets)."""
    return bool(re.fullmatch(r"[A-Za-z0-9:][A-Za-z0-9.:_-]*|\[[0-9A-Fa-f:.]+\]", value))


class HostEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    address: str
    groups: tuple[str, ...] = ()
    port: int | None = Field(None, ge=1, le=65535)
    deploy_root: str | None = None
    window: str | None = None  # its maintenance window (pull `apply: window`)

    _root = field_validator("deploy_root")(_deploy_root)

    @field_validator("window")
    @classmethod
    def _window(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return RecurringWindow.model_validate(value).spec
        except ValidationError as exc:  # the calendar's own words, at this field
            raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        if not is_address(value):
            raise ValueError(f"address {value!r} is not a host name or an IP address")
        return value


class Host(BaseModel):
    """One host, fully resolved (inventory defaults applied)."""

    model_config = ConfigDict(frozen=True)
    name: str
    address: str
    port: int
    groups: tuple[str, ...]
    deploy_root: str
    window: str | None = None


class Inventory(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    ssh: SSHSettings
    deploy_root: str = "/srv/app"
    hosts: dict[str, HostEntry]

    _root = field_validator("deploy_root")(_deploy_root)

    @field_validator("hosts")
    @classmethod
    def _names(cls, hosts: dict[str, HostEntry]) -> dict[str, HostEntry]:
        if not hosts:
            raise ValueError("an inventory needs at least one host")
        for name in hosts:
            if not _NAME.match(name):
                raise ValueError(f"host name {name!r} may use letters, digits, '.', '_', '-'")
        for name, entry in hosts.items():
            for group in entry.groups:
                if group == "all":
                    raise ValueError(
                        f"{name}: group 'all' is every host already: remove it from groups"
                    )
                if group in hosts:
                    raise ValueError(
                        f"{name}: group {group!r} is also a host's name, so targets: {group} "
                        "would be ambiguous: rename the group"
                    )
                if not _NAME.match(group):
                    raise ValueError(
                        f"{name}: group {group!r} may use letters, digits, '.', '_', '-'"
                    )
        return hosts

    @model_validator(mode="after")
    def _one_host_per_address(self) -> Inventory:
        seen: dict[tuple[str, int], str] = {}
        for name, entry in self.hosts.items():
            where = (entry.address.lower(), entry.port or self.ssh.port)
            if where in seen:
                raise ValueError(
                    f"hosts {seen[where]} and {name} are both {where[0]}:{where[1]}: one "
                    "machine under two names would be deployed twice at once; give each "
                    "host its own address or port"
                )
            seen[where] = name
        return self

    def host(self, name: str) -> Host:
        entry = self.hosts[name]
        return Host(
            name=name,
            address=entry.address,
            port=entry.port or self.ssh.port,
            groups=entry.groups,
            deploy_root=entry.deploy_root or self.deploy_root,
            window=entry.window,
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
    """What the SSH settings name must be there before anything is recorded: the key,
    known_hosts and ssh_config files, and the agent; a passphrase-protected key needs it."""
    named = [("identity_file", ssh.identity_file), ("known_hosts", ssh.known_hosts),
             ("ssh_config", ssh.ssh_config)]  # fmt: skip
    for field, path in named:
        if path is not None and not Path(path).is_file():
            raise SpecError(
                where,
                f"ssh.{field}",
                f"{path} does not exist",
                "fix the path (relative paths are relative to the inventory file)",
            )
    if ssh.ssh_config is not None and ssh.bulk == "paramiko":
        raise SpecError(
            where, "ssh.ssh_config", "is read by the OpenSSH client only, not by bulk: paramiko",
            "set ssh.bulk: openssh, or remove ssh.ssh_config",
        )  # fmt: skip
    if ssh.agent:
        _require_agent(where)
    key = ssh.identity_file
    if key is not None and not ssh.agent and read_identity(key).encrypted:
        raise SpecError(
            where,
            "ssh.identity_file",
            f"{key} is passphrase-protected, and Ferry never asks for a passphrase",
            f"load it into ssh-agent (ssh-add {key}) and set ssh.agent: true",
        )


def _require_agent(where: str) -> None:
    sock = os.environ.get("SSH_AUTH_SOCK")
    if not sock:
        raise SpecError(
            where, "ssh.agent", "true, but SSH_AUTH_SOCK is not set: there is no ssh-agent to use",
            "run ferry where `ssh-add -l` lists the key, or set ssh.agent: false with an "
            "ssh.identity_file that has no passphrase",
        )  # fmt: skip
    try:
        is_socket = stat.S_ISSOCK(os.stat(sock).st_mode)
    except OSError:
        is_socket = False
    if not is_socket:
        raise SpecError(
            where, "ssh.agent", f"true, but SSH_AUTH_SOCK={sock} is no socket (the agent ended?)",
            "start ssh-agent again and ssh-add the key",
        )  # fmt: skip


@dataclass(frozen=True)
class Identity:
    """What an identity file says without its passphrase."""

    encrypted: bool
    public_blob: bytes | None  # the public key in SSH wire format, when the file tells it


_OPENSSH_MAGIC = b"openssh-key-v1\0"


def read_identity(path: Path) -> Identity:
    """Is the key passphrase-protected, and which public key is it (from FILE.pub, or from
    the OpenSSH container, whose public part is never encrypted)."""
    text = Path(path).read_text(errors="replace")
    public = _pub_file_blob(Path(path).with_name(Path(path).name + ".pub"))
    if "BEGIN OPENSSH PRIVATE KEY" not in text:  # PEM: an encrypted one says so in its header
        return Identity("ENCRYPTED" in text, public)
    body = "".join(ln for ln in text.splitlines() if ln and not ln.startswith("-----"))
    try:
        raw = base64.b64decode(body)
        if not raw.startswith(_OPENSSH_MAGIC):
            return Identity(False, public)
        fields, pos = [], len(_OPENSSH_MAGIC)
        for _ in range(3):  # cipher name, kdf name, kdf options
            size = int.from_bytes(raw[pos : pos + 4], "big")
            fields.append(raw[pos + 4 : pos + 4 + size])
            pos += 4 + size
        pos += 4  # number of keys (always 1)
        size = int.from_bytes(raw[pos : pos + 4], "big")
        return Identity(fields[0] != b"none", public or raw[pos + 4 : pos + 4 + size])
    except (ValueError, IndexError):
        return Identity(False, public)  # not ours to judge: ssh will say what is wrong


def _pub_file_blob(path: Path) -> bytes | None:
    try:
        parts = path.read_text().split()
        return base64.b64decode(parts[1]) if len(parts) >= 2 else None
    except (OSError, ValueError):
        return None
