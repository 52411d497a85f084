"""Big-bang to the 50-host fleet, and stopping a rollout with SIGTERM at a safe point."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from orchestrator.cms.models import Deployment, HostStep
from tests.conftest import FERRY_BIN
from tests.deploy.helpers import BROKEN_CHECK, build, cms, deploy, host_release, plan, rfc, rid

pytestmark = pytest.mark.fleet


def test_big_bang_to_50_hosts_succeeds_then_a_failing_milestone_backs_all_50_out(
    clean_fleet, run_ferry
):
    fleet, work = clean_fleet, Path.cwd()
    p = plan(work, fleet, strategy="big-bang", waves=None, concurrency=50)
    build(work, "1.0")
    res = deploy(run_ferry, p, "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.json()
    assert out["status"] == "succeeded" and out["waves"] == [fleet.hosts]
    assert {host_release(fleet, h) for h in fleet.hosts} == {rid("shop@1.0")}

    build(work, "2.0")
    (fleet.root_dir("h50") / "shared" / "broken-2.0").write_text("x")
    res = deploy(run_ferry, p, "shop@2.0", rfc(run_ferry, "shop@2.0"))
    assert res.returncode == 4, res.stdout + res.stderr
    out = res.json()
    assert out["status"] == "backed-out"
    assert sorted(r["host"] for r in out["backout"]) == sorted(fleet.hosts)
    assert all(r["restored"] for r in out["backout"])
    assert {host_release(fleet, h) for h in fleet.hosts} == {rid("shop@1.0")}


def test_sigterm_mid_rollout_stops_at_a_safe_point_and_backs_out(clean_fleet, run_ferry):
    fleet, work = clean_fleet, Path.cwd()
    fleet_hosts = fleet.hosts[:6]
    targets = ",".join(fleet_hosts)
    build(work, "1.0")
    base = plan(work, fleet, targets=targets)
    assert deploy(run_ferry, base, "shop@1.0", rfc(run_ferry, "shop@1.0")).returncode == 0
    build(work, "2.0")
    rfc_id = rfc(run_ferry, "shop@2.0")
    milestone = {"max_failed": 0, "deadline": "120s", "soak": "20s", "checks": [BROKEN_CHECK]}
    slow = plan(work, fleet, name="slow.yaml", targets=targets, milestone=milestone)
    proc = subprocess.Popen(
        [str(FERRY_BIN), "deploy", str(slow), "-r", "shop@2.0", "--rfc", rfc_id, "-o", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        activated = select(HostStep).where(
            HostStep.deployment_id == 2, HostStep.step == "activate", HostStep.status == "succeeded"
        )
        deadline = time.monotonic() + 90
        while not cms(lambda s: s.scalars(activated).first()):
            assert time.monotonic() < deadline, "wave 1 never activated"
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
        stopped_in = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 4, stdout + stderr
    assert stopped_in < 20, "the soak was not cut short by the signal"
    out = json.loads(stdout)
    assert out["status"] == "backed-out"
    assert "SIGTERM" in stderr
    assert {host_release(fleet, h) for h in fleet_hosts} == {rid("shop@1.0")}
    assert cms(lambda s: s.get(Deployment, 2).status) == "backed-out"
