"""Host locks in the CMS, on SQLite and PostgreSQL: one run per host, all or none, the holder
named, a lease renewed while the holder lives, a dead holder taken over (at once on this
machine, after its lease elsewhere), a dead holder of an unfinished deployment recovered
first, and a waiter that gets the hosts when the holder lets go."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from orchestrator.cms import db
from orchestrator.cms.locks import HostLocks
from orchestrator.cms.models import Deployment, HostLock
from orchestrator.errors import ExitCode, LockHeld

REPO = Path(__file__).resolve().parents[2]


def rows(url: str) -> dict[str, tuple[str, int | None]]:
    with db.session_scope(url) as s:
        return {r.host: (r.token, r.deployment_id) for r in s.scalars(sa.select(HostLock))}


def locks(url: str, hosts: list[str], **kw) -> HostLocks:
    kw.setdefault("purpose", "deploy")
    kw.setdefault("actor", "alice")
    return HostLocks(url, hosts, **kw)


def test_a_second_run_on_an_overlapping_host_is_refused_naming_the_holder(
    migrated_url: str,
) -> None:
    first = locks(migrated_url, ["h1", "h2", "h3"], release="shop@2.0")
    first.acquire()
    first.bind(7)
    second = locks(migrated_url, ["h3", "h4"], actor="bob")
    try:
        with pytest.raises(LockHeld) as caught:
            second.acquire()
        err = caught.value
        assert err.exit_code == ExitCode.REFUSED
        assert "host h3 locked by deployment 7 of shop@2.0 by alice since " in err.message
        assert err.details["holder"]["deployment"] == 7
        assert err.details["holder"]["actor"] == "alice"
        assert err.details["hosts"] == ["h3"]
        # all or none: the refused run holds nothing, not even the free host h4
        assert set(rows(migrated_url)) == {"h1", "h2", "h3"}
        assert {t for t, _ in rows(migrated_url).values()} == {first.token}
    finally:
        first.release()
    assert rows(migrated_url) == {}
    second.acquire()  # free now
    try:
        assert set(rows(migrated_url)) == {"h3", "h4"}
    finally:
        second.release()
    assert rows(migrated_url) == {}


def test_concurrent_acquirers_of_one_host_exactly_one_wins(migrated_url: str) -> None:
    racers = [locks(migrated_url, ["h1", f"x{n}"]) for n in range(6)]
    go = threading.Barrier(len(racers))
    won: list[HostLocks] = []

    def race(lk: HostLocks) -> None:
        go.wait()
        if lk.try_acquire() == []:
            won.append(lk)

    threads = [threading.Thread(target=race, args=(lk,)) for lk in racers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(won) == 1
    winner = won[0]
    assert {t for t, _ in rows(migrated_url).values()} == {winner.token}
    winner.release()


def test_the_lease_is_renewed_while_the_holder_lives(migrated_url: str) -> None:
    holder = locks(migrated_url, ["h1"], lease=1.5)
    holder.acquire()
    try:
        with db.session_scope(migrated_url) as s:
            first = s.get(HostLock, "h1").expires_at
        time.sleep(3.5)  # more than twice the lease: only renewals keep it
        with db.session_scope(migrated_url) as s:
            later = s.get(HostLock, "h1").expires_at
        assert later > first
        other = locks(migrated_url, ["h1"])
        other.machine = "elsewhere"  # not even judged by its process: by its lease
        with pytest.raises(LockHeld):
            other.acquire()
    finally:
        holder.release()


def test_a_lock_of_another_machine_is_held_until_its_lease_runs_out(migrated_url: str) -> None:
    remote = locks(migrated_url, ["h1"], lease=1.0)
    remote.machine = "build-02"  # a holder we cannot see the process of
    assert remote.try_acquire() == []  # no renewals: that machine went dark
    mine = locks(migrated_url, ["h1"])
    with pytest.raises(LockHeld) as caught:
        mine.acquire()
    assert "on build-02" in caught.value.message
    time.sleep(1.5)
    mine.acquire()
    try:
        assert rows(migrated_url)["h1"][0] == mine.token
    finally:
        mine.release()


HOLD = """
import sys, time
from orchestrator.cms.locks import HostLocks
lk = HostLocks(sys.argv[1], ["h1", "h2"], purpose="deploy", actor="carol", lease=600)
lk.acquire()
if sys.argv[2] != "-":
    lk.bind(int(sys.argv[2]))
print("held", flush=True)
time.sleep(600)
"""


def _held_by_a_killed_process(url: str, deployment: int | None) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, url, str(deployment) if deployment else "-"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert set(rows(url)) == {"h1", "h2"}  # SIGKILL released nothing: the row is stale


def test_a_lock_of_a_killed_process_is_taken_over_at_once(migrated_url: str) -> None:
    _held_by_a_killed_process(migrated_url, None)
    mine = locks(migrated_url, ["h2", "h3"])
    mine.acquire()  # the 600 s lease is not waited out: its process is gone
    try:
        held = rows(migrated_url)
        assert held["h2"][0] == held["h3"][0] == mine.token
    finally:
        mine.release()


def _open_deployment(url: str) -> int:
    with db.session_scope(url) as s:
        dep = Deployment(
            release="shop@2.0", package_digest="sha256:" + "0" * 64, environment="dev",
            plan_file="plan.yaml", strategy="phased", method="push", status="running",
            rollout={}, evidence={}, actor="carol",
        )  # fmt: skip
        s.add(dep)
        s.flush()
        return dep.id


def test_a_killed_deployment_s_hosts_are_recovered_before_another_run_takes_them(
    migrated_url: str,
) -> None:
    did = _open_deployment(migrated_url)
    _held_by_a_killed_process(migrated_url, did)
    new = locks(migrated_url, ["h1"], actor="bob")
    with pytest.raises(LockHeld) as caught:
        new.acquire(wait=30)  # no point waiting: nobody will release it
    assert f"run `ferry remediate recover {did}` first" in caught.value.message
    assert "by carol" in caught.value.message
    recover = locks(migrated_url, ["h1", "h2"], purpose="recover", deployment_id=did, takeover=did)
    recover.acquire()
    try:
        assert {t for t, _ in rows(migrated_url).values()} == {recover.token}
        # a second recover of the same deployment while the first lives is refused
        again = locks(migrated_url, ["h1"], purpose="recover", deployment_id=did, takeover=did)
        with pytest.raises(LockHeld) as second:
            again.acquire()
        assert f"a recover of deployment {did} by alice" in second.value.message
    finally:
        recover.release()
    assert rows(migrated_url) == {}


def test_a_waiting_run_gets_the_hosts_when_the_holder_lets_go(migrated_url: str) -> None:
    holder = locks(migrated_url, ["h1"])
    holder.acquire()
    threading.Timer(1.5, holder.release).start()
    waiter = locks(migrated_url, ["h1"], actor="bob")
    told: list[str] = []
    waiter.acquire(wait=60, progress=told.append)
    try:
        assert waiter.waited >= 1.0
        assert told and "waiting for the lock of 1 host(s): a deployment by alice since" in told[0]
        assert rows(migrated_url)["h1"][0] == waiter.token
    finally:
        waiter.release()


def test_a_holder_whose_lock_was_taken_is_told(migrated_url: str) -> None:
    lost: list[list[str]] = []
    holder = locks(migrated_url, ["h1", "h2"], lease=1.0, on_lost=lost.append)
    holder.acquire()
    with db.session_scope(migrated_url) as s:  # e.g. taken over after a long freeze
        s.execute(sa.delete(HostLock).where(HostLock.host == "h2"))
    deadline = time.monotonic() + 10
    while not lost and time.monotonic() < deadline:
        time.sleep(0.1)
    holder.release()
    assert lost == [["h2"]]
