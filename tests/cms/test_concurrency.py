"""Concurrent writers: separate OS processes appending at once lose no event and keep one
chain (SQLite: WAL + BEGIN IMMEDIATE; PostgreSQL: SELECT … FOR UPDATE on audit_head)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import sqlalchemy as sa

from orchestrator.cms import audit, db
from orchestrator.cms.models import AuditEvent

REPO = Path(__file__).resolve().parents[2]


def run_writers(url: str, writers: int, count: int, tmp_path: Path) -> None:
    """Start `writers` processes, release them together, wait; fail with their stderr."""
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.cms.appender", url, f"w{n}", str(count), str(go)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for n in range(writers)
    ]
    ready = [tmp_path / f"go.w{n}.ready" for n in range(writers)]
    deadline = time.monotonic() + 60
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.01)
    go.touch()
    failures = []
    for n, proc in enumerate(procs):
        out, err = proc.communicate(timeout=120)
        print(out.strip())
        if proc.returncode != 0:
            failures.append(f"writer w{n} exited {proc.returncode}:\n{err[-3000:]}")
    assert not failures, "\n".join(failures)


def events_by_writer(url: str) -> tuple[list[int], dict[str, list[int]]]:
    with db.session_scope(url) as session:
        rows = session.execute(
            sa.select(AuditEvent.id, AuditEvent.actor, AuditEvent.data).order_by(AuditEvent.id)
        ).all()
    seen: dict[str, list[int]] = {}
    for _, actor, data in rows:
        seen.setdefault(actor, []).append(data["i"])
    return [r.id for r in rows], seen


def test_concurrent_writers_lose_no_event_and_keep_one_chain(
    migrated_url: str, tmp_path: Path
) -> None:
    writers, count = 2, 200
    db.dispose_all()

    run_writers(migrated_url, writers, count, tmp_path)

    ids, seen = events_by_writer(migrated_url)
    assert ids == list(range(1, writers * count + 1))
    # each writer's events are all there, in its own order
    assert seen == {f"w{n}": list(range(count)) for n in range(writers)}
    with db.session_scope(migrated_url) as session:
        report = audit.verify_chain(session)
    assert report.ok and report.events == writers * count


def test_writers_racing_to_first_use_migrate_once_and_all_append(
    cms_url: str, tmp_path: Path
) -> None:
    """Nobody ran `ferry cms upgrade`: every writer finds the database new at once."""
    writers, count = 3, 10

    run_writers(cms_url, writers, count, tmp_path)

    ids, seen = events_by_writer(cms_url)
    assert ids == list(range(1, writers * count + 1))
    assert Counter({k: len(v) for k, v in seen.items()}) == Counter(
        {f"w{n}": count for n in range(writers)}
    )
    assert db.current_revision(db.get_engine(cms_url)) == db.head_revision()
    with db.session_scope(cms_url) as session:
        assert audit.verify_chain(session).ok
