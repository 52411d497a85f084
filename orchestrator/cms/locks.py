"""Host locks: one deployment, backout or recover at a time per host, held in the CMS.

A lock is one `host_locks` row per host, written in one transaction for all the run's hosts
before any host is touched (all or none: two runs never each hold half). The row names its
holder — the deployment, who, since when, which process on which machine — and carries a
lease: the holder renews `expires_at` while it lives (a daemon thread) and deletes its rows
on every exit path it survives. A row is stale when its lease ran out (any machine: this is
what works across machines) or when its process on this machine is gone (at once, no need
to wait out the lease; a reused PID is told apart by the process's start time).

A stale row is taken over, except when its deployment is still open: that deployment died
half-way, and its hosts are in whatever state it left them, so a new run is refused until
`ferry remediate recover N` (or a backout of N) has finished it; those two pass
`takeover=N` and take its rows. Refusals raise LockHeld (exit 3) naming the holder; a
caller may wait instead (`--wait-lock DURATION`).

On SQLite every CMS transaction is BEGIN IMMEDIATE, so two acquirers are serialised; on
PostgreSQL two inserts of one host's row collide on its primary key and the loser retries,
reading the winner's row as a conflict.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError as DBIntegrityError

from orchestrator.cms import deployments
from orchestrator.cms.db import session_scope
from orchestrator.cms.models import HostLock, utcnow
from orchestrator.errors import LockHeld

Progress = Callable[[str], None]
DEFAULT_LEASE = 60.0


def lease_seconds() -> float:
    """The lease (seconds): FERRY_LOCK_LEASE, else 60; a holder renews it every third."""
    try:
        value = float(os.environ.get("FERRY_LOCK_LEASE", DEFAULT_LEASE))
    except ValueError:
        return DEFAULT_LEASE
    return min(max(value, 1.0), 3600.0)


def process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' when it is gone): a PID reused
    by another process has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]


@dataclass(frozen=True)
class Holder:
    host: str
    purpose: str
    deployment_id: int | None
    release: str
    actor: str
    machine: str
    pid: int
    acquired_at: datetime
    expires_at: datetime
    dead: bool = False  # its process is gone or its lease ran out
    needs_recover: bool = False  # …and its deployment never finished

    @classmethod
    def of(cls, row: HostLock, dead: bool = False, needs_recover: bool = False) -> Holder:
        return cls(
            row.host,
            row.purpose,
            row.deployment_id,
            row.release,
            row.actor,
            row.machine,
            row.pid,
            row.acquired_at,
            row.expires_at,
            dead,
            needs_recover,
        )

    def describe(self) -> str:
        what = f"deployment {self.deployment_id}" if self.deployment_id else "a deployment"
        if self.purpose != "deploy":
            what = f"a {self.purpose} of deployment {self.deployment_id or '?'}"
        of = f" of {self.release}" if self.release and self.purpose == "deploy" else ""
        return (
            f"{what}{of} by {self.actor} since {self.acquired_at:%Y-%m-%d %H:%M:%S} UTC "
            f"(process {self.pid} on {self.machine})"
        )


def _refusal(holders: list[Holder], waited: float) -> LockHeld:
    first = holders[0]
    hosts = sorted(h.host for h in holders)
    named = ", ".join(hosts[:5]) + (f" (+{len(hosts) - 5})" if len(hosts) > 5 else "")
    if first.needs_recover:
        fix = (
            f"its process died before it finished: run `ferry remediate recover "
            f"{first.deployment_id}` first"
        )
    else:
        fix = "wait for it (--wait-lock 10m queues behind it) or see `ferry status`"
    after = f" after waiting {waited:.0f}s" if waited else ""
    return LockHeld(
        f"host {named} locked by {first.describe()}{after}: {fix}",
        reasons=[f"locked by {h.describe()}" for h in holders[:5]],
        details={
            "holder": {
                "deployment": first.deployment_id,
                "purpose": first.purpose,
                "actor": first.actor,
                "since": first.acquired_at.isoformat(),
                "pid": first.pid,
                "machine": first.machine,
            },
            "hosts": hosts,
        },
    )


class HostLocks:
    """The locks of one run (deploy, backout or recover) on its hosts."""

    def __init__(
        self,
        url: str,
        hosts: list[str],
        *,
        purpose: str,
        actor: str,
        deployment_id: int | None = None,
        release: str = "",
        takeover: int | None = None,
        force: bool = False,
        lease: float | None = None,
        on_lost: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.url = url
        self.hosts = sorted(set(hosts))
        self.purpose = purpose
        self.actor = actor
        self.deployment_id = deployment_id
        self.release_name = release
        self.takeover = takeover
        self.force = force
        self.lease = lease if lease is not None else lease_seconds()
        self.on_lost = on_lost
        self.token = uuid.uuid4().hex
        self.machine = socket.gethostname()
        self.pid = os.getpid()
        self.held = False
        self.waited = 0.0
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # -- acquiring -------------------------------------------------------------------------
    def acquire(self, wait: float = 0.0, progress: Progress | None = None) -> None:
        """Take every host's lock, or raise LockHeld naming the holder (after `wait` s)."""
        start = time.monotonic()
        told = False
        while True:
            conflicts = self.try_acquire()
            if not conflicts:
                self.waited = time.monotonic() - start
                self._start_renewing()
                return
            waited = time.monotonic() - start
            if waited >= wait or any(c.needs_recover for c in conflicts):
                raise _refusal(conflicts, waited)
            if progress and not told:
                progress(
                    f"waiting for the lock of {len(conflicts)} host(s): {conflicts[0].describe()}"
                )
                told = True
            time.sleep(min(2.0, max(0.1, wait - waited)) * random.uniform(0.5, 1.0))

    def try_acquire(self) -> list[Holder]:
        """One attempt: [] when every lock is ours now, else the holders in the way."""
        for _attempt in range(5):
            try:
                return self._attempt()
            except DBIntegrityError:  # PostgreSQL: another acquirer inserted a row first
                time.sleep(random.uniform(0.01, 0.1))
        return self._attempt()

    def _attempt(self) -> list[Holder]:
        now = utcnow()
        with session_scope(self.url) as s:
            rows = list(
                s.scalars(select(HostLock).where(HostLock.host.in_(self.hosts)).with_for_update())
            )
            others = [r for r in rows if r.token != self.token]
            opened = deployments.open_among(
                s, sorted({r.deployment_id for r in others if r.deployment_id is not None})
            )
            conflicts: list[Holder] = []
            stale: list[HostLock] = []
            for row in others:
                dead = self._stale(row, now)
                mine = self.takeover is not None and row.deployment_id == self.takeover
                if mine and (dead or self.force):
                    stale.append(row)
                elif dead and row.deployment_id not in opened:
                    stale.append(row)
                else:
                    conflicts.append(Holder.of(row, dead, dead and row.deployment_id in opened))
            if conflicts:
                return conflicts
            for row in stale:  # by its token: a row renewed meanwhile is not taken
                s.execute(
                    delete(HostLock).where(HostLock.host == row.host, HostLock.token == row.token)
                )
            have = {r.host for r in rows if r.token == self.token}
            fresh = [h for h in self.hosts if h not in have]
            if fresh:
                s.execute(
                    insert(HostLock),
                    [
                        {
                            "host": h,
                            "token": self.token,
                            "purpose": self.purpose,
                            "deployment_id": self.deployment_id,
                            "release": self.release_name,
                            "actor": self.actor,
                            "machine": self.machine,
                            "pid": self.pid,
                            "pid_start": process_start(self.pid),
                            "acquired_at": now,
                            "expires_at": now + timedelta(seconds=self.lease),
                        }
                        for h in fresh
                    ],
                )
        self.held = True
        return []

    def _stale(self, row: HostLock, now: datetime) -> bool:
        if row.expires_at < now:
            return True
        if row.machine != self.machine:
            return False  # another machine's process: only its lease tells
        started = process_start(row.pid)
        return not started or (bool(row.pid_start) and started != row.pid_start)

    # -- holding ---------------------------------------------------------------------------
    def bind(self, deployment_id: int) -> None:
        """Name the deployment record now holding the locks (opened after they were taken)."""
        self.deployment_id = deployment_id
        with session_scope(self.url) as s:
            s.execute(
                update(HostLock)
                .where(HostLock.token == self.token)
                .values(deployment_id=deployment_id)
            )

    def renew(self) -> list[str]:
        """Extend the lease; returns the hosts whose lock is no longer ours."""
        until = utcnow() + timedelta(seconds=self.lease)
        with session_scope(self.url) as s:
            s.execute(update(HostLock).where(HostLock.token == self.token).values(expires_at=until))
            ours = set(s.scalars(select(HostLock.host).where(HostLock.token == self.token)))
        return [h for h in self.hosts if h not in ours]

    def _start_renewing(self) -> None:
        if self._renewer is not None:
            return
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew_loop, name="ferry-lock", daemon=True)
        self._renewer.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease / 3):
            try:
                lost = self.renew()
            except Exception:  # noqa: BLE001 - a CMS hiccup: the lease outlasts two misses
                continue
            if lost:
                self._stop.set()
                (self.on_lost or _stop_this_process)(lost)
                return

    # -- releasing -------------------------------------------------------------------------
    def release(self) -> None:
        """Delete our rows (idempotent); every exit path the process survives calls it."""
        self._stop.set()
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join(timeout=5)
        self._renewer = None
        if not self.held:
            return
        with session_scope(self.url) as s:
            s.execute(delete(HostLock).where(HostLock.token == self.token))
        self.held = False

    def __enter__(self) -> HostLocks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _stop_this_process(lost: list[str]) -> None:
    """Our lease ran out and another run took the hosts (this process was frozen past its
    lease): stop at the next safe point, as on SIGTERM, so we do not act on its hosts."""
    import sys

    print(
        f"the host lock of {', '.join(lost[:5])} was lost (lease expired and taken over): "
        "stopping at the next safe point",
        file=sys.stderr,
        flush=True,
    )
    os.kill(os.getpid(), signal.SIGTERM)


def holders(url: str) -> list[Holder]:
    """Every lock row now (for `ferry status`), live or stale."""
    now = utcnow()
    machine = socket.gethostname()
    with session_scope(url) as s:
        rows = list(s.scalars(select(HostLock).order_by(HostLock.host)))
        out = []
        for r in rows:
            dead = r.expires_at < now or (r.machine == machine and process_start(r.pid) in ("",))
            out.append(Holder.of(r, dead))
        return out
