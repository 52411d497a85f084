"""A deployment's record in the CMS, on SQLite and PostgreSQL: the host CIs it records (one
row per target host, created or brought up to date, read in one query per 500 names), the
reads during its run and `ferry status`'s listing (which leave its rollout out), and its
evidence writers, which lose nothing when they write at once."""

from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy import event, func, select

from orchestrator import lifecycle
from orchestrator.cms import deployments
from orchestrator.cms.db import get_engine, session_scope
from orchestrator.cms.deployments import DeploymentRecord, deploy_roots, host_baselines
from orchestrator.cms.models import Host as HostCI
from orchestrator.report import deployment_report
from orchestrator.rollout import Baseline, WavePlan
from tests.unit.test_pull_logic import ACTION, rollout


def _rollout(names: list[str], root: str = "/srv/app", net: int = 18):
    acts = tuple(
        dataclasses.replace(ACTION, host=n, address=f"198.{net}.{i // 250}.{i % 250 + 2}",
                            deploy_root=root)
        for i, n in enumerate(names)
    )  # fmt: skip
    return dataclasses.replace(rollout(ACTION), waves=(WavePlan(1, acts),))


def _open(
    url: str, names: list[str], groups: dict[str, list[str]], **kw: object
) -> DeploymentRecord:
    record, _ = DeploymentRecord.open(
        url, _rollout(names, **kw), actor="alice", rfc_id=None, evidence={}, groups=groups
    )
    return record


class _Selects:
    """The SELECTs sent on `url`'s engine while in the `with` block."""

    def __init__(self, url: str) -> None:
        self.engine, self.sent = get_engine(url), []

    def _seen(self, conn, cursor, statement, *_: object) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            self.sent.append(statement)

    def __enter__(self) -> list[str]:
        event.listen(self.engine, "before_cursor_execute", self._seen)
        return self.sent

    def __exit__(self, *_: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)


def test_a_deployment_records_and_updates_every_target_hosts_ci(migrated_url):
    first = [f"h{i}" for i in range(1201)]  # three queries' worth of names
    with _Selects(migrated_url) as sent:
        _open(migrated_url, first, {n: ["web"] for n in first})
    assert len([q for q in sent if " hosts" in q]) == 3  # not one per host
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


def test_hosts_roots_and_baselines_are_read_in_one_query_per_500_names(migrated_url):
    names = [f"h{i}" for i in range(1201)]  # over SQLite's 999 bound parameters before 3.32
    record = _open(migrated_url, names, {n: ["web"] for n in names})
    shop = Baseline("shop@1.0", "sha256:" + "a" * 64)
    record.set_baselines("dev", {n: shop for n in names[::2]})
    with _Selects(migrated_url) as sent:
        roots = deploy_roots(migrated_url, [*names, "nobody"])
        baselines = host_baselines(migrated_url, [*names, "nobody"])
    assert len(sent) == 6  # three each
    assert roots == {n: "/srv/app" for n in names}
    assert baselines == {n: shop for n in names[::2]}
    assert len(host_baselines(migrated_url)) == 601  # no names: every host's


def test_a_runs_reads_of_its_record_leave_the_rollout_out(migrated_url):
    record = _open(migrated_url, ["a", "b"], {"a": ["web"], "b": ["db"]})
    with _Selects(migrated_url) as sent:
        light = record.load()
        record.move(lifecycle.Status.RUNNING)  # and the writes that lock the row
        record.append_evidence("outcomes", [{"host": "a", "ok": True}])
    assert len(sent) >= 3 and not any("rollout" in q for q in sent)
    assert light.status == "planned" and light.rollout is None
    assert record.load().latest("outcomes") == {"a": {"host": "a", "ok": True}}
    with pytest.raises(RuntimeError, match="without its rollout"):
        light.hosts  # noqa: B018 - the property is what is tested
    with pytest.raises(RuntimeError, match="without its rollout"):
        deployment_report(light, [])  # a report needs the hosts: never a report of none
    full = deployments.load(migrated_url, record.id)
    assert full.hosts == ["a", "b"] and full.plan().hosts()[0].host == "a"
    assert record.load(rollout=True).rollout == full.rollout


def test_ferry_status_lists_deployments_without_reading_their_rollouts(migrated_url):
    from remediation import status

    ids = [_open(migrated_url, ["a", "b"], {"a": ["web"], "b": ["db"]}).id for _ in range(3)]
    with _Selects(migrated_url) as sent:
        out = status.gather(migrated_url)
    assert sent and not any("rollout" in q for q in sent)
    assert [d["id"] for d in out["deployments"]] == ids[::-1]
    assert {n["deployment"] for n in out["needs_remediation"]} == set(ids)  # never finished


def test_ferry_status_lists_a_drift_audits_findings_until_the_host_is_recorded_again(
    migrated_url,
):
    from datetime import timedelta

    from orchestrator.cms import audit
    from orchestrator.cms.models import HostBaseline, utcnow
    from remediation import status

    def audited(env: str, not_ok: dict[str, str], started=None) -> int:
        data = {"counts": {}, "full": True, "not_ok": not_ok}
        if started is not None:
            data["started"] = started.isoformat()
        with session_scope(migrated_url) as s:
            kind = {"subject_type": "environment", "subject_id": env}
            return audit.append(s, actor="oncall", action="remediate.drift", data=data, **kind).id

    def needs(**kw: str) -> list[tuple[str, str, int]]:
        got = status.gather(migrated_url, **kw)["needs_remediation"]
        return [(n["host"], n["state"], n["audit"]) for n in got]

    t0 = utcnow()
    with session_scope(migrated_url) as s:
        for h in ("h1", "h2"):
            s.add(HostBaseline(host=h, environment="prod", release="shop@1.0", recorded_at=t0,
                               package_digest="sha256:" + "a" * 64, deployment_id=1))  # fmt: skip
    first = audited("prod", {"h1": "tampered"})
    assert needs() == [("h1", "tampered", first)]
    got = status.gather(migrated_url)["needs_remediation"][0]
    assert "a security incident first" in got["next"] and "shop@1.0" in got["next"]
    assert needs(environment="dev") == []
    for _ in range(3):  # audits of other scopes since do not hide it
        audited("dev", {})
    assert needs() == [("h1", "tampered", first)]
    # h2 recorded again by a deployment while a later audit of prod ran: that audit judged
    # the baseline before it, so its finding is not h2's now; it found h1 ok
    recorded = utcnow()
    with session_scope(migrated_url) as s:
        s.get(HostBaseline, "h2").recorded_at = recorded
    audited("prod", {"h2": "drifted"}, started=recorded - timedelta(seconds=1))
    assert needs() == []
    late = audited("*", {"h1": "unreachable"}, started=utcnow())
    assert needs() == [("h1", "unreachable", late)]
    with session_scope(migrated_url) as s:  # deployed again since: recorded after the audit
        s.get(HostBaseline, "h1").recorded_at = utcnow()
    assert needs() == []


def test_early_life_support_and_outcomes_written_at_once_lose_nothing(migrated_url):
    """Two writers of one deployment's evidence (two processes: two records), at once:
    every early-life-support run and every outcome is kept (each write locks the row)."""
    import threading

    first = _open(migrated_url, ["a"], {"a": ["web"]})
    other = DeploymentRecord(migrated_url, first.id, "bob")
    n, go = 30, threading.Barrier(2)

    def els() -> None:
        go.wait()
        for i in range(n):
            first.els_run({"at": i, "failed": []}, until="later")

    def outcomes() -> None:
        go.wait()
        for i in range(n):
            other.append_evidence("outcomes", [{"host": f"h{i}", "ok": True}])

    threads = [threading.Thread(target=els), threading.Thread(target=outcomes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ev = deployments.load(migrated_url, first.id, rollout=False).evidence
    assert [r["at"] for r in ev["els"]["runs"]] == list(range(n))
    assert [o["host"] for o in ev["outcomes"]] == [f"h{i}" for i in range(n)]
