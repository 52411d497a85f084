"""The deployment engine on the real fleet: bad input refused before any record, integrity
failures are exit 6, an unreachable host at the final prune does not undo a success, an
unexpected error backs out and says where its traceback is, remediation runs what the
deployment recorded, and the flow runs from a deployment id alone in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, select

from orchestrator.cms.models import RFC, Deployment, HostBaseline, HostStep, Wave
from tests.deploy.helpers import (
    build,
    cms,
    deploy,
    host_release,
    inventory_variant,
    plan,
    rfc,
    rid,
    shared_file,
)

pytestmark = pytest.mark.fleet


def _deployments() -> int:
    return cms(lambda s: s.scalar(select(func.count()).select_from(Deployment)))


def _untouched(fleet, hosts=None) -> bool:
    return all(
        not fleet.root_dir(h).exists() or list(fleet.root_dir(h).iterdir()) == []
        for h in hosts or fleet.hosts
    )


def test_a_typo_in_a_hook_template_is_exit_2_before_any_record_and_the_dry_run_says_so(
    clean_small, run_ferry
):
    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    rfc_id = rfc(run_ferry, "shop@1.0")
    hooks = {"install": "cp {{ relase_path }}/app/VERSION /tmp/x", "activate": "true"}
    bad = plan(work, fleet, "typo.yaml", hooks=hooks)
    dry = deploy(run_ferry, bad, "shop@1.0", None, "--dry-run")
    assert dry.returncode == 2, dry.stdout + dry.stderr
    assert "typo.yaml: hooks.install" in dry.stderr and "relase_path" in dry.stderr
    assert "release_path" in dry.stderr  # the names it could have meant
    assert "Traceback" not in dry.stderr
    res = deploy(run_ferry, bad, "shop@1.0", rfc_id)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "hooks.install" in res.stderr
    assert _deployments() == 0 and _untouched(fleet)
    # the RFC is still usable: the fixed plan deploys under it
    assert cms(lambda s: s.get(RFC, int(rfc_id)).status) in ("authorized", "scheduled")
    good = plan(work, fleet, "fixed.yaml", hooks={**hooks, "install": "true"})
    ok = deploy(run_ferry, good, "shop@1.0", rfc_id)
    assert ok.returncode == 0, ok.stderr
    assert cms(lambda s: s.get(RFC, int(rfc_id)).status) == "implemented"


def test_a_typo_in_a_check_or_config_template_is_refused_the_same_way(clean_small, run_ferry):
    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    (work / "app.toml.j2").write_text("port = {{ prot }}\n")
    checks = [{"command": "test -d {{ release_path }}"}, {"http": "http://{{ adress }}:80/"}]
    bad_check = plan(work, fleet, "c.yaml", milestone={"checks": checks})
    res = deploy(run_ferry, bad_check, "shop@1.0", None, "--dry-run")
    assert res.returncode == 2 and "milestone.checks[1]" in res.stderr and "adress" in res.stderr
    bad_config = plan(
        work, fleet, "t.yaml", config=[{"src": "app.toml.j2", "dest": "app.toml"}], vars={}
    )
    res = deploy(run_ferry, bad_config, "shop@1.0", None, "--dry-run")
    assert res.returncode == 2 and "config app.toml" in res.stderr and "prot" in res.stderr
    assert _deployments() == 0


@pytest.mark.parametrize("field", ["identity_file", "known_hosts"])
def test_a_missing_ssh_file_is_exit_2_naming_it_before_anything_is_recorded(
    clean_small, run_ferry, field
):
    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    rfc_id = rfc(run_ferry, "shop@1.0")
    inv = inventory_variant(fleet, work, "inv.yaml", **{field: str(work / "gone" / field)})
    res = deploy(run_ferry, plan(work, fleet, inventory=str(inv)), "shop@1.0", rfc_id)
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"inv.yaml: ssh.{field}" in res.stderr and str(work / "gone") in res.stderr
    assert "Traceback" not in res.stderr and "FileNotFoundError" not in res.stderr
    assert _deployments() == 0 and _untouched(fleet)
    assert cms(lambda s: s.get(RFC, int(rfc_id)).status) in ("authorized", "scheduled")


def test_a_host_pinning_another_dml_key_is_an_integrity_failure_exit_6(clean_small, run_ferry):
    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    ferry_dir = fleet.root_dir("h1") / ".ferry"
    ferry_dir.mkdir(parents=True)
    (ferry_dir / "dml.pub").write_text("ab" * 32 + "\n")  # some other DML's key
    rfc_id = rfc(run_ferry, "shop@1.0")
    res = deploy(run_ferry, plan(work, fleet), "shop@1.0", rfc_id)
    assert res.returncode == 6, res.stdout + res.stderr
    out = res.json()
    assert out["status"] == "integrity-failed"
    assert out["hosts"]["h1"]["failure"]["kind"] == "integrity"
    assert "pins DML key" in out["hosts"]["h1"]["failure"]["reason"]
    assert "h1" in out["milestones"][0]["reason"] and out["milestones"][0]["integrity"]
    # nothing switched anywhere; waves 2 and 3 never started
    assert all(host_release(fleet, h) is None for h in fleet.hosts)
    assert _untouched(fleet, [h for h in fleet.hosts if h != "h1"])
    assert cms(lambda s: list(s.scalars(select(HostBaseline)))) == []
    # only the signer's key was refused, not the change: the RFC stays usable
    assert cms(lambda s: s.get(RFC, int(rfc_id)).status) == "implementing"


def test_a_host_unreachable_at_the_final_prune_does_not_undo_a_successful_rollout(
    clean_small, run_ferry
):
    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    rfc_id = rfc(run_ferry, "shop@1.0")
    p = plan(work, fleet, timeouts={"step": "5s", "connect": "2s"})
    # h1 passes milestone 1, then its link goes down while waves 2 and 3 run: the only thing
    # left to do on it is the final prune and read-back
    stop = threading.Event()

    def cut_h1_when_wave_two_switches() -> None:
        while not stop.is_set():
            if (fleet.root_dir("h2") / "current").is_symlink():
                fleet.fault("h1", "down")
                return
            time.sleep(0.02)

    cutter = threading.Thread(target=cut_h1_when_wave_two_switches)
    cutter.start()
    try:
        res = deploy(run_ferry, p, "shop@1.0", rfc_id)
    finally:
        stop.set()
        cutter.join()
        fleet.fault("h1", "up")
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.json()
    assert out["status"] == "succeeded"
    assert all(m["passed"] for m in out["milestones"]) and len(out["milestones"]) == 3
    assert out["backout"] == []
    assert out["needs_remediation"] == ["h1"]
    assert "warning: h1: not read back" in res.stderr
    assert all(host_release(fleet, h) == rid("shop@1.0") for h in fleet.hosts)
    rows = cms(lambda s: {b.host: b.release for b in s.scalars(select(HostBaseline))})
    assert rows == {h: "shop@1.0" for h in fleet.hosts}
    assert cms(lambda s: s.get(RFC, int(rfc_id)).status) == "implemented"
    status = run_ferry("status", "-o", "json").json()
    flagged = [n for n in status["needs_remediation"] if n["host"] == "h1"]
    assert flagged and flagged[0]["next"].startswith("ferry remediate drift")


BUG = """
import sys
import orchestrator.deployment as engine
real = engine.milestone_verdict
def buggy(index, *args, **kw):
    if index == 2:
        raise RuntimeError("a bug in the milestone code")
    return real(index, *args, **kw)
engine.milestone_verdict = buggy
from orchestrator.cli.main import main
main(sys.argv[1:])
"""


def test_an_unexpected_error_backs_out_then_exits_1_with_a_crash_log(clean_small, run_ferry):
    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    rfc_id = rfc(run_ferry, "shop@1.0")
    args = ["deploy", str(plan(work, fleet)), "-r", "shop@1.0", "--rfc", rfc_id, "-o", "json"]
    proc = subprocess.run(
        [sys.executable, "-c", BUG, *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    assert out["status"] == "aborted"
    assert "RuntimeError: a bug in the milestone code" in out["reason"]
    log = Path(out["crash_log"])
    assert log.is_file() and "RuntimeError" in log.read_text() and "Traceback" in log.read_text()
    assert str(log) in proc.stderr and "Traceback" not in proc.stderr
    # backed out first: waves 1 and 2 switched and are reverted (they had no prior)
    assert all(host_release(fleet, h) is None for h in fleet.hosts)
    assert {r["host"] for r in out["backout"]} == {"h1", "h2", "h3"}
    assert all(r["restored"] for r in out["backout"])
    waves = cms(lambda s: {w.index: w.status for w in s.scalars(select(Wave))})
    assert waves == {1: "passed", 2: "interrupted", 3: "pending"}
    assert cms(lambda s: s.get(RFC, int(rfc_id)).status) == "failed"
    assert run_ferry("status", "-o", "json").json()["deployments"][0]["status"] == "aborted"


def test_remediation_runs_the_recorded_rollout_not_an_edited_plan_or_another_inventory(
    clean_small, run_ferry
):
    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    build(work, "2.0")
    p = plan(work, fleet)
    assert deploy(run_ferry, p, "shop@1.0", rfc(run_ferry, "shop@1.0")).returncode == 0
    res = deploy(run_ferry, p, "shop@2.0", rfc(run_ferry, "shop@2.0"))
    assert res.returncode == 0, res.stderr
    v2 = res.json()["id"]
    # after the deploy: the plan is edited, and FERRY_INVENTORY names other machines
    doc = yaml.safe_load(p.read_text())
    doc["hooks"]["restore"] = "touch {{ shared }}/edited-restore-ran"
    doc["inventory"] = str(work / "elsewhere.yaml")
    p.write_text(yaml.safe_dump(doc))
    other = yaml.safe_load(fleet.inventory_path.read_text())
    other["hosts"] = {h: {"address": "198.18.254.254"} for h in other["hosts"]}
    (work / "elsewhere.yaml").write_text(yaml.safe_dump(other))
    env = {"FERRY_INVENTORY": str(work / "elsewhere.yaml")}
    back_rfc = rfc(run_ferry, "shop@1.0")
    res = run_ferry("remediate", "backout", str(v2), "--rfc", back_rfc, "-o", "json", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "changed since deployment" in res.stderr
    for host in fleet.hosts:
        assert host_release(fleet, host) == rid("shop@1.0")
        assert shared_file(fleet, host, "data/schema") == "1.0"  # the recorded restore ran
        assert shared_file(fleet, host, "edited-restore-ran") is None


def test_deploy_release_runs_from_its_deployment_id_in_a_fresh_process(clean_small, run_ferry):
    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    rfc_id = rfc(run_ferry, "shop@1.0")
    from orchestrator.preparation import DeployRequest, open_deployment, prepare
    from orchestrator.settings import get_settings

    settings = get_settings()
    request = DeployRequest(plan(work, fleet), "shop@1.0", rfc_id, settings.actor)
    record = open_deployment(prepare(request, settings), settings)
    assert cms(lambda s: s.get(Deployment, record.id).status) == "planned"
    code = (
        "import sys\n"
        "from orchestrator.prefect_env import configure_prefect\n"
        "configure_prefect()\n"
        "import asyncio\n"
        "from orchestrator.flows import deploy_release\n"
        "print(asyncio.run(deploy_release(deployment_id=int(sys.argv[1]))))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(record.id)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ},
        cwd=os.getcwd(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "succeeded"
    assert all(host_release(fleet, h) == rid("shop@1.0") for h in fleet.hosts)
    dep = cms(lambda s: s.get(Deployment, record.id))
    assert dep.status == "succeeded" and dep.evidence["runner"]["pid"] != os.getpid()
    steps = cms(lambda s: list(s.scalars(select(HostStep))))
    assert {r.host for r in steps} == set(fleet.hosts)
    assert all(r.status == "succeeded" for r in steps)
