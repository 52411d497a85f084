"""Session fixtures for the real SSH fleet, importable by every test area.

    # tests/<area>/conftest.py
    from tests.fleet.fixtures import fleet, small_fleet  # noqa: F401

`fleet` is 50 hosts, `small_fleet` is 12 hosts of a *separate* fleet (own bridge and /22),
so deploy tests on the small one never leave files on the big one's hosts. Each is started
once per pytest process however many conftests import it (a module-level registry with
reference counts, since pytest makes one fixture definition per importing conftest), and
taken down at session end: by the fixture's finally (also on failure and Ctrl-C), and, as
a safety net, by atexit and a SIGTERM/SIGHUP handler.

Faults: use `with fleet.faulted("h3", "down"): ...`, which undoes the fault however the
block ends, so the shared fleet stays healthy for the next test. `fleet.wipe([...])`
empties deploy roots.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

from orchestrator.lab.fleet import Fleet

FLEET_SIZE = 50
SMALL_FLEET_SIZE = 12

_lock = threading.Lock()
_live: dict[str, tuple[Fleet, int]] = {}
_net_installed = False


def _down_all() -> None:
    with _lock:
        for name, (fleet, _refs) in list(_live.items()):
            _finish(fleet)
            del _live[name]


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    _down_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_safety_net() -> None:
    global _net_installed
    if _net_installed:
        return
    atexit.register(_down_all)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _on_signal)
    _net_installed = True


def acquire(name: str, n: int) -> Fleet:
    """The shared fleet `name` of n hosts, started on first use."""
    with _lock:
        if name in _live:
            fleet, refs = _live[name]
            _live[name] = (fleet, refs + 1)
            return fleet
        _install_safety_net()
        directory = Path(tempfile.mkdtemp(prefix=f"ferry-{name}-"))
        fleet = Fleet.up(directory, n)
        _live[name] = (fleet, 1)
        return fleet


def release(name: str) -> None:
    with _lock:
        fleet, refs = _live[name]
        if refs > 1:
            _live[name] = (fleet, refs - 1)
            return
        del _live[name]
    _finish(fleet)


def _finish(fleet: Fleet) -> None:
    """Take the fleet down, then remove its temp dir (keys, configs, logs)."""
    fleet.down()
    shutil.rmtree(fleet.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def fleet() -> Iterator[Fleet]:
    """50 real sshd hosts h1..h50 (`fleet.inventory_path`, `fleet.ssh(host, cmd)`, …)."""
    shared = acquire("fleet", FLEET_SIZE)
    try:
        yield shared
    finally:
        release("fleet")


@pytest.fixture(scope="session")
def small_fleet() -> Iterator[Fleet]:
    """12 real sshd hosts h1..h12, a fleet of their own."""
    shared = acquire("small_fleet", SMALL_FLEET_SIZE)
    try:
        yield shared
    finally:
        release("small_fleet")


def machine_snapshot() -> dict[str, set[str]]:
    """What a fleet could leave behind: netns, links, mount points, and our child processes."""
    import subprocess

    def lines(argv: list[str]) -> set[str]:
        out = subprocess.run(argv, capture_output=True, text=True).stdout
        return {line.split()[0].split("@")[0] for line in out.splitlines() if line.strip()}

    with open("/proc/self/mountinfo") as fh:
        mounts = {line.split()[4] for line in fh}
    children = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                head, _, tail = Path(entry.path, "stat").read_text().rpartition(")")
            except OSError:
                continue
            stat = tail.split()
            # by PID and name, not state: the session's Prefect server, running at one
            # snapshot and asleep at the next, is the same child (a CI failure), and a
            # leftover says what it is
            if int(stat[1]) == os.getpid():
                children.add(f"{entry.name} {head.partition('(')[2]}")
    return {
        "netns": lines(["ip", "netns", "list"]),
        "links": lines(["ip", "-br", "link"]),
        "mounts": mounts,
        "children": children,
    }


def leftovers(
    before: dict[str, set[str]], after: dict[str, set[str]], own_id: str
) -> dict[str, set[str]]:
    """What appeared, minus what other live fleets (other sessions, other ids) own.

    /run/netns stays a mount point while any fleet lives, so it counts only when none does.
    """
    others = _other_fleet_ids() - {own_id}
    extra = {}
    for key in before:
        new = after[key] - before[key]
        new = {item for item in new if not any(oid in item for oid in others)}
        if others:
            new.discard("/run/netns")
        if new:
            extra[key] = new
    return extra


def _other_fleet_ids() -> set[str]:
    registry = Path("/run/ferry-lab")
    if not registry.exists():
        return set()
    return {p.stem for p in registry.glob("*.json") if p.stem != "baseline"}


__all__ = ["fleet", "small_fleet", "acquire", "release", "machine_snapshot", "leftovers"]
