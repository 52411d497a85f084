"""The audit log: append-only and tamper-evident, on SQLite and PostgreSQL.

Tampering goes straight at the tables with SQL, as someone with database access would;
`ferry cms verify-audit` must then exit 6 and name the first broken event.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy import text
from sqlalchemy.engine import Connection

from orchestrator.cms import audit, db
from orchestrator.cms.models import AuditEvent, AuditHead
from orchestrator.errors import ExitCode
from orchestrator.settings import get_settings

EVENTS = 6


def append_events(url: str, count: int = EVENTS, **data: object) -> list[str]:
    """Append `count` events, one transaction each, as Ferry would; return their hashes."""
    hashes = []
    for i in range(count):
        with db.session_scope(url) as session:
            ev = audit.append(
                session, actor="alice", action="release.build", subject_type="release",
                subject_id=f"shop@1.{i}", data={"i": i, **data},
            )  # fmt: skip
            hashes.append(ev.hash)
    return hashes


def tamper(url: str, sql: Callable[[Connection], object]) -> None:
    with db.get_engine(url).begin() as conn:
        sql(conn)
    db.dispose_all()  # the CLI and the next session see the database as it is now


def verify(url: str, **kw: object) -> audit.ChainReport:
    with db.session_scope(url) as session:
        return audit.verify_chain(session, **kw)


events = AuditEvent.__table__


def edit_data(conn: Connection) -> None:
    conn.execute(sa.update(events).where(events.c.id == 4).values(data={"i": 99}))


def edit_actor(conn: Connection) -> None:
    conn.execute(text("UPDATE audit_events SET actor = 'mallory' WHERE id = 2"))


def delete_middle(conn: Connection) -> None:
    conn.execute(text("DELETE FROM audit_events WHERE id = 3"))


def delete_last(conn: Connection) -> None:
    conn.execute(text(f"DELETE FROM audit_events WHERE id = {EVENTS}"))


@pytest.mark.parametrize(
    ("sql", "first_broken", "problem"),
    [
        (edit_data, 4, "event 4 was altered"),
        (edit_actor, 2, "event 2 was altered"),
        (delete_middle, 3, "event 3 is missing"),
        (delete_last, EVENTS, f"event {EVENTS} onwards is missing"),
    ],
    ids=["edit-data", "edit-actor", "delete-middle", "delete-last"],
)
def test_verify_audit_names_the_first_broken_event_after_tampering(
    migrated_url: str, run_ferry, sql, first_broken: int, problem: str
) -> None:
    append_events(migrated_url)
    tamper(migrated_url, sql)

    result = run_ferry("cms", "verify-audit", "--output", "json")

    assert result.returncode == ExitCode.INTEGRITY, result.stderr
    report = result.json()
    assert report["error"] == "IntegrityError"
    assert report["details"]["first_broken"] == first_broken
    assert problem in report["details"]["problem"]
    assert f"audit log broken at event {first_broken}" in report["message"]
    assert f"audit log broken at event {first_broken}" in result.stderr


def test_an_untouched_log_verifies(migrated_url: str, ferry_cli) -> None:
    hashes = append_events(migrated_url)

    result = ferry_cli("cms", "verify-audit", "--output", "json")

    assert result.returncode == 0, result.stderr
    assert result.json() == {
        "ok": True,
        "events": EVENTS,
        "first_broken": None,
        "problem": None,
        "head": {"id": EVENTS, "hash": hashes[-1]},
        "unbound": [],
    }


def test_verify_audit_tells_people_the_head_to_export(ferry_home, ferry_cli) -> None:
    """On the embedded default CMS (no FERRY_DATABASE_URL)."""
    hashes = append_events(get_settings().cms_url)

    result = ferry_cli("cms", "verify-audit")

    assert result.returncode == 0, result.stderr
    assert f"{EVENTS} events verified" in result.stdout
    assert f"head {EVENTS}:{hashes[-1]}" in result.stdout


@pytest.mark.parametrize(
    ("statements", "first_broken", "problem"),
    [
        (["UPDATE audit_events SET prev_hash = hash WHERE id = 1"], 1, "does not follow"),
        (["DELETE FROM audit_events"], 1, "event 1 onwards is missing"),
        (["DELETE FROM audit_head"], EVENTS + 1, "head row is missing"),
        (["UPDATE audit_head SET last_hash = 'x'"], EVENTS, "differs from the head"),
        (["UPDATE audit_head SET last_id = 5"], 6, "not appended through the head"),
    ],
    ids=["relinked", "all-deleted", "head-deleted", "head-hash-edited", "head-rewound"],
)
def test_tampering_with_the_links_or_the_head_is_detected(
    migrated_url: str, statements: list[str], first_broken: int, problem: str
) -> None:
    append_events(migrated_url)
    tamper(migrated_url, lambda conn: [conn.execute(text(s)) for s in statements])

    report = verify(migrated_url)

    assert not report.ok
    assert report.first_broken == first_broken
    assert problem in report.problem


def test_an_edited_time_is_detected(migrated_url: str) -> None:
    append_events(migrated_url)
    with db.session_scope(migrated_url) as session:
        at = session.get(AuditEvent, 3).at
    tamper(
        migrated_url,
        lambda conn: conn.execute(
            sa.update(events).where(events.c.id == 3).values(at=at + timedelta(seconds=1))
        ),
    )

    assert verify(migrated_url).first_broken == 3


def test_an_edited_event_rehashed_breaks_the_link_to_the_next(migrated_url: str) -> None:
    append_events(migrated_url)
    with db.session_scope(migrated_url) as session:
        ev = session.get(AuditEvent, 4)
        ev.data = {"i": 99}
        ev.hash = audit.event_hash(ev.prev_hash, ev)

    report = verify(migrated_url)

    assert (report.first_broken, report.problem) == (5, "event 5 does not follow event 4")


def test_a_rewritten_tail_and_head_pass_unless_checked_against_an_exported_anchor(
    migrated_url: str, ferry_cli
) -> None:
    """The chain's limit, and its remedy: someone who rewrites every event after the change
    and the head too leaves a consistent chain; a head exported before does not match."""
    hashes = append_events(migrated_url)
    anchor = f"{EVENTS}:{hashes[-1]}"
    with db.session_scope(migrated_url) as session:
        prev = session.get(AuditEvent, 3).hash
        for ev in session.scalars(sa.select(AuditEvent).where(AuditEvent.id > 3).order_by("id")):
            ev.actor, ev.prev_hash = "mallory", prev
            ev.hash = prev = audit.event_hash(prev, ev)
        head = session.get(AuditHead, 1)
        head.last_hash = prev
    db.dispose_all()

    anchored = ferry_cli("cms", "verify-audit", "--anchor", anchor, "--output", "json")

    assert verify(migrated_url).ok, "a consistent rewrite cannot be seen without an anchor"
    assert anchored.returncode == ExitCode.INTEGRITY
    assert anchored.json()["details"]["first_broken"] == EVENTS
    assert "anchored" in anchored.json()["details"]["problem"]


def test_an_anchor_still_verifies_after_later_events(migrated_url: str) -> None:
    hashes = append_events(migrated_url)
    append_events(migrated_url, 2)

    assert verify(migrated_url, anchor=(EVENTS, hashes[-1])).ok
    assert verify(migrated_url, anchor=(0, audit.GENESIS)).ok
    truncated = verify(migrated_url, anchor=(EVENTS + 5, hashes[-1]))
    assert (truncated.ok, truncated.first_broken) == (False, EVENTS + 5)


def test_a_malformed_anchor_is_bad_input(ferry_home, ferry_cli) -> None:
    result = ferry_cli("cms", "verify-audit", "--anchor", "six:abc")

    assert result.returncode == ExitCode.BAD_INPUT
    assert "--anchor" in result.stderr


def test_appending_after_reading_a_stale_head_continues_the_chain(
    fresh_postgres_url: str, ferry_home
) -> None:
    """PostgreSQL lets two sessions overlap: the one that read the head first must not reuse
    its old copy once it holds the lock (SQLite's BEGIN IMMEDIATE serialises them anyway)."""
    url = fresh_postgres_url
    db.upgrade(url)
    with db.session_scope(url) as first:
        head = first.get(AuditHead, 1)  # held: it stays in this session's identity map
        assert head.last_id == 0
        append_events(url, 2)  # another writer moves the head meanwhile
        ev = audit.append(first, actor="bob", action="x", subject_type="t", subject_id="1")
        assert (ev.id, head.last_id) == (3, 3)

    assert verify(url).ok


def test_secrets_never_reach_the_audit_record(migrated_url: str) -> None:
    data = {
        "release": "shop@1.0",
        "password": "hunter2",
        "db_PASSWORD": "pw-2",
        "nested": {"api_key": "k-123", "hosts": [{"token": "t-456", "name": "web1"}]},
        "Authorization": "Bearer b-789",
        "client_secret": "cs-000",
        "private_key": "-----BEGIN OPENSSH PRIVATE KEY-----",
        "source": "postgresql://deploy:url-pass@db.internal/ferry",
    }
    with db.session_scope(migrated_url) as session:
        ev = audit.append(
            session, actor="alice", action="deploy.start", subject_type="deployment",
            subject_id=1, data=data,
        )  # fmt: skip
        ev_id = ev.id

    with db.get_engine(migrated_url).connect() as conn:
        raw = conn.execute(text(f"SELECT data FROM audit_events WHERE id = {ev_id}")).scalar()
    stored = raw if isinstance(raw, str) else json.dumps(raw)
    for secret in ("hunter2", "pw-2", "k-123", "t-456", "b-789", "cs-000", "BEGIN", "url-pass"):
        assert secret not in stored
    assert "web1" in stored and "shop@1.0" in stored
    assert "postgresql://deploy:***@db.internal/ferry" in stored
    assert verify(migrated_url).ok


def test_history_lists_a_subjects_events_in_order(migrated_url: str) -> None:
    append_events(migrated_url, 3)
    with db.session_scope(migrated_url) as session:
        audit.append(session, actor="bob", action="release.withdraw", subject_type="release",
                     subject_id="shop@1.1")  # fmt: skip
        rows = audit.history(session, "release", "shop@1.1")

    assert [(r["id"], r["action"], r["actor"]) for r in rows] == [
        (2, "release.build", "alice"),
        (4, "release.withdraw", "bob"),
    ]
    assert rows[0]["at"].endswith("Z")
