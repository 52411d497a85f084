"""Remediation decisions (pure): what each host needs, and how a read-back is judged."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from orchestrator.errors import TransportError
from orchestrator.planner import Baseline, release_id
from remediation.decisions import (
    BaselineOwner,
    DriftAudit,
    backout_next_step,
    drift_found,
    plan_host,
    supersession,
)
from remediation.drift import exit_code, judge

PRIOR = Baseline("shop@1.0", "sha256:" + "a" * 64)
NEW = release_id("shop@2.0", "sha256:" + "b" * 64)
FULL = {s: "succeeded" for s in ("stage", "verify", "snapshot", "install", "activate", "check")}


def test_a_host_on_the_new_release_is_backed_out_with_every_step():
    p = plan_host("h1", FULL, PRIOR, NEW, NEW)
    assert (p.verdict, p.steps) == ("back-out", ("revert", "reactivate", "restore", "recheck"))


def test_keep_data_skips_only_the_restore_hook():
    p = plan_host("h1", FULL, PRIOR, NEW, NEW, keep_data=True)
    assert (p.verdict, p.steps) == ("back-out", ("revert", "reactivate", "recheck"))


def test_a_host_already_on_its_prior_with_data_restored_needs_nothing():
    journal = {**FULL, "revert": "succeeded", "restore": "succeeded"}
    p = plan_host("h1", journal, PRIOR, PRIOR.release_id, NEW)
    assert (p.verdict, p.steps) == ("at-prior", ())


def test_a_host_killed_after_install_but_before_activate_gets_its_data_restored():
    journal = {"stage": "succeeded", "snapshot": "succeeded", "install": "started"}
    p = plan_host("h1", journal, PRIOR, PRIOR.release_id, NEW)
    assert (p.verdict, p.steps) == ("data-only", ("restore", "recheck"))


def test_a_host_that_never_got_past_staging_is_left_as_it_is():
    journal = {"stage": "succeeded", "verify": "started"}
    p = plan_host("h1", journal, PRIOR, PRIOR.release_id, NEW)
    assert (p.verdict, p.steps) == ("at-prior", ())


def test_a_host_on_a_third_release_is_left_alone_and_named():
    p = plan_host("h1", FULL, PRIOR, "shop-3.0-cccccccccccc", NEW)
    assert p.verdict == "elsewhere" and p.steps == () and "shop-3.0" in p.note


def test_a_host_without_prior_loses_current_and_an_unreachable_one_is_named():
    p = plan_host("h1", FULL, None, NEW, NEW)
    assert (p.verdict, p.steps) == ("back-out", ("revert", "restore"))
    # already reverted to no release, data not yet restored: restore (no prior to recheck)
    p = plan_host("h1", FULL, None, None, NEW)
    assert (p.verdict, p.steps) == ("data-only", ("restore",))
    p = plan_host("h1", {**FULL, "restore": "succeeded"}, None, None, NEW)
    assert (p.verdict, p.steps) == ("at-prior", ())
    down = plan_host("h1", FULL, PRIOR, TransportError("h1", "connection refused"), NEW)
    assert (down.verdict, down.steps, down.current) == ("unreachable", (), None)
    assert "connection refused" in down.note  # the reason the transport gave
    assert down.note == "h1: connection refused"


def test_drift_judgement_and_exit_codes():
    rid = PRIOR.release_id
    ok = judge("h1", rid, "shop@1.0", {"current": rid, "ok": True, "files": 3})
    moved = judge("h2", rid, "shop@1.0", {"current": "x", "ok": False, "mismatches": ["…"]})
    bad = judge("h3", rid, "shop@1.0", {"current": rid, "ok": False, "mismatches": ["a: x"]})
    assert (ok.state, moved.state, bad.state) == ("ok", "drifted", "tampered")
    assert exit_code([ok]) == 0
    assert exit_code([ok, moved]) == 5
    assert exit_code([ok, moved, bad]) == 6


def test_a_modified_agent_file_on_a_host_is_tampering_and_an_intact_one_is_not():
    rid = PRIOR.release_id
    back = {"current": rid, "ok": True, "files": 3}
    intact = judge(
        "h1",
        rid,
        "shop@1.0",
        {**back, "agents": [{"file": ".ferry/agent-ab.py", "modified": False}]},
    )
    changed = judge(
        "h2",
        rid,
        "shop@1.0",
        {**back, "agents": [{"file": ".ferry/agent-ab.py", "modified": True}]},
    )
    assert intact.state == "ok"
    assert changed.state == "tampered" and ".ferry/agent-ab.py was modified" in changed.detail
    assert exit_code([intact, changed]) == 6


def _owner(i: int, strategy: str = "big-bang", status: str = "succeeded", backs_out=None):
    return BaselineOwner(i, strategy, status, f"shop@{i}.0", backs_out)


def test_a_backout_of_a_deployment_a_later_one_built_on_is_superseded():
    # h1's baseline was recorded by deployment 9 (succeeded, later): backing out 5 would put
    # it under 9's release to 5's prior; so for one that halted after its first waves, or
    # failed with hosts its own backout could not restore
    owners = {"h1": _owner(9), "h2": _owner(5), "h3": _owner(7, status="halted"),
              "h4": _owner(8, status="failed")}  # fmt: skip
    assert sorted(supersession(5, owners)) == ["h1", "h3", "h4"]


def test_later_backed_out_deployments_and_backouts_leave_it_applicable():
    owners = {
        "h1": _owner(5),
        "h2": _owner(7, status="backed-out"),  # its automatic backout restored h2
        "h3": _owner(8, strategy="backout", backs_out=7),  # a later one backed out by hand
        "h4": None,  # no baseline recorded (a backout to no release deletes it)
        "h5": _owner(3),  # recorded before this deployment
        "h6": _owner(6, strategy="backout", backs_out=5),  # this one's own backout
    }
    assert supersession(5, owners) == {}


def test_a_finished_deployment_names_the_hosts_it_left_unrestored_when_recovered_again():
    from types import SimpleNamespace

    from remediation.recover import _still_stuck

    stuck = [{"host": "h3", "current": "shop-2.0-x", "error": "unreachable"}]
    failed = SimpleNamespace(status="failed", evidence={"needs_remediation": stuck})
    assert _still_stuck(failed) == stuck  # each host with what was recorded of it
    assert _still_stuck(SimpleNamespace(status="backed-out", evidence={})) == []
    # a succeeded deployment's list is hosts not read back: drift's business, not recover's
    succeeded = SimpleNamespace(status="succeeded", evidence={"needs_remediation": stuck})
    assert _still_stuck(succeeded) == []


def test_each_drift_state_that_needs_work_says_what_to_do_next():
    from remediation.drift import HostDrift, next_step

    for state, words in {
        "drifted": "who switched it",
        "tampered": "a security incident first",
        "unreachable": "check the host",
    }.items():
        step = next_step(HostDrift("h1", state, "shop-1.0-x", "shop@1.0"))
        assert step is not None and words in step
        if state != "unreachable":
            assert "ferry deploy PLAN --release shop@1.0 --rfc ID" in step
    assert next_step(HostDrift("h1", "ok")) is None
    assert next_step(HostDrift("h1", "unmanaged")) is None
    # a host the audit did not ask (the inventory given lacks it): no sshd to check
    unlisted = next_step(HostDrift("h1", "unreachable", "shop-1.0-x", "shop@1.0", listed=False))
    assert unlisted is not None and "inventory that lists it" in unlisted
    assert "sshd" not in unlisted


def test_a_manual_backouts_next_step_names_the_release_each_rfc_must_be_for():
    def stuck(host: str, prior: str | None) -> dict:
        return {"host": host, "current": "shop-2.0-x", "error": "unreachable", "prior": prior}

    one = backout_next_step(7, "shop@2.0", [stuck("h1", "shop@1.0"), stuck("h2", "shop@1.0")])
    assert one == "ferry remediate backout 7 --rfc ID (an RFC for shop@1.0)"
    # a host with no prior loses `current`: the RFC is for the deployment's own release
    two = backout_next_step(7, "shop@2.0", [stuck("h1", "shop@1.0"), stuck("h3", None)])
    assert two == "ferry remediate backout 7 --rfc ID (one RFC for each of shop@1.0, shop@2.0)"
    # a record written before the prior was kept in it
    old = backout_next_step("7", "shop@2.0", [{"host": "h1", "current": None, "error": "x"}])
    assert old == "ferry remediate backout 7 --rfc ID (an RFC for the prior release)"


T0 = datetime(2026, 12, 7, 3, 0, tzinfo=UTC)


def _audit(i: int, minutes: int, env: str | None, not_ok: dict[str, str]) -> DriftAudit:
    return DriftAudit(i, T0 + timedelta(minutes=minutes), env, not_ok)


def test_a_drift_audits_findings_stay_until_a_later_audit_or_baseline_supersedes_them():
    baselines = {  # host → (environment, baseline recorded at)
        "h1": ("prod", T0),  # found tampered by the newest audit covering prod
        "h2": ("prod", T0 + timedelta(minutes=30)),  # deployed again after that audit
        "h3": ("dev", T0),  # found drifted by an audit of all, ok in a later one of dev
        "h4": ("dev", T0),  # unreachable in the audit of all; dev's later audit: ok
        "h5": ("test", T0),  # unreachable in the audit of all, never audited since
        "h6": ("prod", T0),  # never found anything
    }
    audits = [  # newest first
        _audit(4, 40, "staging", {"h1": "drifted"}),  # another environment: h1 is not its
        _audit(3, 20, "prod", {"h1": "tampered", "h2": "drifted"}),
        _audit(2, 15, "dev", {}),
        _audit(1, 10, None, {"h3": "drifted", "h4": "unreachable", "h5": "unreachable"}),
    ]
    found = drift_found(baselines, audits)
    assert {h: (a.id, a.not_ok[h]) for h, a in found.items()} == {
        "h1": (3, "tampered"),
        "h5": (1, "unreachable"),
    }
    assert drift_found(baselines, []) == {}
