"""The insight computations as data: plain rows in, figures out (no CMS, no host).

Each case builds the few rows that matter and states the figure a change manager would
compute by hand from them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import yaml

from orchestrator.change.authorize import ApprovalView, RfcView, authorize
from orchestrator.change.calendar import Calendar
from orchestrator.change.models import ChangeModels
from orchestrator.els import next_action, outcome_of
from orchestrator.errors import SpecError
from orchestrator.insight.dora import dora_keys
from orchestrator.insight.figure import Period
from orchestrator.insight.governance import governance_report
from orchestrator.insight.kpis import change_kpis, change_outcome, release_figures, restorations
from orchestrator.insight.records import Records, commit_time
from orchestrator.insight.review import change_review
from orchestrator.plan import load_plan

T0 = datetime(2030, 3, 1, 12, 0, tzinfo=UTC)
PERIOD = Period(T0 - timedelta(days=10), T0 + timedelta(days=10))


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def dep(id, status, *, rfc=None, env="production", release="shop@1.0", start=0.0, end=1.0,
        strategy="phased", waves=(), steps=(), hosts=("h1",), **extra):  # fmt: skip
    row = {
        "id": id, "rfc_id": rfc, "release": release, "environment": env,
        "strategy": strategy, "status": status, "actor": "alice",
        "started_at": at(start), "finished_at": at(end) if end is not None else None,
        "hosts": list(hosts), "backs_out": None, "manual_backout": None,
        "needs_remediation": [], "failed_hosts": [], "els": None,
        "waves": list(waves), "steps": list(steps),
    }  # fmt: skip
    row.update(extra)
    return row


def wave(index, status, start, end, hosts=("h1",), failed=()):
    return {"index": index, "hosts": list(hosts), "status": status, "started_at": at(start),
            "finished_at": at(end), "failed": list(failed), "reason": "r"}  # fmt: skip


def step(host, name, status, start, end):
    return {"host": host, "wave": 1, "step": name, "status": status,
            "started_at": at(start), "finished_at": at(end)}  # fmt: skip


def rfc(id, model, *, created=0.0, submitted=0.0, authorized=1.0, env="production",
        approvals=(), needs_review=False, requester="alice"):  # fmt: skip
    return {
        "id": id, "title": "", "release": "shop@1.0", "environment": env, "model": model,
        "status": "implemented", "risk": "low", "requester": requester,
        "created_at": at(created), "submitted_at": at(submitted),
        "authorized_at": at(authorized) if authorized is not None else None,
        "needs_review": needs_review, "review_due": None, "approvals": list(approvals),
    }  # fmt: skip


def approval(who, role="cab"):
    return {"approver": who, "role": role, "decision": "approved", "stage": None, "at": T0}


def test_an_empty_period_gives_zeros_for_every_figure_not_an_error():
    report = governance_report(Records(), PERIOD, T0)
    assert report["change"]["changes"]["value"] == 0
    assert report["change"]["success_rate"]["value"] == 0.0
    assert report["release"]["mtrs"]["value"] == 0.0
    assert report["dora"]["change_failure_rate"]["value"] == 0.0
    assert report["dora"]["deployment_frequency"]["value"] == 0.0
    assert report["dashboard"]["environments"] == []


def test_a_changes_outcome_is_its_last_deployment_that_ran():
    deps = [
        dep(1, "refused", rfc=7),
        dep(2, "backed-out", rfc=8),
        dep(3, "succeeded", rfc=8),  # a re-run under the same RFC
        dep(4, "failed", rfc=9),
        dep(5, "integrity-failed", rfc=10),
    ]
    assert [change_outcome(i, deps) for i in (7, 8, 9, 10, 11)] == [
        "not-implemented", "successful", "failed", "backed-out", "not-implemented",
    ]  # fmt: skip


def test_change_kpis_count_models_outcomes_drift_and_separation_of_duties():
    rfcs = [
        rfc(1, "standard"),
        rfc(2, "normal", submitted=0, authorized=30, approvals=[approval("carol")]),
        rfc(
            3, "normal", submitted=0, authorized=90, approvals=[approval("carol"), approval("dave")]
        ),
        rfc(4, "emergency", approvals=[approval("erin", "ecab")], needs_review=True),
        rfc(5, "normal", created=-60 * 24 * 30),  # raised before the period
    ]
    deps = [dep(1, "succeeded", rfc=1, end=5), dep(2, "backed-out", rfc=2, end=40),
            dep(3, "succeeded", rfc=3, end=100), dep(4, "failed", rfc=4)]  # fmt: skip
    drift = [{"at": at(5), "environment": "production",
              "not_ok": {"h1": "drifted", "h2": "unreachable", "h3": "tampered"}}]  # fmt: skip
    k = change_kpis(rfcs, deps, drift, {"h1": "production", "h3": "production"}, PERIOD)
    assert k["changes"]["value"] == 4
    assert {m: f["value"] for m, f in k["by_model"].items()} == {
        "standard": 1, "normal": 2, "emergency": 1
    }  # fmt: skip
    assert k["by_model"]["normal"]["share"] == 0.5
    assert k["success_rate"]["value"] == 0.5  # 1 and 3 of 4
    assert k["backed_out"]["value"] == 1 and k["failed"]["value"] == 2
    assert k["unauthorized_found_by_drift"]["value"] == 2  # unreachable is not a change
    assert k["emergency_awaiting_review"]["value"] == 1
    assert {w: v["approvals"] for w, v in k["approvals_per_approver"]["value"].items()} == {
        "carol": 2, "dave": 1, "erin": 1
    }  # fmt: skip
    # authorized → implemented: rfc 1 (5 − 1 min), rfc 3 (100 − 90 min); rfc 2 never succeeded
    assert k["lead_time"]["authorized_to_implemented"]["samples"] == [240.0, 600.0]
    assert k["lead_time"]["submitted_to_authorized"]["mean"] == (60 + 1800 + 5400 + 60) / 4
    staging = change_kpis(rfcs, deps, drift, {"h1": "production"}, PERIOD, "staging")
    assert staging["changes"]["value"] == 0 and staging["unauthorized_found_by_drift"]["value"] == 0


def test_backout_duration_runs_from_the_failed_verdict_to_the_last_backout_step():
    d = dep(1, "backed-out", end=12,
            waves=[wave(1, "passed", 0, 2), wave(2, "failed", 2, 5, failed=["h2"])],
            steps=[step("h1", "activate", "succeeded", 0, 1),
                   step("h2", "activate", "succeeded", 3, 4),
                   step("h1", "revert", "succeeded", 5, 6),
                   step("h2", "recheck", "succeeded", 6, 8)])  # fmt: skip
    manual = dep(2, "succeeded", strategy="backout", start=20, end=23, backs_out=9)
    rel = release_figures([d, manual], PERIOD, T0)
    assert rel["backout_duration"]["samples"] == [180.0, 180.0]  # 8 − 5 min; 23 − 20 min
    assert rel["hosts_changed"]["value"] == 2 and rel["waves"]["value"] == 2
    assert rel["milestones_failed"]["where"][0]["failed_hosts"] == ["h2"]
    assert rel["deployments"]["value"] == 1 and rel["manual_backouts"]["value"] == 1


def test_mtrs_runs_from_the_failure_to_the_restoring_backout_and_open_ones_are_listed():
    failed = dep(1, "failed", end=10, hosts=("h1", "h2"), needs_remediation=["h1", "h2"])
    fixed = dep(2, "succeeded", strategy="backout", start=40, end=70, hosts=("h1",), backs_out=1)
    rows = restorations([failed, fixed], now=at(100))
    assert [(r["host"], r["seconds"], r["open"]) for r in rows] == [
        ("h1", 3600.0, False), ("h2", 5400.0, True)
    ]  # fmt: skip
    rel = release_figures([failed, fixed], PERIOD, at(100))
    assert rel["mtrs"]["value"] == 3600.0 and rel["mtrs"]["count"] == 1
    assert rel["needs_remediation"]["value"] == 2 and rel["needs_remediation"]["open"] == 1


def test_dora_keys_for_production_from_deployments_and_commit_times():
    ok1 = dep(1, "succeeded", release="shop@1.0", start=0, end=10)
    auto = dep(2, "backed-out", release="shop@1.1", start=20, end=30,
               waves=[wave(1, "failed", 20, 25)],
               steps=[step("h1", "revert", "succeeded", 25, 27)])  # fmt: skip
    by_hand = dep(3, "backed-out", release="shop@1.2", start=40, end=50,
                  manual_backout={"deployment": 4, "status_before": "succeeded"})  # fmt: skip
    backout = dep(4, "succeeded", strategy="backout", start=60, end=65, backs_out=3)
    staging = dep(5, "succeeded", env="staging", start=0, end=1)
    commits = {"shop@1.0": at(-60), "shop@1.2": at(-20)}
    k = dora_keys([ok1, auto, by_hand, backout, staging], commits, PERIOD, "production")
    assert k["deployment_frequency"]["deployments"] == 2
    assert k["deployment_frequency"]["value"] == round(2 / 20, 4)
    assert k["lead_time_for_changes"]["samples"] == [4200.0, 4200.0]  # 10+60, 50+20 min
    assert k["change_failure_rate"]["value"] == round(2 / 3, 4)
    assert k["time_to_restore"]["samples"] == [120.0, 300.0]


def test_commit_time_is_the_newest_source_commit_in_the_provenance():
    prov = {
        "source": {"commit": "a", "committed_at": "2030-03-01T10:00:00+00:00"},
        "units": {"app": {"git": {"committed_at": "2030-03-01T11:00:00+01:00"}}, "x": {}},
    }
    assert commit_time(prov) == datetime(2030, 3, 1, 10, 0, tzinfo=UTC)
    assert commit_time({}) is None


def test_a_post_implementation_review_holds_the_changes_own_figures():
    d = dep(1, "backed-out", rfc=3, hosts=("h1", "h2"),
            waves=[wave(1, "passed", 0, 1), wave(2, "failed", 1, 2, failed=["h2"])],
            steps=[step("h1", "activate", "succeeded", 0, 1),
                   step("h2", "revert", "succeeded", 2, 3)],
            els={"runs": [{"at": "x", "failed": ["h1"]}],
                 "outcome": {"outcome": "failed"}})  # fmt: skip
    other = dep(2, "succeeded", rfc=4)
    r = change_review(3, [d, other])
    assert (r["outcome"], r["hosts"], r["waves"], r["failed_milestones"]) == ("backed-out", 2, 2, 1)
    assert r["backed_out"] and r["els"] == "failed" and len(r["deployments"]) == 1
    assert r["deployments"][0]["backout_seconds"] == 60.0  # verdict at 2 min, restored at 3


def test_early_life_support_runs_when_due_and_closes_at_the_period_end():
    els = {"period": 600.0, "every": 60.0, "runs": []}
    done = at(0)
    assert next_action(els, "succeeded", None, at(1)) == "wait"
    assert next_action(els, "succeeded", done, at(1)) == "run"
    ran = {**els, "runs": [{"at": at(1).isoformat(), "failed": []}]}
    assert next_action(ran, "succeeded", done, at(1.5)) == "wait"
    assert next_action(ran, "succeeded", done, at(2.5)) == "run"
    assert next_action(ran, "succeeded", done, at(10)) == "close"
    assert next_action(ran, "backed-out", done, at(2.5)) == "close"
    assert (
        next_action({**ran, "outcome": {"outcome": "passed"}}, "succeeded", done, at(3)) == "done"
    )
    assert outcome_of(ran) == "passed" and outcome_of(els) == "unchecked"
    assert outcome_of({"runs": [{"failed": []}, {"failed": ["h1"]}]}) == "failed"


PER_STAGE = ChangeModels.model_validate(
    {"roles": {"carol": ["cab"]}, "models": {"normal": {"approve_each_stage": True}}}
)


def _view(*approvals: ApprovalView) -> RfcView:
    return RfcView(id=5, release="shop@1.0", environment="dev", model="normal",
                   status="authorized", requester="alice", risk="low",
                   approvals=approvals, submitted_at=T0 - timedelta(days=1))  # fmt: skip


def test_a_model_approving_each_stage_refuses_a_deploy_whose_checkin_alone_was_approved():
    cal = Calendar.model_validate({"environments": {"dev": {"criticality": "low"}}})
    checkin = ApprovalView("carol", "cab", "approved", T0, "checkin")
    view = _view(checkin)
    assert authorize(view, "checkin", None, None, "shop@1.0", T0, PER_STAGE, cal).allowed
    no = authorize(view, "deploy", "dev", ["h1"], "shop@1.0", T0, PER_STAGE, cal)
    assert not no.allowed and any("deploy stage" in r for r in no.reasons), no.reasons
    both = _view(checkin, ApprovalView("carol", "cab", "approved", T0, "deploy"))
    assert authorize(both, "deploy", "dev", ["h1"], "shop@1.0", T0, PER_STAGE, cal).allowed
    # one approval for every stage, as before, when the model does not approve each stage
    plain = ChangeModels.model_validate({"roles": {"carol": ["cab"]}})
    whole = _view(ApprovalView("carol", "cab", "approved", T0))
    assert authorize(whole, "deploy", "dev", ["h1"], "shop@1.0", T0, plain, cal).allowed


@pytest.mark.parametrize(
    ("els", "field"),
    [
        ({"period": "1h", "checks": []}, "els.checks"),
        ({"period": "0s", "checks": [{"command": "true"}]}, "els"),
        ({"period": "1h", "every": "soon", "checks": [{"command": "true"}]}, "els.every"),
        ({"checks": [{"command": "true"}]}, "els.period"),
    ],
)
def test_a_bad_els_in_a_plan_is_refused_naming_the_field(tmp_path, els, field):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"environment": "dev", "strategy": "big-bang", "els": els}))
    with pytest.raises(SpecError) as exc:
        load_plan(path)
    assert exc.value.message.startswith(f"{path}: {field}"), exc.value.message
