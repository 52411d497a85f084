"""Times in the CMS are UTC: aware in Python, naive UTC in the database, on both backends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import StatementError

from orchestrator.cms import audit, db
from orchestrator.cms.models import RFC, AuditEvent, ChangeWindow

IST = timezone(timedelta(hours=5, minutes=30))


def new_rfc(**kw: object) -> RFC:
    return RFC(release="shop@1.0", environment="prod", model="normal", requester="alice", **kw)


def test_aware_times_round_trip_as_the_same_instant_in_utc(migrated_url: str) -> None:
    start = datetime(2030, 3, 31, 1, 30, 0, 123456, tzinfo=IST)  # 2030-03-30T20:00:00.123456Z
    end = datetime(2030, 3, 31, 2, 0, 0, tzinfo=UTC)
    with db.session_scope(migrated_url) as session:
        rfc = new_rfc(windows=[ChangeWindow(start=start, end=end)])
        session.add(rfc)
    db.dispose_all()

    with db.session_scope(migrated_url) as session:
        window = session.scalars(sa.select(ChangeWindow)).one()
        stored = session.execute(sa.text("SELECT start FROM change_windows")).scalar()

    assert window.start == start and window.end == end
    assert window.start.tzinfo is UTC and window.start.utcoffset() == timedelta(0)
    assert window.start.microsecond == 123456
    # stored as naive UTC: the database's own time zone setting cannot shift it
    if isinstance(stored, str):  # SQLite keeps ISO text
        stored = datetime.fromisoformat(stored)
    assert stored == datetime(2030, 3, 30, 20, 0, 0, 123456)


def test_defaults_are_utc_now(migrated_url: str) -> None:
    before = datetime.now(UTC)
    with db.session_scope(migrated_url) as session:
        session.add(new_rfc())
        audit.append(session, actor="alice", action="rfc.raise", subject_type="rfc",
                     subject_id=1)  # fmt: skip
    after = datetime.now(UTC)

    with db.session_scope(migrated_url) as session:
        rfc = session.scalars(sa.select(RFC)).one()
        event = session.get(AuditEvent, 1)
    for value in (rfc.created_at, rfc.updated_at, event.at):
        assert value.tzinfo is UTC
        assert before - timedelta(seconds=1) <= value <= after + timedelta(seconds=1)


def test_a_naive_time_is_refused(migrated_url: str) -> None:
    with pytest.raises(StatementError, match="naive datetime"):
        with db.session_scope(migrated_url) as session:
            session.add(new_rfc(review_due=datetime(2030, 1, 1, 12, 0)))

    with db.session_scope(migrated_url) as session:
        assert session.scalars(sa.select(RFC)).all() == []
