"""Processes by PID, never by name: spawn, recognise, end and reap what a fleet started.

A PID is trusted only together with its start time (field 22 of /proc/PID/stat), so a
recycled PID after a crash or reboot is never signalled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

_children: dict[int, subprocess.Popen[bytes]] = {}


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[int, int]:
    """Start `argv` in its own session, output to `log`; return (pid, start time)."""
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    _children[proc.pid] = proc
    return proc.pid, start_time(proc.pid) or 0


def start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def is_ours(pid: int | None, started: int | None) -> bool:
    """The process is alive and is the one we started (same PID *and* start time)."""
    return bool(pid) and start_time(pid) == started and _state(pid) not in (None, "Z", "X")


def exited(pid: int) -> int | None:
    """Exit status if our child `pid` has ended (reaping it), else None."""
    proc = _children.get(pid)
    if proc is None:
        return None if _state(pid) not in (None, "Z", "X") else -1
    return proc.poll()


def descendants(roots: Iterable[int]) -> set[int]:
    """Every live process below `roots` (one scan of /proc)."""
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                ppid = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = list(roots)
    while todo:
        for child in kids.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def in_namespaces(ns_files: Iterable[Path]) -> set[int]:
    """PIDs whose network namespace is one of `ns_files` (what `ip netns pids` does)."""
    inodes = set()
    for path in ns_files:
        try:
            inodes.add(f"net:[{path.stat().st_ino}]")
        except OSError:
            continue
    if not inodes:
        return set()
    found = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.readlink(f"/proc/{entry.name}/ns/net") in inodes:
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


def signal_pid(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def kill_and_reap(pids: Iterable[int], timeout: float = 10.0) -> None:
    """SIGKILL each PID (a stopped one too) and wait until it is gone or reaped."""
    pids = [p for p in set(pids) if p > 1 and p != os.getpid()]
    for pid in pids:
        signal_pid(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    for pid in pids:
        proc = _children.pop(pid, None)
        if proc is not None:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            continue
        try:
            os.waitpid(pid, 0)  # a child started by another Fleet object of ours
            continue
        except ChildProcessError:
            pass
        while _state(pid) not in (None, "Z", "X") and time.monotonic() < deadline:
            time.sleep(0.02)


def pss_kib(pid: int) -> int | None:
    """Proportional set size of one process: its fair share of memory shared with others."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def run(argv: list[str], *, check: bool = True, input: str | None = None) -> str:
    """Run a short command (ip, tc, nsenter); raise with its stderr when it fails."""
    proc = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=60)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout
