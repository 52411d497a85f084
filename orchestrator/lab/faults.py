"""Faults on one lab host, each with its undo, recorded in fleet.json so `clear`/`down` see them.

down / up           cut / restore the host's link (root-side veth)      netns only
kill / restart      SIGKILL the host's sshd tree / start it again
hang / resume       SIGSTOP / SIGCONT its sshd: TCP connects, nothing answers
disk_full / disk_ok a tmpfs (size_mib, default 4) over the deploy root inside the host's
                    mount namespace, filled unless fill=False, so writes fail ENOSPC; it
                    hides the deploy root's files until disk_ok       netns only
slow / fast         rate="8mbit": tc tbf both ways on the host's link; delay_ms=N: a proxy
                    on ADDRESS:2222 adds N ms to every round trip (N/2 each way) — this
                    kernel has no netem, so latency is only on port 2222  netns only
clear               undo whatever is in force on the host
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import BadInput
from orchestrator.lab import build, layout, procs

if TYPE_CHECKING:
    from orchestrator.lab.fleet import Fleet

UNDO = {"down": "up", "kill": "restart", "hang": "resume", "disk_full": "disk_ok",
        "slow": "fast", "clear": "clear"}  # fmt: skip
KINDS = (*UNDO, *UNDO.values())
NETNS_ONLY = {"down", "up", "disk_full", "disk_ok", "slow", "fast"}


def normalise(kind: str) -> str:
    kind = kind.replace("-", "_").lower()
    if kind not in KINDS:
        raise BadInput(f"fault {kind!r}: use one of {', '.join(sorted(set(KINDS)))}")
    return kind


def apply(fleet: Fleet, host: str, kind: str, **params: Any) -> str:
    """Apply one fault (or undo); return a sentence saying what is now true of the host."""
    kind = normalise(kind)
    h = fleet._host(host)
    if kind in NETNS_ONLY and fleet.mode != "netns":
        raise BadInput(f"fault {kind} needs network namespaces; this fleet runs in loopback mode")
    text = _ACTIONS[kind](fleet, host, **params)
    undone = {v: k for k, v in UNDO.items()}.get(kind)
    if kind == "clear":
        h.faults = []
    elif undone:
        h.faults = [f for f in h.faults if f != undone]
        if kind == "restart":
            h.faults = [f for f in h.faults if f not in ("hang", "disk_full")]
    elif kind not in h.faults:
        h.faults.append(kind)
    fleet.save()
    return f"{host}: {text}"


def _link(fleet: Fleet, host: str, state: str) -> None:
    procs.run(["ip", "link", "set", fleet._host(host).veth or "", state])


def _down(fleet: Fleet, host: str) -> str:
    _link(fleet, host, "down")
    return "link cut (unreachable)"


def _up(fleet: Fleet, host: str) -> str:
    _link(fleet, host, "up")
    if fleet.state.bastion is not None:
        return "link up"  # behind the bastion: nothing to ask from here
    # the link comes back at once, but a loaded machine may take a moment to pass traffic
    # again: return when the host answers, so that "up" means reachable
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if build.ssh_banner(fleet.address(host), fleet.port(host), 1.0):
            return "link up"
        time.sleep(0.1)
    return "link up (the host did not answer within 15 s)"


def _live_pid(fleet: Fleet, host: str) -> int:
    pid = fleet.pid(host)
    if pid is None:
        raise BadInput(f"{host}: its sshd is not running (fault `restart` starts it)")
    return pid


def _kill(fleet: Fleet, host: str) -> str:
    h = fleet._host(host)
    pid = _live_pid(fleet, host)
    procs.kill_and_reap({pid} | procs.descendants([pid]))
    h.pid = h.pid_start = None
    h.mounts = []  # they lived in the mount namespace that just died with sshd
    return "sshd killed"


def _restart(fleet: Fleet, host: str) -> str:
    if fleet.pid(host) is not None:
        return "sshd already running"
    build.start_host(fleet, host)
    build.wait_ready(fleet, [host], lambda _m: None, timeout=20)
    h = fleet._host(host)
    if fleet.mode == "netns":
        h.mounts = build.mounts(fleet, h)
    return "sshd started"


def _hang(fleet: Fleet, host: str) -> str:
    procs.signal_pid(_live_pid(fleet, host), signal.SIGSTOP)
    return "sshd stopped (connections hang)"


def _resume(fleet: Fleet, host: str) -> str:
    pid = fleet.pid(host)
    if pid is not None:
        procs.signal_pid(pid, signal.SIGCONT)
    return "sshd running"


def _nsenter_mount(fleet: Fleet, host: str, script: str) -> None:
    pid = _live_pid(fleet, host)
    procs.run(["nsenter", "-t", str(pid), "-m", "--", "/bin/sh", "-c", script])


def _disk_full(fleet: Fleet, host: str, size_mib: int = 4, fill: bool = True) -> str:
    h = fleet._host(host)
    target = fleet.state.deploy_root
    if any(m.startswith("tmpfs") for m in h.mounts):
        return "deploy root already full"
    fill_cmd = f" && (cat /dev/zero > {target}/.ferry-lab-fill 2>/dev/null || true)"
    _nsenter_mount(
        fleet, host,
        f"mount -t tmpfs -o size={int(size_mib)}m,mode=755 ferry-lab-full {target}"
        + (fill_cmd if fill else ""),
    )  # fmt: skip
    h.mounts.append(f"tmpfs {size_mib}MiB on {target}")
    return f"{target} is a {size_mib} MiB tmpfs" + (", full" if fill else "")


def _disk_ok(fleet: Fleet, host: str) -> str:
    h = fleet._host(host)
    if any(m.startswith("tmpfs") for m in h.mounts):
        _nsenter_mount(fleet, host, f"umount {fleet.state.deploy_root}")
        h.mounts = [m for m in h.mounts if not m.startswith("tmpfs")]
    return "deploy root back to normal"


def _tbf(rate: str) -> list[str]:
    # burst must cover a timer tick at this rate; latency bounds the queue (drops past it)
    return ["root", "tbf", "rate", rate, "burst", "64kb", "latency", "500ms"]


def _slow(fleet: Fleet, host: str, rate: str | None = None, delay_ms: int | None = None) -> str:
    h = fleet._host(host)
    if rate is None and delay_ms is None:
        rate = "8mbit"
    said = []
    if rate:
        procs.run(["tc", "qdisc", "replace", "dev", h.veth or "", *_tbf(rate)])
        procs.run(["nsenter", f"--net=/run/netns/{h.netns}", "--",
                   "tc", "qdisc", "replace", "dev", "eth0", *_tbf(rate)])  # fmt: skip
        said.append(f"{rate} each way")
    if delay_ms:
        _stop_proxy(fleet, host)
        from orchestrator.lab.build import python_argv, ssh_banner

        argv = ["nsenter", f"--net=/run/netns/{h.netns}", "--",
                *python_argv("orchestrator.lab.delayproxy"),
                "--listen", f"{h.address}:{layout.PROXY_PORT}",
                "--connect", f"{h.address}:{h.port}", "--delay-ms", str(int(delay_ms))]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        log = Path(h.root_dir).parent / "proxy.log"
        h.proxy_pid, h.proxy_start = procs.spawn(argv, log, env=env)
        fleet.save()
        deadline = time.monotonic() + 10
        behind = fleet.state.bastion is not None  # no banner reaches us: its socket tells

        def ready() -> bool:
            if behind:
                return build.listening(h.proxy_pid or 0, layout.PROXY_PORT)
            return ssh_banner(h.address, layout.PROXY_PORT, timeout=1 + delay_ms / 1000)

        while not ready():
            if time.monotonic() > deadline or procs.exited(h.proxy_pid) is not None:
                raise RuntimeError(f"{host}: latency proxy did not start: {log.read_text()}")
            time.sleep(0.05)
        said.append(f"+{delay_ms} ms round trip on port {layout.PROXY_PORT}")
    return "slow: " + ", ".join(said)


def _stop_proxy(fleet: Fleet, host: str) -> None:
    h = fleet._host(host)
    if procs.is_ours(h.proxy_pid, h.proxy_start):
        procs.kill_and_reap([h.proxy_pid or 0])
    h.proxy_pid = h.proxy_start = None


def _fast(fleet: Fleet, host: str) -> str:
    h = fleet._host(host)
    procs.run(["tc", "qdisc", "del", "dev", h.veth or "", "root"], check=False)
    procs.run(["nsenter", f"--net=/run/netns/{h.netns}", "--",
               "tc", "qdisc", "del", "dev", "eth0", "root"], check=False)  # fmt: skip
    _stop_proxy(fleet, host)
    return "full speed"


def _clear(fleet: Fleet, host: str) -> str:
    faults = fleet._host(host).faults
    if "hang" in faults:
        _resume(fleet, host)
    if fleet.mode == "netns":
        _up(fleet, host)
        _fast(fleet, host)
    if fleet.pid(host) is None:
        _restart(fleet, host)
    elif fleet.mode == "netns":
        _disk_ok(fleet, host)
    return "healthy"


_ACTIONS: dict[str, Any] = {
    "down": _down, "up": _up, "kill": _kill, "restart": _restart, "hang": _hang,
    "resume": _resume, "disk_full": _disk_full, "disk_ok": _disk_ok, "slow": _slow,
    "fast": _fast, "clear": _clear,
}  # fmt: skip
