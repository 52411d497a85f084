"""Names, addresses and config files of a lab fleet: pure functions, no I/O.

Addressing (namespace mode): 198.18.0.0/15 is cut into 128 slots of a /22 each; a fleet
takes one free slot, puts its bridge on the slot's first address and host hN on
`slot + 1 + N`. A /22 holds 1,021 hosts (the 1,000-host benchmark fits), and 128 slots let
many fleets (a test session's, the demo's, two CI runs) live side by side without
overlapping.

Names carry the fleet's random id, so two fleets never share a namespace or a link:
netns `ferry-<id>-hN`, root-side veth `fl<id>hN`, bridge `fl<id>br` (≤ 15 chars, the
kernel's limit). Inside its namespace every host's interface is `eth0`.

A bastion (optional) takes the slot's last usable address, netns `ferry-<id>-bastion`,
veth `fl<id>bj`; the fleet then has at most MAX_HOSTS - 1 hosts, and each host's namespace
gets a blackhole route to the bridge's address, so the root namespace cannot reach a host
except through the bastion (TCP replies to it go nowhere; no firewall needed).

Loopback mode (no root, or forced): host hN listens on 127.0.1.N (127.0.2.x past 254)
on one port per fleet; its deploy root is DIR/hosts/hN/root.
"""

from __future__ import annotations

import ipaddress
import shlex
from pathlib import Path
from typing import Any

LAB_NET = ipaddress.IPv4Network("198.18.0.0/15")
SLOT_PREFIX = 22
SLOTS = 2 ** (SLOT_PREFIX - LAB_NET.prefixlen)
MAX_HOSTS = 2 ** (32 - SLOT_PREFIX) - 3  # minus network, bridge, broadcast
PROXY_PORT = 2222  # where the latency proxy of a `slow` host listens (same address)
SSHD = "/usr/sbin/sshd"
# ecdh-sha2-nistp256 last: what a FIPS-only client offers (clients pick their first match)
KEX = "curve25519-sha256,curve25519-sha256@libssh.org,ecdh-sha2-nistp256"
CIPHERS = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,aes128-ctr,aes256-ctr"
LOOPBACK_BASE = ipaddress.IPv4Address("127.0.1.0")
BASTION = "bastion"
BASTION_INDEX = 2 ** (32 - SLOT_PREFIX) - 3  # slot + 1 + this = the last usable address
DEPLOY_USER = "ferry-lab-deploy"  # a non-root login with passwordless sudo (machine.py)


def host_names(n: int) -> list[str]:
    return [f"h{i}" for i in range(1, n + 1)]


def host_index(name: str) -> int:
    return int(name[1:])


def slot_network(slot: int) -> ipaddress.IPv4Network:
    first = int(LAB_NET.network_address) + slot * 2 ** (32 - SLOT_PREFIX)
    return ipaddress.IPv4Network((first, SLOT_PREFIX))


def bridge_cidr(slot: int) -> str:
    net = slot_network(slot)
    return f"{net[1]}/{SLOT_PREFIX}"


def netns_address(slot: int, index: int) -> str:
    return str(slot_network(slot)[1 + index])


def loopback_address(index: int) -> str:
    return str(LOOPBACK_BASE + index)


def netns_name(fleet_id: str, index: int) -> str:
    return f"ferry-{fleet_id}-h{index}"


def veth_name(fleet_id: str, index: int) -> str:
    return f"fl{fleet_id}h{index}"


def bridge_name(fleet_id: str) -> str:
    return f"fl{fleet_id}br"


def bastion_netns(fleet_id: str) -> str:
    return f"ferry-{fleet_id}-{BASTION}"


def bastion_veth(fleet_id: str) -> str:
    return f"fl{fleet_id}bj"


def groups_of(index: int) -> list[str]:
    """h1 is the canary; every host serves `web`; racks alternate a, b (odd, even)."""
    rack = "rack-a" if index % 2 else "rack-b"
    return (["canary"] if index == 1 else []) + ["web", rack]


def sshd_config(
    *,
    address: str,
    port: int,
    host_key: Path,
    authorized_keys: Path,
    root_login: bool,
    bastion: bool = False,
) -> str:
    """One host's sshd: key logins only, fast key exchange, no DNS, no PAM, room for fan-out.

    The bastion's forwards TCP (what `ssh -W` and paramiko's direct-tcpip ask) and runs no
    shell, no tty and no other forwarding."""
    lines = [
        f"ListenAddress {address}:{port}",
        f"HostKey {host_key}",
        "HostKeyAlgorithms ssh-ed25519",
        f"AuthorizedKeysFile {authorized_keys}",
        f"PermitRootLogin {'prohibit-password' if root_login else 'no'}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "UseDNS no",
        "PidFile none",
        "PrintMotd no",
        "PrintLastLog no",
        "X11Forwarding no",
        "MaxStartups 100:30:200",
        "MaxSessions 64",
        f"KexAlgorithms {KEX}",
        f"Ciphers {CIPHERS},chacha20-poly1305@openssh.com",
        "Subsystem sftp internal-sftp",
        "LogLevel INFO",
    ]
    if bastion:
        lines += [
            "AllowTcpForwarding local",
            "AllowAgentForwarding no",
            "AllowStreamLocalForwarding no",
            "PermitTunnel no",
            "PermitTTY no",
            "ForceCommand echo 'bastion: forwarding only' >&2; exit 1",
        ]
    # sshd reads AuthorizedKeysFile as the user, and a fleet's dir may be 0700 (mkdtemp):
    # for the non-root lab user, root reads the fleet's keys and hands them to sshd
    lines += [
        f"Match User {DEPLOY_USER}",
        "  AuthorizedKeysFile none",
        f"  AuthorizedKeysCommand /bin/cat {authorized_keys}",
        "  AuthorizedKeysCommandUser root",
    ]
    return "\n".join(lines) + "\n"


def boot_script(
    *,
    name: str,
    address: str,
    network: str,
    deploy_root: str,
    root_dir: Path,
    home_dir: Path,
    config: Path,
    hosts_file: Path,
    unreachable_from: str | None = None,
) -> str:
    """Runs as `nsenter --net=NS unshare -m -u --propagation private sh boot.sh`, becomes sshd.

    Everything it mounts lives in the host's private mount namespace and vanishes with its
    last process; `ip addr replace` makes it safe to run again for `restart`. The route
    gets `quickack`: see `quickack_route`. `hosts_file` (bound over /etc/hosts) names the
    host, as a real one's does: sudo warns on every run when it cannot resolve its own
    name. `unreachable_from`: an address this host never answers (a blackhole route).
    """
    q = shlex.quote
    blackhole = f"route replace blackhole {unreachable_from}/32" if unreachable_from else ""
    return f"""#!/bin/sh
set -e
hostname {q(name)}
echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 2>/dev/null || true
ip -b - <<EOF
link set lo up
addr replace {address}/{SLOT_PREFIX} dev eth0
link set eth0 up
{quickack_route(network, "eth0", address)}
{blackhole}
EOF
mount --bind {q(str(root_dir))} {q(deploy_root)}
mount --bind {q(str(home_dir))} /root
mount --bind {q(str(hosts_file))} /etc/hosts
exec {SSHD} -D -e -f {q(str(config))}
"""


def quickack_route(network: str, dev: str, src: str) -> str:
    """The subnet's route with delayed ACKs off (an `ip -b` line).

    OpenSSH sends small back-to-back packets before it sets TCP_NODELAY, so Nagle waits
    for a delayed ACK (40 ms) three times per login: 143 ms per `ssh host true` instead of
    56 ms. Real LANs have the same stall; in the lab it only costs test time.
    """
    return f"route replace {network} dev {dev} proto kernel scope link src {src} quickack 1"


def hosts_file(name: str, address: str) -> str:
    return f"127.0.0.1 localhost\n{address} {name}\n"


def ssh_config(
    hosts: dict[str, tuple[str, int]],
    *,
    user: str,
    identity: Path,
    known_hosts: Path,
    bastion: str | None = None,
) -> str:
    """`ssh -F DIR/ssh_config h1 hostname` works, with strict host key checking (through
    the bastion, when the fleet has one: the jump reads this file too)."""
    out: list[str] = []
    if bastion:
        out += [f"Host {BASTION}", f"  HostName {bastion}", "  Port 22", ""]
    for name, (address, port) in hosts.items():
        out += [f"Host {name}", f"  HostName {address}", f"  Port {port}"]
        out += [f"  ProxyJump {BASTION}", ""] if bastion else [""]
    out += [
        "Host *",
        f"  User {user}",
        f"  IdentityFile {identity}",
        "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {known_hosts}",
        "  GlobalKnownHostsFile /dev/null",
        "  StrictHostKeyChecking yes",
        "  HostKeyAlgorithms ssh-ed25519",
        "  BatchMode yes",
        "  KexAlgorithms curve25519-sha256",
        "  Ciphers aes128-gcm@openssh.com",
        "  ConnectTimeout 5",
        "  ControlMaster no",
        "  LogLevel ERROR",
    ]
    return "\n".join(out) + "\n"


def known_hosts_line(name: str, address: str, port: int, public_key: str) -> str:
    """The names OpenSSH and paramiko look up: the address ("[addr]:port" off 22) and hN."""
    where = address if port == 22 else f"[{address}]:{port}"
    names = [where, name if port == 22 else f"[{name}]:{port}"]
    return f"{','.join(names)} {public_key}\n"


def inventory(
    hosts: dict[str, tuple[str, int]],
    *,
    user: str,
    port: int,
    deploy_root: str,
    host_roots: dict[str, str] | None = None,
    identity: str = "client_key",
    known_hosts: str = "known_hosts",
    proxy_jump: str | None = None,
) -> dict[str, Any]:
    """Ferry's inventory (orchestrator.inventory); paths relative to the inventory file."""
    entries: dict[str, Any] = {}
    for name, (address, host_port) in hosts.items():
        entry: dict[str, Any] = {"address": address, "groups": groups_of(host_index(name))}
        if host_port != port:
            entry["port"] = host_port
        if host_roots and name in host_roots:
            entry["deploy_root"] = host_roots[name]
        entries[name] = entry
    return {
        "ssh": {
            "user": user,
            "identity_file": identity,
            "known_hosts": known_hosts,
            "port": port,
            "connect_timeout": 5,
            **({"proxy_jump": proxy_jump} if proxy_jump else {}),
        },
        "deploy_root": deploy_root,
        "hosts": entries,
    }
