"""A fleet of real sshd hosts on this machine: `Fleet.up(dir, n)`, `.ssh`, `.fault`, `.down()`.

Namespace mode (root): each host is its own network namespace on a bridge the fleet makes,
with its own mount + UTS namespace (deploy root and a clean home bound over /srv/app and
/root, hostname hN), running `sshd -D`. Loopback mode (not root, or FERRY_LAB_MODE=loopback):
plain sshd processes on 127.0.1.N, one port per fleet, deploy roots DIR/hosts/hN/root and
no own hostname — weaker, and said so in `status`.

Everything created is recorded in DIR/fleet.json before it is created; `down` reads it.
"""

from __future__ import annotations

import getpass
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import BadInput, NotFound
from orchestrator.lab import layout, machine, procs
from orchestrator.lab.keys import write_keypair
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
    ) -> Fleet:
        """Start n hosts h1..hn and write inventory.yaml, ssh_config, known_hosts, keys."""
        say = progress or (lambda _m: None)
        if not 1 <= n <= layout.MAX_HOSTS:
            raise BadInput(f"a fleet has 1 to {layout.MAX_HOSTS} hosts, not {n}")
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
        started = time.monotonic()
        fleet = cls(directory, cls._plan(directory, n, chosen, deploy_root))
        try:
            fleet._write_files()
            if chosen == "netns":
                fleet._make_network(say)
            say(f"starting {n} sshd ({chosen} mode)")
            for name in fleet.hosts:
                fleet._start_host(name)
            fleet.save()
            fleet._wait_ready(fleet.hosts, say)
        except BaseException:
            fleet.down()
            raise
        fleet.state.up_seconds = round(time.monotonic() - started, 2)
        fleet.save()
        say(f"{n} hosts up in {fleet.state.up_seconds:.1f} s ({directory})")
        return fleet

    @classmethod
    def _plan(cls, directory: Path, n: int, mode: str, deploy_root: str) -> FleetState:
        fleet_id = secrets.token_hex(3)
        hosts_dir = directory / "hosts"
        port = 22 if mode == "netns" else _free_port([layout.loopback_address(1)])
        state = FleetState(
            id=fleet_id,
            mode=mode,
            dir=str(directory),
            user="root" if mode == "netns" else getpass.getuser(),
            port=port,
            deploy_root=deploy_root,
        )
        for i, name in enumerate(layout.host_names(n), start=1):
            state.hosts[name] = HostState(
                name=name,
                index=i,
                address=layout.loopback_address(i) if mode == "loopback" else "",
                port=port,
                root_dir=str(hosts_dir / name / "root"),
                netns=layout.netns_name(fleet_id, i) if mode == "netns" else None,
                veth=layout.veth_name(fleet_id, i) if mode == "netns" else None,
            )
        state.write(directory / "fleet.json")
        return state

    def _make_network(self, say: Progress) -> None:
        """Take a free /23 and make the bridge (under the machine lock), then the hosts' links."""
        st = self.state
        st.bridge = layout.bridge_name(st.id)
        with machine.locked():
            machine.enter(st.id, self.dir, st.deploy_root)
            st.slot = machine.free_slot(st.id)
            st.bridge_cidr = layout.bridge_cidr(st.slot)
            for h in st.hosts.values():
                h.address = layout.netns_address(st.slot, h.index)
            self.save()
            procs.run(["ip", "link", "add", st.bridge, "type", "bridge"])
            Path(f"/proc/sys/net/ipv6/conf/{st.bridge}/disable_ipv6").write_text("1")
            procs.run(["ip", "addr", "add", st.bridge_cidr, "dev", st.bridge])
        say(f"network {layout.slot_network(st.slot)} on bridge {st.bridge}")
        net = str(layout.slot_network(st.slot))
        bridge_ip = st.bridge_cidr.split("/")[0]
        batch = [f"link set {st.bridge} up", layout.quickack_route(net, st.bridge, bridge_ip)]
        for h in st.hosts.values():
            batch += [
                f"netns add {h.netns}",
                f"link add {h.veth} type veth peer name eth0 netns {h.netns}",
                f"link set {h.veth} master {st.bridge} up",
            ]
        procs.run(["ip", "-b", "-"], input="\n".join(batch) + "\n")
        self._write_client_files()

    def _write_files(self) -> None:
        st = self.state
        client_pub = write_keypair(self.client_key_path, f"ferry-lab-{st.id}")
        (self.dir / "authorized_keys").write_text(client_pub + "\n")
        for h in st.hosts.values():
            hdir = self.dir / "hosts" / h.name
            if hdir.exists():
                shutil.rmtree(hdir)
            for sub in ("root", "home"):
                (hdir / sub).mkdir(parents=True)
            write_keypair(hdir / "ssh_host_ed25519_key", h.name)
        if st.mode == "loopback":
            self._write_client_files()

    def _write_client_files(self) -> None:
        """sshd_config per host (needs the address), ssh_config, known_hosts, inventory."""
        st = self.state
        root_login = st.mode == "netns" or os.geteuid() == 0
        known = []
        for h in st.hosts.values():
            hdir = self.dir / "hosts" / h.name
            (hdir / "sshd_config").write_text(
                layout.sshd_config(
                    address=h.address,
                    port=h.port,
                    host_key=hdir / "ssh_host_ed25519_key",
                    authorized_keys=self.dir / "authorized_keys",
                    root_login=root_login,
                )
            )
            pub = " ".join((hdir / "ssh_host_ed25519_key.pub").read_text().split()[:2])
            known.append(layout.known_hosts_line(h.name, h.address, h.port, pub))
            if st.mode == "netns":
                known.append(layout.known_hosts_line(h.name, h.address, layout.PROXY_PORT, pub))
                (hdir / "boot.sh").write_text(
                    layout.boot_script(
                        name=h.name,
                        address=h.address,
                        network=str(layout.slot_network(st.slot or 0)),
                        deploy_root=st.deploy_root,
                        root_dir=hdir / "root",
                        home_dir=hdir / "home",
                        config=hdir / "sshd_config",
                    )
                )
                h.mounts = [f"{hdir / 'root'} on {st.deploy_root}", f"{hdir / 'home'} on /root"]
        self.known_hosts_path.write_text("".join(known))
        self.ssh_config_path.write_text(
            layout.ssh_config(
                {n: (h.address, h.port) for n, h in st.hosts.items()},
                user=st.user,
                identity=self.client_key_path,
                known_hosts=self.known_hosts_path,
            )
        )
        self.write_inventory(self.inventory_path, relative=True)

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
        )
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def _start_host(self, name: str) -> None:
        h = self.state.hosts[name]
        hdir = self.dir / "hosts" / name
        if self.mode == "netns":
            argv = [
                "nsenter", f"--net=/run/netns/{h.netns}", "--",
                "unshare", "--mount", "--uts", "--propagation", "private", "--",
                "/bin/sh", str(hdir / "boot.sh"),
            ]  # fmt: skip
        else:
            argv = [layout.SSHD, "-D", "-e", "-f", str(hdir / "sshd_config")]
        h.pid, h.pid_start = procs.spawn(argv, hdir / "sshd.log")

    def _wait_ready(self, names: list[str], say: Progress, timeout: float | None = None) -> None:
        """Until every host's sshd sends its banner; fail naming a host whose sshd died."""
        deadline = time.monotonic() + (timeout or 30 + 0.5 * len(names))
        done, last_said = 0, time.monotonic()
        with ThreadPoolExecutor(min(32, len(names))) as pool:
            futures = {pool.submit(self._await_banner, n, deadline): n for n in names}
            for future in as_completed(futures):
                problem = future.result()
                if problem:
                    raise RuntimeError(f"{futures[future]}: {problem}")
                done += 1
                if time.monotonic() - last_said > 1 and done < len(names):
                    say(f"{done}/{len(names)} hosts accepting connections")
                    last_said = time.monotonic()

    def _await_banner(self, name: str, deadline: float) -> str | None:
        h = self.state.hosts[name]
        while time.monotonic() < deadline:
            if h.pid and procs.exited(h.pid) is not None:
                log = (self.dir / "hosts" / name / "sshd.log").read_text()[-600:]
                return f"sshd exited during start-up: {log.strip()}"
            if _listening(h.pid or 0, h.port) and ssh_banner(h.address, h.port, timeout=2.0):
                return None
            time.sleep(0.02)
        return "sshd did not answer in time"

    def live_hosts(self) -> list[str]:
        return [n for n, h in self.state.hosts.items() if procs.is_ours(h.pid, h.pid_start)]

    def down(self) -> None:
        """End every process, delete every namespace and link, restore shared state. Idempotent."""
        st = self.state
        pids = {h.pid for h in st.hosts.values() if procs.is_ours(h.pid, h.pid_start)}
        pids |= {
            h.proxy_pid for h in st.hosts.values() if procs.is_ours(h.proxy_pid, h.proxy_start)
        }
        ns_files = [Path("/run/netns") / h.netns for h in st.hosts.values() if h.netns]
        pids |= procs.in_namespaces(ns_files)
        pids |= procs.descendants(p for p in pids if p)
        procs.kill_and_reap(p for p in pids if p)
        if st.mode == "netns":
            links = {link["ifname"] for link in _json_links()}
            batch = [f"netns del {f.name}" for f in ns_files if f.exists()]
            batch += [f"link del {h.veth}" for h in st.hosts.values() if h.veth in links]
            batch += [f"link del {st.bridge}"] if st.bridge in links else []
            if batch:
                procs.run(["ip", "-force", "-b", "-"], input="\n".join(batch) + "\n", check=False)
            with machine.locked():
                self.state_path.unlink(missing_ok=True)
                machine.leave(st.id)
        self.state_path.unlink(missing_ok=True)
        for h in st.hosts.values():
            h.pid = h.proxy_pid = None
            h.faults = []

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
        memory = self.memory_kib()
        return {
            "dir": str(self.dir),
            "id": self.state.id,
            "mode": self.mode,
            "network": self.state.bridge_cidr,
            "bridge": self.state.bridge,
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


def ssh_banner(address: str, port: int, timeout: float) -> bool:
    """True when something at address:port speaks SSH (its version line)."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            return sock.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def _listening(pid: int, port: int) -> bool:
    """sshd has its listening socket (read in its own netns, so no probe before it exists)."""
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    fields = (line.split() for line in lines)
    return any(f[1].endswith(f":{port:04X}") and f[3] == "0A" for f in fields)


def _free_port(addresses: list[str]) -> int:
    """One port free on every loopback host address (the hosts share it, addresses differ)."""
    start = 20000 + secrets.randbelow(9000)
    for port in range(start, start + 1000):
        with socket.socket() as sock:
            try:
                sock.bind((addresses[0], port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port for a loopback fleet")


def _json_links() -> list[dict[str, Any]]:
    import json

    return json.loads(procs.run(["ip", "-j", "link"]) or "[]")


def python_argv(module: str) -> list[str]:
    """This interpreter running one of our modules (the latency proxy)."""
    return [sys.executable, "-m", module]
