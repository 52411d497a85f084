"""Governance insight against records made by real deployments on the lab fleet.

One CMS is built by running the real CLI: a standard change to staging, three normal
changes to production (one succeeds, one is backed out by its failed milestone, one
succeeds and is then backed out by hand under an emergency change), and a drift audit
that finds a host switched by hand. `ferry report` must then give each ITIL KPI and each
DORA key as computed by hand below from those runs; and its HTML dashboard must render in
a real headless Chromium with no console error, listing every environment and the release
each host runs.
"""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from statistics import mean

import pytest
from sqlalchemy import select

from orchestrator.cms.models import RFC, Deployment, HostBaseline, HostStep, Wave
from tests.deploy.helpers import cms, deploy, plan, rid
from tests.insight.browser import open_page
from tests.insight.helpers import (
    build_committed,
    change_files,
    emergency_rfc,
    normal_rfc,
    ok,
    standard_rfc,
)

pytestmark = pytest.mark.fleet

ARTIFACTS = Path(os.environ.get("FERRY_TEST_ARTIFACTS", Path(__file__).parents[2] / "artifacts"))


def _secs(a: datetime, b: datetime) -> float:
    return (b - a).total_seconds()


def test_report_gives_each_kpi_and_dora_key_as_computed_by_hand_from_real_runs(
    clean_small, run_ferry, monkeypatch
):
    fleet, work = clean_small, Path.cwd()
    change_files(work, monkeypatch)
    now = datetime.now(UTC).replace(microsecond=0)
    commits = {v: now - timedelta(hours=h) for v, h in (("1.0", 5), ("1.1", 4), ("1.2", 3))}
    for version, at in commits.items():
        build_committed(work, version, at)
    staging = plan(work, fleet, "staging.yaml", environment="staging", targets="h1,h2,h3",
                   strategy="big-bang", waves=None)  # fmt: skip
    prod = plan(work, fleet, "prod.yaml", environment="production", targets="h4,h5,h6",
                waves=[1, 2, "100%"])  # fmt: skip

    std = standard_rfc(run_ferry, "shop@1.0")
    d_staging = ok(deploy(run_ferry, staging, "shop@1.0", std))["id"]
    n1 = normal_rfc(run_ferry, "shop@1.0")
    d1 = ok(deploy(run_ferry, prod, "shop@1.0", n1))["id"]
    n2 = normal_rfc(run_ferry, "shop@1.1")
    (fleet.root_dir("h5") / "shared").mkdir(parents=True, exist_ok=True)
    (fleet.root_dir("h5") / "shared" / "broken-1.1").write_text("")  # its milestone fails
    res = deploy(run_ferry, prod, "shop@1.1", n2)
    assert res.returncode == 4, res.stdout + res.stderr
    d2 = res.json()["id"]
    n3 = normal_rfc(run_ferry, "shop@1.2")
    d3 = ok(deploy(run_ferry, prod, "shop@1.2", n3))["id"]
    e1 = emergency_rfc(run_ferry, "shop@1.0")  # 1.2 turned out bad: back to 1.0, now
    back = ok(run_ferry("remediate", "backout", str(d3), "--rfc", e1, "-o", "json"))
    assert back["status"] == "succeeded", back
    # someone switches h6 by hand; the drift audit finds it
    root6 = fleet.root_dir("h6")
    subprocess.run(["cp", "-a", str(root6 / "releases" / rid("shop@1.0")),
                    str(root6 / "releases" / "hotfix")], check=True)  # fmt: skip
    os.symlink("releases/hotfix", root6 / "current.tmp")
    os.replace(root6 / "current.tmp", root6 / "current")
    drift = run_ferry("remediate", "drift", "--env", "production", "-o", "json")
    assert drift.returncode == 5, drift.stdout + drift.stderr
    assert drift.json()["hosts"]["h6"]["state"] == "drifted"

    report = ok(run_ferry("report", "-o", "json"))

    # --- by hand, from the runs above and their records ------------------------------------
    rfcs = cms(
        lambda s: {str(r.id): (r.submitted_at, r.authorized_at) for r in s.scalars(select(RFC))}
    )
    deps = cms(
        lambda s: {
            d.id: (d.started_at, d.finished_at, d.status, d.strategy)
            for d in s.scalars(select(Deployment))
        }
    )
    assert {i: v[2] for i, v in deps.items()} == {
        d_staging: "succeeded", d1: "succeeded", d2: "backed-out", d3: "backed-out",
        back["id"]: "succeeded",
    }  # fmt: skip
    ch = report["change"]
    assert ch["changes"]["value"] == 5
    assert {m: (f["value"], f["share"]) for m, f in ch["by_model"].items()} == {
        "standard": (1, 0.2), "normal": (3, 0.6), "emergency": (1, 0.2)
    }  # fmt: skip
    assert ch["outcomes"] == {
        std: "successful", n1: "successful", n2: "backed-out", n3: "backed-out", e1: "successful"
    }  # fmt: skip
    assert ch["implemented"]["value"] == 5
    assert ch["success_rate"]["value"] == 0.6  # std, n1, e1 of 5
    assert ch["backed_out"]["value"] == 2  # n2 automatically, n3 by hand
    assert ch["failed"]["value"] == 2 and ch["failed"]["needing_remediation"] == 0
    assert ch["unauthorized_found_by_drift"]["value"] == 1
    assert [h["host"] for h in ch["unauthorized_found_by_drift"]["hosts"]] == ["h6"]
    assert ch["emergency_awaiting_review"]["value"] == 1
    assert ch["emergency_awaiting_review"]["rfcs"][0]["rfc"] == int(e1)
    approvers = ch["approvals_per_approver"]
    assert {w: v["approvals"] for w, v in approvers["value"].items()} == {"carol": 3, "erin": 1}
    assert approvers["self_approvals"] == 0
    # lead times: submitted → authorized for all five; → implemented for the four whose
    # deployment succeeded (n3's did, before it was backed out by hand; n2's never did)
    implemented = {std: d_staging, n1: d1, n3: d3, e1: back["id"]}
    sub_auth = [_secs(*rfcs[r]) for r in (std, n1, n2, n3, e1)]
    sub_impl = [_secs(rfcs[r][0], deps[d][1]) for r, d in implemented.items()]
    lead = ch["lead_time"]
    assert lead["submitted_to_authorized"]["count"] == 5
    assert lead["submitted_to_authorized"]["mean"] == pytest.approx(mean(sub_auth), abs=0.01)
    assert lead["submitted_to_implemented"]["count"] == 4
    assert lead["submitted_to_implemented"]["mean"] == pytest.approx(mean(sub_impl), abs=0.01)

    rel = report["release"]
    assert rel["deployments"]["value"] == 4 and rel["manual_backouts"]["value"] == 1
    assert rel["per_environment"]["value"] == {
        "staging": {"shop@1.0": {"deployments": 1, "succeeded": 1}},
        "production": {
            "shop@1.0": {"deployments": 1, "succeeded": 1},
            "shop@1.1": {"deployments": 1, "backed-out": 1},
            "shop@1.2": {"deployments": 1, "backed-out": 1},
        },
    }
    assert rel["waves"]["value"] == 1 + 3 + 2 + 3  # d2 stopped after its second wave
    assert rel["hosts_changed"]["value"] == 3 + 3 + 2 + 3  # d2 switched h4 and h5
    assert rel["milestones_failed"]["value"] == 1
    where = rel["milestones_failed"]["where"][0]
    assert (where["deployment"], where["wave"], where["failed_hosts"]) == (d2, 2, ["h5"])
    waves = cms(
        lambda s: {(w.deployment_id, w.index): w.finished_at for w in s.scalars(select(Wave))}
    )
    backout_ends = cms(
        lambda s: [
            r.finished_at
            for r in s.scalars(select(HostStep).where(HostStep.deployment_id == d2))
            if r.step in ("revert", "reactivate", "restore", "recheck")
        ]
    )
    auto = _secs(waves[(d2, 2)], max(backout_ends))
    manual = _secs(deps[back["id"]][0], deps[back["id"]][1])
    bd = rel["backout_duration"]
    assert bd["count"] == 2 and sorted(bd["deployments"]) == sorted([d2, back["id"]])
    assert sorted(bd["samples"]) == pytest.approx(sorted([auto, manual]), abs=0.01)
    assert rel["needs_remediation"]["value"] == 0 and rel["mtrs"]["count"] == 0

    dora = report["dora"]
    assert dora["environment"] == "production"
    assert dora["deployment_frequency"]["deployments"] == 2  # d1, d3 (d3 reached production)
    assert dora["deployment_frequency"]["value"] == pytest.approx(2 / 30, abs=1e-4)
    leads = [_secs(commits["1.0"], deps[d1][1]), _secs(commits["1.2"], deps[d3][1])]
    assert dora["lead_time_for_changes"]["count"] == 2
    assert sorted(dora["lead_time_for_changes"]["samples"]) == pytest.approx(
        sorted(leads), abs=0.01
    )
    assert dora["change_failure_rate"]["value"] == pytest.approx(2 / 3, abs=1e-4)  # d2, d3
    assert dora["time_to_restore"]["count"] == 2
    assert sorted(dora["time_to_restore"]["samples"]) == pytest.approx(
        sorted([auto, manual]), abs=0.01
    )
    assert dora["time_to_restore"]["unrestored"] == []
    # every figure says how it was computed
    for group in (ch, rel, dora):
        for key, f in group.items():
            if isinstance(f, dict) and "value" in f:
                assert len(f["how"]) > 20, key

    # one environment: only its own records count
    staging_only = ok(run_ferry("report", "--env", "staging", "-o", "json"))
    assert staging_only["change"]["changes"]["value"] == 1
    assert staging_only["release"]["deployments"]["value"] == 1
    assert staging_only["dora"]["environment"] == "staging"
    assert staging_only["dora"]["change_failure_rate"]["value"] == 0.0
    # an empty period gives zeros, not an error
    empty = ok(run_ferry("report", "--since", "2001-01-01", "--until", "2001-01-31", "-o", "json"))
    assert empty["change"]["changes"]["value"] == 0
    assert empty["change"]["success_rate"]["value"] == 0.0
    assert empty["release"]["deployments"]["value"] == 0
    assert empty["dora"]["deployment_frequency"]["value"] == 0.0
    assert empty["dora"]["lead_time_for_changes"]["value"] == 0.0
    bad = run_ferry("report", "--since", "2001-02-01", "--until", "2001-01-01")
    assert bad.returncode == 2 and "--since" in bad.stderr and "Traceback" not in bad.stderr

    # --- the dashboard, in a real browser --------------------------------------------------
    out = work / "dash"
    res = run_ferry("report", "-o", "html", "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    for png in ("timeline.png", "trends.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    baselines = cms(
        lambda s: {(b.environment, b.host, b.release) for b in s.scalars(select(HostBaseline))}
    )
    assert {e for e, _h, _r in baselines} == {"staging", "production"}
    with open_page(out / "index.html") as page:
        assert page.errors == []
        assert page.evaluate("document.body.dataset.ready") == "yes"
        rows = page.evaluate(
            "[...document.querySelectorAll('table.hosts tbody tr')].map("
            "r => [...r.cells].map(c => c.textContent.trim()))"
        )
        grid = page.evaluate(
            "[...document.querySelectorAll('table.grid tr')].map("
            "r => [...r.cells].map(c => c.textContent.trim()))"
        )
        recent = page.evaluate("document.querySelectorAll('table.recent tbody tr').length")
        awaiting = page.evaluate("document.querySelector('table.awaiting').textContent")
        images = page.evaluate("[...document.images].map(i => i.naturalWidth > 0 && i.complete)")
        shot = page.screenshot(ARTIFACTS / "dashboard.png")
    # environments × releases: the environment, its baseline, the hosts on each release
    assert grid == [
        ["environment", "baseline", "shop@1.0", "in flight", "needs remediation"],
        ["production", "shop@1.0", "h4, h5, h6", "", ""],
        ["staging", "shop@1.0", "h1, h2, h3", "", ""],
    ]
    assert {(e, h, r) for e, h, r, _state in rows} == baselines
    assert recent == 5 and images == [True, True]
    assert f"RFC-{e1}" in awaiting and "review" in awaiting
    assert shot.stat().st_size > 10_000
