"""A manual milestone: a wave with `approve: true` pauses the flow run after its milestone
passes; a decision by the deployer is recorded and not counted; an approval by someone with
a role continues (`ferry approve`); a rejection through Prefect's API backs out; every
decision and who made it is in the evidence and the audit log."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from orchestrator.cms.models import AuditEvent, Deployment
from tests.conftest import FERRY_BIN
from tests.deploy.helpers import build, cms, host_release, plan, rfc, rid

pytestmark = pytest.mark.fleet

WAVES = [{"hosts": 1, "approve": True, "timeout": "5m"}, "100%"]


def _start(plan_path: Path, release: str, rfc_id: str, log: Path) -> subprocess.Popen:
    args = [str(FERRY_BIN), "deploy", str(plan_path), "-r", release, "--rfc", rfc_id, "-o", "json"]
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=open(log, "wb"), text=True, env={**os.environ}
    )


def _waiting(proc: subprocess.Popen, log: Path) -> int:
    """The id of the deployment once it waits for a decision."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        rows = cms(lambda s: list(s.scalars(select(Deployment).order_by(Deployment.id.desc()))))
        if rows and (rows[0].evidence or {}).get("awaiting_approval"):
            return rows[0].id
        time.sleep(0.5)
    raise AssertionError(f"never waited for approval: {log.read_text()}")


def _api(url: str, path: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        f"{url}/{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def test_a_manual_milestone_waits_for_an_allowed_person_and_a_rejection_backs_out(
    clean_small, run_ferry, prefect_api
):
    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    p = plan(work, fleet, waves=WAVES)
    proc = _start(p, "shop@1.0", rfc(run_ferry, "shop@1.0"), work / "d1.log")
    dep = _waiting(proc, work / "d1.log")
    first = cms(lambda s: s.get(Deployment, dep)).rollout["waves"][0]
    assert len(first) == 1 and host_release(fleet, first[0]) == rid("shop@1.0")
    assert all(host_release(fleet, h) is None for h in fleet.hosts if h != first[0])

    # the deployer (alice) may not approve her own deployment's milestone: recorded, waited past
    own = run_ferry("approve", str(dep), "-o", "json")
    assert own.returncode == 0, own.stderr
    deadline = time.monotonic() + 120
    while not (cms(lambda s: s.get(Deployment, dep)).evidence.get("approvals")):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.5)
    refused = cms(lambda s: s.get(Deployment, dep)).evidence["approvals"][0]
    assert refused["approver"] == "alice" and "started this deployment" in refused["refused"]
    assert proc.poll() is None  # still waiting

    ok = run_ferry("approve", str(dep), "-m", "canary looks fine", env={"FERRY_USER": "bob"})
    assert ok.returncode == 0, ok.stderr
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, (work / "d1.log").read_text()
    assert json.loads(out)["status"] == "succeeded"
    assert all(host_release(fleet, h) == rid("shop@1.0") for h in fleet.hosts)
    decisions = cms(lambda s: s.get(Deployment, dep)).evidence["approvals"]
    assert decisions[-1] == {
        "wave": 1, "approve": True, "approver": "bob", "comment": "canary looks fine"
    }  # fmt: skip
    actions = cms(
        lambda s: [
            (e.action, e.actor) for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))
        ]
    )
    assert ("deploy.wave-decision-refused", "alice") in actions
    assert ("deploy.wave-approved", "bob") in actions

    # a rejection through Prefect's API (as its UI sends it) backs every touched host out
    build(work, "1.1")
    proc = _start(p, "shop@1.1", rfc(run_ferry, "shop@1.1"), work / "d2.log")
    dep2 = _waiting(proc, work / "d2.log")
    from orchestrator.prefect_deployments import cms_tag
    from orchestrator.settings import get_settings

    mine = {"name": {"like_": f"#{dep2}"}, "tags": {"all_": [cms_tag(get_settings().cms_url)]}}
    # the flow says it waits a moment before the server has its PAUSED state (CI saw RUNNING)
    deadline = time.monotonic() + 30
    while True:
        runs = _api(prefect_api, "flow_runs/filter", {"flow_runs": mine})
        paused = [
            r for r in runs if r["name"].endswith(f" #{dep2}") and r["state_type"] == "PAUSED"
        ]
        if paused or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert len(paused) == 1, runs
    decision = {"approve": False, "approver": "carol", "comment": "not tonight"}
    _api(prefect_api, f"flow_runs/{paused[0]['id']}/resume", {"run_input": decision})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 4, (work / "d2.log").read_text()
    result = json.loads(out)
    assert result["status"] == "backed-out"
    assert all(host_release(fleet, h) == rid("shop@1.0") for h in fleet.hosts)
    run = _api(prefect_api, "flow_runs/filter", {"flow_runs": {"id": {"any_": [paused[0]["id"]]}}})
    assert run[0]["state_type"] == "FAILED" and "rejected by carol" in run[0]["state"]["message"]
    actions = cms(lambda s: [(e.action, e.actor) for e in s.scalars(select(AuditEvent))])
    assert ("deploy.wave-rejected", "carol") in actions
