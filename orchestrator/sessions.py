"""Host sessions of one deployment: one agent session (one SSH connection, one agent
process) per host, opened on first use and reused by every step (Act). How to reach a
host comes from the recorded rollout. `release(host)` ends a host's session once its wave
work is done, so a large fleet never holds more sessions than it is working on."""

from __future__ import annotations

import resource
import threading
import time
from typing import Any

from orchestrator.errors import BadInput
from orchestrator.hostops import HostOps
from orchestrator.rollout import HostAction, Rollout


def _allow_descriptors() -> None:
    """Each session holds three pipes to its ssh: a wide fan-out needs more than 1,024."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 65536
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, 65536), hard))
    except (ValueError, OSError):
        pass  # keep the limit we have; sessions past it fail as their hosts' steps


class HostSessions:
    def __init__(self, rollout: Rollout) -> None:
        _allow_descriptors()
        if rollout.ssh is None:
            raise BadInput("the rollout records no SSH settings: it cannot reach its hosts")
        self.rollout = rollout
        self.ssh = rollout.ssh
        self._ops: dict[str, HostOps] = {}
        self._lock = threading.Lock()
        self._ended_logins = 0  # logins of sessions already released
        self._ending: list[Any] = []  # released sessions' connections, not yet reaped

    def ops(self, action: HostAction) -> HostOps:
        with self._lock:
            ops = self._ops.get(action.host)
            if ops is None:
                ops = self._ops[action.host] = HostOps.open(
                    action.as_host(),
                    self.ssh,
                    action.deploy_root,
                    timeout=self.rollout.timeouts.step,
                    connect_timeout=self.rollout.timeouts.connect,
                )
            return ops

    def release(self, host: str) -> None:
        """End a host's session, its work done. Its ssh is told to end (EOF) and not waited
        for: it exits while other hosts work, and is reaped by a later release that finds it
        gone, or by close."""
        with self._lock:
            ops = self._ops.pop(host, None)
            if ops is not None:
                self._ended_logins += ops.session.logins
        if ops is None:
            return
        pipe = ops.hang_up()
        gone: list[Any] = []
        with self._lock:
            ending, self._ending = self._ending + ([pipe] if pipe is not None else []), []
            for p in ending:
                (gone if p.ended() else self._ending).append(p)
        for p in gone:
            p.close()

    @property
    def logins(self) -> int:
        """SSH logins this deployment made so far (a session each, plus any restarts)."""
        with self._lock:
            return self._ended_logins + sum(o.session.logins for o in self._ops.values())

    def close(self) -> None:
        with self._lock:
            ops, self._ops = list(self._ops.values()), {}
            self._ended_logins += sum(o.session.logins for o in ops)
        # every session is told to end before any is waited for: their ends overlap, so
        # this costs the slowest one's and not the sum (each ssh takes ~8 ms to exit)
        pipes = [p for p in (o.hang_up() for o in ops) if p is not None]
        with self._lock:
            pipes, self._ending = self._ending + pipes, []
        deadline = time.monotonic() + 2
        for p in pipes:
            p.close(deadline)
