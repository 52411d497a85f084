"""A fleet of real sshd hosts on this machine: `Fleet.up(dir, n)`, `.ssh`, `.fault`, `.down()`.

Namespace mode (root): each host is its own network namespace on a bridge the fleet makes,
with its own mount + UTS namespace (deploy root and a clean home bound over /srv/app and
/root, hostname hN), running `sshd -D`. Loopback mode (not root, or FERRY_LAB_MODE=loopback):
plain sshd processes on 127.0.1.N, one port per fleet, deploy roots DIR/hosts/hN/root and
no own hostname — weaker, and said so in `status`.

Optional, namespace mode: a bastion (`Fleet.up(…, bastion=True)`), one more sshd on the
bridge that only forwards, and then the only way in — each host drops what it would send
to the root namespace, so inventory.yaml and ssh_config go through the bastion. The
machine's non-root login with passwordless sudo (`fleet.add_deploy_user()`, for
`ssh.become`). A passphrase-protected client key (`fleet.protected_key()`), for the
ssh-agent of orchestrator.lab.sshagent.

Everything created is recorded in DIR/fleet.json before it is created; `down` reads it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import BadInput, NotFound
from orchestrator.lab import build, layout, machine, procs
from orchestrator.lab.state import FleetState, HostState

Progress = Callable[[str], None]
MODES = ("netns", "loopback")


def choose_mode(requested: str | None = None) -> str:
    """netns when we are root and have the tools; FERRY_LAB_MODE or `requested` overrides."""
    wanted = requested or os.environ.get("FERRY_LAB_MODE") or "auto"
    if wanted in MODES:
        return wanted
    if wanted != "auto":
        raise BadInput(f"lab mode {wanted!r}: use auto, netns or loopback")
    tools = all(shutil.which(t) for t in ("ip", "nsenter", "unshare"))
    return "netns" if os.geteuid() == 0 and tools else "loopback"


class Fleet:
    def __init__(self, directory: Path, state: FleetState) -> None:
        self.dir = directory
        self.state = state

    # ---- files -------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.dir / "fleet.json"

    @property
    def inventory_path(self) -> Path:
        return self.dir / "inventory.yaml"

    @property
    def ssh_config_path(self) -> Path:
        return self.dir / "ssh_config"

    @property
    def known_hosts_path(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def client_key_path(self) -> Path:
        return self.dir / "client_key"

    @property
    def protected_key_path(self) -> Path:
        return self.dir / "client_key_protected"

    @property
    def bastion(self) -> str | None:
        """The bastion's address (user root, port 22), when the fleet has one."""
        return self.state.bastion.address if self.state.bastion else None

    @property
    def proxy_jump(self) -> str | None:
        """The inventory's `ssh.proxy_jump` for this fleet."""
        b = self.state.bastion
        return f"root@{b.address}:{b.port}" if b else None

    @property
    def deploy_user(self) -> str | None:
        """The non-root login with passwordless sudo, once `add_deploy_user` made it."""
        return self.state.deploy_user

    @property
    def hosts(self) -> list[str]:
        return list(self.state.hosts)

    @property
    def mode(self) -> str:
        return self.state.mode

    @property
    def up_seconds(self) -> float | None:
        return self.state.up_seconds

    def address(self, host: str) -> str:
        return self._host(host).address

    def port(self, host: str) -> int:
        return self._host(host).port

    def root_dir(self, host: str) -> Path:
        """The host's deploy root seen from here (tests read host files through it)."""
        return Path(self._host(host).root_dir)

    def deploy_root(self, host: str) -> str:
        """The deploy root as the host itself sees it (/srv/app, or its dir in loopback)."""
        return self.state.deploy_root if self.mode == "netns" else self._host(host).root_dir

    def pid(self, host: str) -> int | None:
        h = self._host(host)
        return h.pid if procs.is_ours(h.pid, h.pid_start) else None

    def _host(self, host: str) -> HostState:
        try:
            return self.state.hosts[host]
        except KeyError:
            raise NotFound(f"no host {host!r} in the fleet at {self.dir}") from None

    def save(self) -> None:
        self.state.write(self.state_path)

    def refresh(self) -> None:
        """Re-read fleet.json: another process (`ferry lab fault …`) may have changed it."""
        if self.state_path.exists():
            self.state = FleetState.read(self.state_path)

    # ---- lifecycle ---------------------------------------------------------------------
    @classmethod
    def load(cls, directory: Path) -> Fleet:
        directory = Path(directory).resolve()
        path = directory / "fleet.json"
        if not path.exists():
            raise NotFound(f"no lab fleet in {directory} (no fleet.json)")
        return cls(directory, FleetState.read(path))

    @classmethod
    def up(
        cls,
        directory: Path,
        n: int,
        *,
        mode: str | None = None,
        deploy_root: str = "/srv/app",
        progress: Progress | None = None,
        bastion: bool = False,
    ) -> Fleet:
        """Start n hosts h1..hn and write inventory.yaml, ssh_config, known_hosts, keys;
        with `bastion`, one more sshd that is the only way in to them."""
        say = progress or (lambda _m: None)
        most = layout.MAX_HOSTS - (1 if bastion else 0)
        if not 1 <= n <= most:
            raise BadInput(f"a fleet has 1 to {most} hosts, not {n}")
        if not deploy_root.startswith("/") or deploy_root.rstrip("/") in ("", "/root"):
            raise BadInput(f"deploy root {deploy_root!r} must be an absolute dir other than /")
        directory = Path(directory).resolve()
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / "fleet.json").exists():
            old = cls.load(directory)
            if old.live_hosts():
                raise BadInput(
                    f"a fleet of {len(old.hosts)} hosts is already running in {directory} "
                    f"({len(old.live_hosts())} sshd alive); run `ferry lab down --dir "
                    f"{directory}` first"
                )
            say(f"{directory}: removing what a crashed fleet left")
            old.down()
        chosen = choose_mode(mode)
        if bastion and chosen != "netns":
            raise BadInput("a bastion needs network namespaces; this fleet would run in loopback")
        started = time.monotonic()
        fleet = cls(directory, build.plan(directory, n, chosen, deploy_root, bastion))
        try:
            build.write_files(fleet)
            if chosen == "netns":
                build.make_network(fleet, say)
            names = [h.name for h in build.machines(fleet.state)]
            say(f"starting {len(names)} sshd ({chosen} mode)")
            for name in names:
                build.start_host(fleet, name)
            fleet.save()
            build.wait_ready(fleet, names, say)
        except BaseException:
            fleet.down()
            raise
        fleet.state.up_seconds = round(time.monotonic() - started, 2)
        fleet.save()
        say(f"{n} hosts up in {fleet.state.up_seconds:.1f} s ({directory})")
        return fleet

    def write_inventory(
        self,
        path: Path,
        hosts: list[str] | None = None,
        *,
        port: int | None = None,
        relative: bool = False,
    ) -> Path:
        """An inventory of `hosts` (default all) anywhere; `port` e.g. the latency proxy's."""
        st = self.state
        chosen = hosts or self.hosts
        data = layout.inventory(
            {n: (st.hosts[n].address, port or st.hosts[n].port) for n in chosen},
            user=st.user,
            port=port or st.port,
            deploy_root=st.deploy_root,
            host_roots={n: st.hosts[n].root_dir for n in chosen} if st.mode == "loopback" else None,
            identity="client_key" if relative else str(self.client_key_path),
            known_hosts="known_hosts" if relative else str(self.known_hosts_path),
            proxy_jump=self.proxy_jump,
        )
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def live_hosts(self) -> list[str]:
        return [n for n, h in self.state.hosts.items() if procs.is_ours(h.pid, h.pid_start)]

    def down(self) -> None:
        """End every process, delete every namespace and link, restore shared state. Idempotent."""
        self.refresh()
        from orchestrator.lab import docker

        docker.stop(self)  # engines first: they unmount their layers while the host lives
        st = self.state
        every = build.machines(st)
        pids = {h.pid for h in every if procs.is_ours(h.pid, h.pid_start)}
        pids |= {h.proxy_pid for h in every if procs.is_ours(h.proxy_pid, h.proxy_start)}
        ns_files = [Path("/run/netns") / h.netns for h in every if h.netns]
        pids |= procs.in_namespaces(ns_files)
        pids |= _pull_agents(every)  # loopback hosts' daemons left their sshd's tree
        pids |= procs.descendants(p for p in pids if p)
        procs.kill_and_reap(p for p in pids if p)
        if st.mode == "netns":
            links = {link["ifname"] for link in _json_links()}
            batch = [f"netns del {f.name}" for f in ns_files if f.exists()]
            batch += [f"link del {h.veth}" for h in every if h.veth in links]
            batch += [f"link del {st.bridge}"] if st.bridge in links else []
            if batch:
                procs.run(["ip", "-force", "-b", "-"], input="\n".join(batch) + "\n", check=False)
            with machine.locked():
                self.state_path.unlink(missing_ok=True)
                machine.leave(st.id)
        self.state_path.unlink(missing_ok=True)
        for h in every:
            h.pid = h.proxy_pid = None
            h.faults = []

    def add_deploy_user(self) -> str:
        """The machine's non-root login with passwordless `sudo -n` (`ferry-lab-deploy`), on
        every host at once (they share /etc/passwd); the last fleet down removes it."""
        if self.mode != "netns":
            raise BadInput("the deploy user needs namespace mode (root)")
        with machine.locked():
            user = machine.add_deploy_user()
        self.state.deploy_user = user
        self.save()
        return user

    def protected_key(self) -> tuple[Path, str]:
        """A passphrase-protected client key, authorized on every host (made on first use),
        and its passphrase: for an ssh-agent (orchestrator.lab.sshagent.SSHAgent)."""
        path = self.protected_key_path
        secret = path.with_name(path.name + ".passphrase")
        if not secret.exists():
            passphrase = secrets.token_urlsafe(12)
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".pub").unlink(missing_ok=True)
            procs.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase,
                       "-C", f"ferry-lab-{self.state.id}-protected", "-f", str(path)])  # fmt: skip
            pub = path.with_name(path.name + ".pub").read_text()
            with open(self.dir / "authorized_keys", "a") as fh:
                fh.write(pub)
            fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(passphrase)
        return path, secret.read_text()

    # ---- use ---------------------------------------------------------------------------
    def ssh(
        self,
        host: str,
        command: str,
        *,
        timeout: float = 30.0,
        port: int | None = None,
        input: str | None = None,
        options: tuple[str, ...] = (),
    ) -> subprocess.CompletedProcess[str]:
        """Run `command` on `host` with OpenSSH and DIR/ssh_config (strict host keys)."""
        self._host(host)
        argv = ["ssh", "-F", str(self.ssh_config_path), *options]
        argv += ["-p", str(port)] if port else []
        return subprocess.run(
            [*argv, host, command], capture_output=True, text=True, timeout=timeout, input=input
        )

    def fault(self, host: str, kind: str, **params: Any) -> str:
        """Inject (or undo) a fault on one host; see orchestrator.lab.faults for the kinds."""
        from orchestrator.lab import faults

        self.refresh()
        return faults.apply(self, host, kind, **params)

    @contextmanager
    def faulted(self, host: str, kind: str, **params: Any) -> Iterator[Fleet]:
        """`with fleet.faulted("h3", "down"): ...` — the fault is undone however the block ends."""
        from orchestrator.lab import faults

        self.fault(host, kind, **params)
        try:
            yield self
        finally:
            self.fault(host, faults.UNDO[faults.normalise(kind)])

    def wipe(self, hosts: list[str] | None = None) -> None:
        """Empty hosts' deploy roots, so a test starts from a clean host."""
        for name in hosts or self.hosts:
            root = self.root_dir(name)
            for entry in root.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()

    def memory_kib(self) -> dict[str, int]:
        """PSS of each host's sshd processes (listener and sessions), in KiB."""
        out = {}
        for name in self.live_hosts():
            pid = self.state.hosts[name].pid or 0
            pids = {pid} | procs.descendants([pid])
            out[name] = sum(procs.pss_kib(p) or 0 for p in pids)
        return out

    def status(self) -> dict[str, Any]:
        self.refresh()
        memory = self.memory_kib()
        return {
            "dir": str(self.dir),
            "id": self.state.id,
            "mode": self.mode,
            "network": self.state.bridge_cidr,
            "bridge": self.state.bridge,
            "bastion": self.bastion,
            # where the hosts reach this machine (a DML server for pull agents listens there)
            "gateway": self.state.bridge_cidr.split("/")[0]
            if self.state.bridge_cidr
            else "127.0.0.1",
            "up_seconds": self.state.up_seconds,
            "hosts": [
                {
                    "name": n,
                    "address": h.address,
                    "port": h.port,
                    "alive": n in memory,
                    "faults": h.faults,
                    "pss_kib": memory.get(n),
                }
                for n, h in self.state.hosts.items()
            ],
        }


def _pull_agents(hosts: list[HostState]) -> set[int]:
    """The pull agent daemons the hosts run (`ferry agent install` wrote their pid files):
    only a pid whose command line is the agent's supervisor, never a reused one."""
    found: set[int] = set()
    for h in hosts:
        root = getattr(h, "root_dir", None)
        if not root:
            continue
        pidfile = Path(root) / ".ferry" / "pull" / "daemon.pid"
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if b"supervise.sh" in cmdline:
            found.add(pid)
    return found


def _json_links() -> list[dict[str, Any]]:
    import json

    return json.loads(procs.run(["ip", "-j", "link"]) or "[]")
