"""The host CIs a planned deployment records, on SQLite and PostgreSQL: one row per target
host, created or brought up to date, read in one query per 500 names."""

from __future__ import annotations

import dataclasses

from sqlalchemy import event, func, select

from orchestrator.cms.db import get_engine, session_scope
from orchestrator.cms.deployments import DeploymentRecord, deploy_roots
from orchestrator.cms.models import Host as HostCI
from orchestrator.rollout import WavePlan
from tests.unit.test_pull_logic import ACTION, rollout


def _rollout(names: list[str], root: str = "/srv/app", net: int = 18):
    acts = tuple(
        dataclasses.replace(ACTION, host=n, address=f"198.{net}.{i // 250}.{i % 250 + 2}",
                            deploy_root=root)
        for i, n in enumerate(names)
    )  # fmt: skip
    return dataclasses.replace(rollout(ACTION), waves=(WavePlan(1, acts),))


def _open(url: str, names: list[str], groups: dict[str, list[str]], **kw: object) -> None:
    DeploymentRecord.open(
        url, _rollout(names, **kw), actor="alice", rfc_id=None, evidence={}, groups=groups
    )


def test_a_deployment_records_and_updates_every_target_hosts_ci(migrated_url):
    first = [f"h{i}" for i in range(1201)]  # three queries' worth of names
    reads: list[str] = []

    def count(conn, cursor, statement, *_: object) -> None:
        if statement.lstrip().upper().startswith("SELECT") and " hosts" in statement:
            reads.append(statement)

    event.listen(get_engine(migrated_url), "before_cursor_execute", count)
    try:
        _open(migrated_url, first, {n: ["web"] for n in first})
    finally:
        event.remove(get_engine(migrated_url), "before_cursor_execute", count)
    assert len(reads) == 3  # not one per host
    # the next deployment: 601 of them again (moved, regrouped, another root) and 5 new ones
    again = first[::2] + [f"new{i}" for i in range(5)]
    _open(migrated_url, again, {n: ["db", "rack-b"] for n in again}, root="/opt/app", net=19)
    with session_scope(migrated_url) as s:
        assert s.scalar(select(func.count()).select_from(HostCI)) == 1201 + 5
        rows = {r.name: r for r in s.scalars(select(HostCI))}
        for i, n in enumerate(again):
            r = rows[n]
            assert (r.address, r.deploy_root, r.groups, r.environment) == (
                f"198.19.{i // 250}.{i % 250 + 2}", "/opt/app", ["db", "rack-b"], "dev"
            )  # fmt: skip
        untouched = rows["h1"]  # not in the second deployment: as the first one left it
        assert (untouched.address, untouched.deploy_root, untouched.groups) == (
            "198.18.0.3", "/srv/app", ["web"]
        )  # fmt: skip
    assert deploy_roots(migrated_url, ["h0", "h1", "new4", "nobody"]) == {
        "h0": "/opt/app", "h1": "/srv/app", "new4": "/opt/app"
    }  # fmt: skip


def test_a_host_named_twice_in_one_rollout_gets_one_ci(migrated_url):
    _open(migrated_url, ["a", "b", "a"], {"a": ["web"], "b": ["db"]})
    with session_scope(migrated_url) as s:
        rows = {r.name: r.groups for r in s.scalars(select(HostCI))}
    assert rows == {"a": ["web"], "b": ["db"]}
