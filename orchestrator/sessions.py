"""Host sessions of one deployment: one SSH connection per host, opened on first use and
reused by every step (Act). How to reach a host comes from the recorded rollout."""

from __future__ import annotations

import threading

from orchestrator.errors import BadInput
from orchestrator.hostops import HostOps
from orchestrator.rollout import HostAction, Rollout
from orchestrator.transport.ssh import SSHHost


class HostSessions:
    def __init__(self, rollout: Rollout) -> None:
        if rollout.ssh is None:
            raise BadInput("the rollout records no SSH settings: it cannot reach its hosts")
        self.rollout = rollout
        self.ssh = rollout.ssh
        self._ops: dict[str, HostOps] = {}
        self._lock = threading.Lock()

    def ops(self, action: HostAction) -> HostOps:
        with self._lock:
            ops = self._ops.get(action.host)
            if ops is None:
                conn = SSHHost(
                    action.as_host(), self.ssh, connect_timeout=self.rollout.timeouts.connect
                )
                ops = self._ops[action.host] = HostOps(
                    conn, action.deploy_root, self.rollout.timeouts.step
                )
            return ops

    def close(self) -> None:
        with self._lock:
            for ops in self._ops.values():
                ops.conn.close()
            self._ops.clear()
