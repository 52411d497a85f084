"""Bringing a fleet up, step by step: plan the names, write keys and configs, make the
network, start each sshd, wait until each answers. `Fleet.up` runs these in order;
faults reuse `start_host` and `wait_ready` for `restart`.
"""

from __future__ import annotations

import getpass
import os
import secrets
import shutil
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.lab import layout, machine, procs
from orchestrator.lab.keys import write_keypair
from orchestrator.lab.state import FleetState, HostState

if TYPE_CHECKING:
    from orchestrator.lab.fleet import Fleet, Progress


def plan(directory: Path, n: int, mode: str, deploy_root: str, bastion: bool = False) -> FleetState:
    """Every name the fleet will use, written to fleet.json before anything exists."""
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
    if bastion:
        state.bastion = HostState(
            name=layout.BASTION,
            index=layout.BASTION_INDEX,
            address="",
            port=port,
            root_dir=str(hosts_dir / layout.BASTION / "root"),
            netns=layout.bastion_netns(fleet_id),
            veth=layout.bastion_veth(fleet_id),
        )
    state.write(directory / "fleet.json")
    return state


def machines(st: FleetState) -> list[HostState]:
    """Every sshd of the fleet: its hosts, then the bastion if it has one."""
    return [*st.hosts.values(), *([st.bastion] if st.bastion else [])]


def machine_state(fleet: Fleet, name: str) -> HostState:
    st = fleet.state
    return st.bastion if st.bastion and name == st.bastion.name else st.hosts[name]


# the kernel's neighbour (ARP) table: by default it starts evicting at 512 entries and
# refuses past 1,024, machine-wide, so hosts of a large fleet go "No route to host"
NEIGH = Path("/proc/sys/net/ipv4/neigh/default")


def neighbours_for(hosts: int) -> None:
    """Raise the ARP table's thresholds (never lower them) to hold every fleet host twice."""
    for name, factor in (("gc_thresh1", 1), ("gc_thresh2", 2), ("gc_thresh3", 4)):
        path = NEIGH / name
        try:
            current = int(path.read_text())
            want = max(current, 2 * hosts * factor)
            if want > current:
                path.write_text(str(want))
        except (OSError, ValueError):
            pass  # not root or no such tunable: small fleets never need it


def make_network(fleet: Fleet, say: Progress) -> None:
    """Take a free /22 and make the bridge (under the machine lock), then the hosts' links."""
    st = fleet.state
    st.bridge = layout.bridge_name(st.id)
    with machine.locked():
        machine.enter(st.id, fleet.dir, st.deploy_root)
        st.slot = machine.free_slot(st.id)
        st.bridge_cidr = layout.bridge_cidr(st.slot)
        for h in machines(st):
            h.address = layout.netns_address(st.slot, h.index)
        fleet.save()
        neighbours_for(len(st.hosts) + 1)
        procs.run(["ip", "link", "add", st.bridge, "type", "bridge"])
        Path(f"/proc/sys/net/ipv6/conf/{st.bridge}/disable_ipv6").write_text("1")
        procs.run(["ip", "addr", "add", st.bridge_cidr, "dev", st.bridge])
    say(f"network {layout.slot_network(st.slot)} on bridge {st.bridge}")
    net = str(layout.slot_network(st.slot))
    bridge_ip = st.bridge_cidr.split("/")[0]
    batch = [f"link set {st.bridge} up", layout.quickack_route(net, st.bridge, bridge_ip)]
    for h in machines(st):
        batch += [
            f"netns add {h.netns}",
            f"link add {h.veth} type veth peer name eth0 netns {h.netns}",
            f"link set {h.veth} master {st.bridge} up",
        ]
    procs.run(["ip", "-b", "-"], input="\n".join(batch) + "\n")
    write_client_files(fleet)


def write_files(fleet: Fleet) -> None:
    st = fleet.state
    client_pub = write_keypair(fleet.client_key_path, f"ferry-lab-{st.id}")
    (fleet.dir / "authorized_keys").write_text(client_pub + "\n")
    for h in machines(st):
        hdir = fleet.dir / "hosts" / h.name
        if hdir.exists():
            shutil.rmtree(hdir)
        for sub in ("root", "home"):
            (hdir / sub).mkdir(parents=True)
        write_keypair(hdir / "ssh_host_ed25519_key", h.name)
    if st.mode == "loopback":
        write_client_files(fleet)


def write_client_files(fleet: Fleet) -> None:
    """sshd_config per host (needs the address), ssh_config, known_hosts, inventory."""
    st = fleet.state
    root_login = st.mode == "netns" or os.geteuid() == 0
    # with a bastion, the hosts never answer the root namespace (the bridge's address)
    closed_to = st.bridge_cidr.split("/")[0] if st.bastion and st.bridge_cidr else None
    known = []
    for h in machines(st):
        hdir = fleet.dir / "hosts" / h.name
        is_bastion = h is st.bastion
        (hdir / "sshd_config").write_text(
            layout.sshd_config(
                address=h.address,
                port=h.port,
                host_key=hdir / "ssh_host_ed25519_key",
                authorized_keys=fleet.dir / "authorized_keys",
                root_login=root_login,
                bastion=is_bastion,
            )
        )
        pub = " ".join((hdir / "ssh_host_ed25519_key.pub").read_text().split()[:2])
        known.append(layout.known_hosts_line(h.name, h.address, h.port, pub))
        if st.mode == "netns":
            known.append(layout.known_hosts_line(h.name, h.address, layout.PROXY_PORT, pub))
            (hdir / "etc_hosts").write_text(layout.hosts_file(h.name, h.address))
            (hdir / "boot.sh").write_text(
                layout.boot_script(
                    name=h.name,
                    address=h.address,
                    network=str(layout.slot_network(st.slot or 0)),
                    deploy_root=st.deploy_root,
                    root_dir=hdir / "root",
                    home_dir=hdir / "home",
                    config=hdir / "sshd_config",
                    hosts_file=hdir / "etc_hosts",
                    unreachable_from=None if is_bastion else closed_to,
                )
            )
            h.mounts = mounts(fleet, h)
    fleet.known_hosts_path.write_text("".join(known))
    fleet.ssh_config_path.write_text(
        layout.ssh_config(
            {n: (h.address, h.port) for n, h in st.hosts.items()},
            user=st.user,
            identity=fleet.client_key_path,
            known_hosts=fleet.known_hosts_path,
            bastion=st.bastion.address if st.bastion else None,
        )
    )
    fleet.write_inventory(fleet.inventory_path, relative=True)


def mounts(fleet: Fleet, h: HostState) -> list[str]:
    """What boot.sh binds inside the host's mount namespace (netns mode)."""
    hdir = fleet.dir / "hosts" / h.name
    return [f"{hdir / 'root'} on {fleet.state.deploy_root}", f"{hdir / 'home'} on /root",
            f"{hdir / 'etc_hosts'} on /etc/hosts"]  # fmt: skip


def start_host(fleet: Fleet, name: str) -> None:
    h = machine_state(fleet, name)
    hdir = fleet.dir / "hosts" / name
    if fleet.mode == "netns":
        argv = [
            "nsenter", f"--net=/run/netns/{h.netns}", "--",
            "unshare", "--mount", "--uts", "--propagation", "private", "--",
            "/bin/sh", str(hdir / "boot.sh"),
        ]  # fmt: skip
    else:
        argv = [layout.SSHD, "-D", "-e", "-f", str(hdir / "sshd_config")]
    h.pid, h.pid_start = procs.spawn(argv, hdir / "sshd.log")


def wait_ready(fleet: Fleet, names: list[str], say: Progress, timeout: float | None = None) -> None:
    """Until every host's sshd sends its banner; fail naming a host whose sshd died."""
    deadline = time.monotonic() + (timeout or 30 + 0.5 * len(names))
    done, last_said = 0, time.monotonic()
    with ThreadPoolExecutor(min(32, len(names))) as pool:
        futures = {pool.submit(await_banner, fleet, n, deadline): n for n in names}
        for future in as_completed(futures):
            problem = future.result()
            if problem:
                raise RuntimeError(f"{futures[future]}: {problem}")
            done += 1
            if time.monotonic() - last_said > 1 and done < len(names):
                say(f"{done}/{len(names)} hosts accepting connections")
                last_said = time.monotonic()


def await_banner(fleet: Fleet, name: str, deadline: float) -> str | None:
    h = machine_state(fleet, name)
    # behind a bastion a host answers no banner to us: its listening socket is the sign
    from_here = not fleet.state.bastion or h is fleet.state.bastion
    while time.monotonic() < deadline:
        if h.pid and procs.exited(h.pid) is not None:
            log = (fleet.dir / "hosts" / name / "sshd.log").read_text()[-600:]
            return f"sshd exited during start-up: {log.strip()}"
        if listening(h.pid or 0, h.port) and (
            not from_here or ssh_banner(h.address, h.port, timeout=2.0)
        ):
            return None
        time.sleep(0.02)
    return "sshd did not answer in time"


def ssh_banner(address: str, port: int, timeout: float) -> bool:
    """True when something at address:port speaks SSH (its version line)."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            return sock.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def listening(pid: int, port: int) -> bool:
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


def python_argv(module: str) -> list[str]:
    """This interpreter running one of our modules (the latency proxy)."""
    return [sys.executable, "-m", module]
