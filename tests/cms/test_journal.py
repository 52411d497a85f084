"""The step journal's group commit, on SQLite and PostgreSQL: many hosts' writes at once."""

from __future__ import annotations

import threading

from sqlalchemy import select

from orchestrator.cms.db import session_scope
from orchestrator.cms.deployments import DeploymentRecord
from orchestrator.cms.models import Deployment, HostStep


def _deployment(url: str) -> int:
    with session_scope(url) as s:
        d = Deployment(
            release="app@1", package_digest="sha256:x", environment="dev", plan_file="p.yaml",
            strategy="big-bang", method="push", actor="alice",
        )  # fmt: skip
        s.add(d)
        s.flush()
        return d.id


def test_many_hosts_journal_at_once_and_each_gets_its_own_row_and_outcome(migrated_url):
    """Begins and ends of 120 hosts race through one writer: every begin returns the id of
    its own row (committed before it returns), and every end lands on that row, merging its
    detail into begin's."""
    record = DeploymentRecord(migrated_url, _deployment(migrated_url), "alice")
    ids: dict[str, int] = {}
    start = threading.Barrier(120)
    errors: list[BaseException] = []

    def host(i: int) -> None:
        name = f"h{i}"
        try:
            start.wait()
            sid = record.begin(1, name, "stage", {"begun": i} if i % 2 else None)
            with session_scope(migrated_url) as s:  # committed: another session sees it
                row = s.get(HostStep, sid)
                assert row is not None and row.host == name and row.status == "started"
            ids[name] = sid
            record.end(sid, "failed" if i % 3 == 0 else "succeeded",
                       {"bytes": i} if i % 5 else None)  # fmt: skip
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=host, args=(i,)) for i in range(120)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    with session_scope(migrated_url) as s:
        rows = {r.host: r for r in s.scalars(select(HostStep))}
    assert len(rows) == 120 and len(set(ids.values())) == 120
    for i in range(120):
        r = rows[f"h{i}"]
        assert r.id == ids[r.host] and r.step == "stage" and r.finished_at is not None
        assert r.status == ("failed" if i % 3 == 0 else "succeeded")
        want = {**({"begun": i} if i % 2 else {}), **({"bytes": i} if i % 5 else {})}
        assert r.detail == want
