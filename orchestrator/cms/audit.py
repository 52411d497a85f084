"""The audit log: append-only and tamper-evident.

Each event stores the hash of the one before it:
`hash = sha256(prev_hash + canonical_json(id, at, actor, action, subject, data))`, and the
one-row `audit_head` holds the newest id and hash, so that an edited, deleted or re-ordered
row, including the last one, breaks the chain. Appending locks the head row (SQLite: the
BEGIN IMMEDIATE every CMS transaction takes; PostgreSQL: SELECT … FOR UPDATE), so
concurrent writers queue and never fork the chain.

Limit: whoever can rewrite every event after some point *and* the head can recompute a
consistent chain. `verify_chain(anchor=(id, hash))` checks the log against a head exported
earlier to a place that person cannot write (docs/cms.md: anchoring).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.cms.models import AuditEvent, AuditHead, utcnow

GENESIS = "0" * 64
# a key is secret-looking by its words, not its letters: `passed` (a milestone's verdict),
# `bypass` or `tokenizer_version` are not secrets; `password`, `db_pass`, `apiKey`,
# `X-Auth-Token` and `private_key` are
_SECRET_WORDS = frozenset(
    {"pass", "passwd", "password", "passphrase", "pwd", "secret", "secrets", "token",
     "credential", "credentials", "authorization", "cookie", "apikey", "privatekey"}
)  # fmt: skip
_SECRET_SUFFIXES = ("password", "passwd", "secret", "token", "apikey")
_SECRET_PAIRS = frozenset({("api", "key"), ("private", "key"), ("secret", "key")})
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")


def secret_key(key: object) -> bool:
    """Does a record key name a secret (its values are then never stored)?"""
    words = [w.lower() for w in _WORD.findall(str(key))]
    if any(w in _SECRET_WORDS or w.endswith(_SECRET_SUFFIXES) for w in words):
        return True
    return any(pair in _SECRET_PAIRS for pair in zip(words, words[1:], strict=False))


# scheme://user:password@host — a database or repository URL carrying its password
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/\s:@]*:)[^@\s]*@", re.I)


def redact(data: Any) -> Any:
    """Secrets never reach a record: values under secret-looking keys are replaced, and so
    are passwords written into URLs (`postgresql://u:***@db/x`)."""
    if isinstance(data, dict):
        return {k: ("***" if secret_key(k) else redact(v)) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [redact(v) for v in data]
    if isinstance(data, str):
        return _URL_PASSWORD.sub(r"\g<head>***@", data)
    return data


def canonical(obj: Any) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    ).encode()


def _stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_hash(prev_hash: str, ev: AuditEvent) -> str:
    body = {
        "id": ev.id,
        "at": _stamp(ev.at),
        "actor": ev.actor,
        "action": ev.action,
        "subject_type": ev.subject_type,
        "subject_id": ev.subject_id,
        "data": ev.data,
    }
    return hashlib.sha256(prev_hash.encode() + canonical(body)).hexdigest()


def append(
    session: Session,
    *,
    actor: str,
    action: str,
    subject_type: str,
    subject_id: str | int,
    data: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one event inside the caller's transaction (it commits with the change)."""
    # populate_existing: if this session read the head before, another writer may have moved
    # it since; the locked row, not the stale copy, must decide the next id and hash
    head = session.execute(
        select(AuditHead)
        .where(AuditHead.id == 1)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one()
    # round-trip data through JSON so the hash is computed over what the database returns
    clean = json.loads(canonical(redact(data or {})))
    ev = AuditEvent(
        id=head.last_id + 1,
        at=utcnow(),
        actor=actor,
        action=action,
        subject_type=subject_type,
        subject_id=str(subject_id),
        data=clean,
        prev_hash=head.last_hash,
        hash="",
    )
    ev.hash = event_hash(head.last_hash, ev)
    session.add(ev)
    head.last_id, head.last_hash = ev.id, ev.hash
    session.flush()
    return ev


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    events: int
    first_broken: int | None = None
    problem: str | None = None
    head_id: int | None = None
    head_hash: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "events": self.events,
            "first_broken": self.first_broken,
            "problem": self.problem,
            "head": {"id": self.head_id, "hash": self.head_hash},
        }


def verify_chain(session: Session, *, anchor: tuple[int, str] | None = None) -> ChainReport:
    """Walk the whole chain; report the first event that does not verify.

    `anchor=(id, hash)` is a head exported earlier (`ferry cms verify-audit` prints it):
    event `id` must still exist with that hash, which a rewritten chain cannot fake.
    """
    prev, expected_id, count = GENESIS, 1, 0
    seen_anchor = anchor is None or anchor[0] == 0 and anchor[1] == GENESIS

    def broken(event_id: int, problem: str) -> ChainReport:
        return ChainReport(False, count, event_id, problem)

    for ev in session.scalars(select(AuditEvent).order_by(AuditEvent.id)):
        count += 1
        if ev.id != expected_id:
            return broken(expected_id, f"event {expected_id} is missing")
        if ev.prev_hash != prev:
            return broken(ev.id, f"event {ev.id} does not follow event {ev.id - 1}")
        if event_hash(prev, ev) != ev.hash:
            return broken(ev.id, f"event {ev.id} was altered")
        if anchor is not None and ev.id == anchor[0]:
            if ev.hash != anchor[1]:
                return broken(ev.id, f"event {ev.id} differs from the anchored hash")
            seen_anchor = True
        prev, expected_id = ev.hash, expected_id + 1
    last = expected_id - 1
    head = session.get(AuditHead, 1)
    if head is None:
        return broken(last + 1, "the audit head row is missing")
    if head.last_id > last:
        return broken(last + 1, f"the log ends at event {last} but its head records event "
                      f"{head.last_id}: event {last + 1} onwards is missing")  # fmt: skip
    if head.last_id < last:
        return broken(head.last_id + 1, f"event {head.last_id + 1} onwards was not appended "
                      f"through the head (which records event {head.last_id})")  # fmt: skip
    if head.last_hash != prev:
        return broken(last, f"event {last} differs from the head's record of it")
    if not seen_anchor:
        return broken(anchor[0], f"event {anchor[0]} is missing (anchored, log ends at {last})")
    return ChainReport(True, count, head_id=last, head_hash=prev)


def history(session: Session, subject_type: str, subject_id: str | int) -> list[dict[str, Any]]:
    rows = session.scalars(
        select(AuditEvent)
        .where(AuditEvent.subject_type == subject_type, AuditEvent.subject_id == str(subject_id))
        .order_by(AuditEvent.id)
    )
    return [
        {"id": e.id, "at": _stamp(e.at), "actor": e.actor, "action": e.action, "data": e.data}
        for e in rows
    ]
