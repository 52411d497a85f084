"""On-call remediation against the real fleet: status, manual backout, crash recovery, drift."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from dml.store import DML
from orchestrator.cms.models import RFC, Deployment, EnvironmentBaseline, HostBaseline, HostStep
from orchestrator.planner import release_id
from tests.conftest import FERRY_BIN
from tests.deploy.helpers import (
    BROKEN_CHECK,
    build,
    cms,
    deploy,
    host_release,
    plan,
    rfc,
    rid,
    shared_file,
)

pytestmark = pytest.mark.fleet


@pytest.fixture
def clean_small(small_fleet, prefect_api, ferry_home):
    small_fleet.wipe()
    yield small_fleet
    small_fleet.wipe()


def _deploy(run_ferry, fleet, work, version: str) -> dict:
    build(work, version)
    release = f"shop@{version}"
    res = deploy(run_ferry, plan(work, fleet), release, rfc(run_ferry, release))
    assert res.returncode == 0, res.stdout + res.stderr
    return res.json()


def _status(run_ferry, *args: str) -> dict:
    res = run_ferry("status", *args, "-o", "json")
    assert res.returncode == 0, res.stderr
    return res.json()


def _on_release(fleet, release: str) -> list[str]:
    """Hosts whose `current` is `release` with every file matching its DML manifest."""
    pkg = DML.from_settings().open(release)  # opened once: it verifies the whole package
    rid_ = release_id(release, pkg.digest)
    good = []
    for host in fleet.hosts:
        base = fleet.root_dir(host) / "releases" / rid_
        if host_release(fleet, host) == rid_ and all(
            (base / f.path).is_file()
            and hashlib.sha256((base / f.path).read_bytes()).hexdigest() == f.sha256
            for f in pkg.files
        ):
            good.append(host)
    return good


def _deployment(data: dict, did: int) -> dict:
    return next(d for d in data["deployments"] if d["id"] == did)


def test_manual_backout_of_a_succeeded_deployment_returns_every_host_to_its_prior(
    clean_small, run_ferry
):
    fleet, work = clean_small, Path.cwd()
    _deploy(run_ferry, fleet, work, "1.0")
    _deploy(run_ferry, fleet, work, "2.0")

    # status after a success: baselines, the deployment, nothing to remediate
    st = _status(run_ferry)
    assert st["environments"][0]["release"] == "shop@2.0"
    assert {h["release"] for h in st["hosts"]} == {"shop@2.0"} and len(st["hosts"]) == 12
    assert _deployment(st, 2)["status"] == "succeeded" and _deployment(st, 2)["rfc"] == "RFC-2"
    assert st["needs_remediation"] == []

    # the backout is a change: an RFC for the bad release does not authorize it
    res = run_ferry("remediate", "backout", "2", "--rfc", "2", "-o", "json")
    assert res.returncode == 3, res.stdout + res.stderr
    assert "shop@1.0" in res.stderr
    assert _on_release(fleet, "shop@2.0") == fleet.hosts, "nothing was touched"

    res = run_ferry("remediate", "backout", "2", "--rfc", rfc(run_ferry, "shop@1.0"), "-o", "json")
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.json()
    assert out["status"] == "succeeded" and out["backs_out"] == 2
    assert out["needs_remediation"] == []
    assert _on_release(fleet, "shop@1.0") == fleet.hosts
    for host in fleet.hosts:
        assert out["hosts"][host]["verdict"] == "back-out"
        assert shared_file(fleet, host, "data/schema") == "1.0", "restore hook ran"
    backout_id = out["id"]
    rows = cms(
        lambda s: {b.host: (b.release, b.deployment_id) for b in s.scalars(select(HostBaseline))}
    )
    assert rows == {h: ("shop@1.0", backout_id) for h in fleet.hosts}
    assert cms(lambda s: s.get(EnvironmentBaseline, "dev").release) == "shop@1.0"
    original = cms(lambda s: s.get(Deployment, 2))
    assert original.status == "backed-out"
    assert original.evidence["manual_backout"]["deployment"] == backout_id
    assert original.evidence["manual_backout"]["status_before"] == "succeeded"
    steps = cms(
        lambda s: {
            (r.host, r.step, r.status)
            for r in s.scalars(select(HostStep).where(HostStep.deployment_id == backout_id))
        }
    )
    assert ("h7", "revert", "succeeded") in steps and ("h7", "restore", "succeeded") in steps

    # status after the backout
    st = _status(run_ferry)
    assert _deployment(st, 2)["status"] == "backed-out"
    assert "backed out by hand" in _deployment(st, 2)["reason"]
    assert _deployment(st, backout_id)["strategy"] == "backout"
    assert {h["release"] for h in st["hosts"]} == {"shop@1.0"}
    assert st["needs_remediation"] == []

    # repeating it changes nothing: not the hosts, and no new record or RFC move
    records = cms(lambda s: s.scalar(select(func.count()).select_from(Deployment)))
    again = run_ferry("remediate", "backout", "2", "--rfc", "3", "-o", "json")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.json()["status"] == "already-backed-out" and again.json()["hosts"] == {}
    assert "already backed out" in again.stderr
    assert cms(lambda s: s.scalar(select(func.count()).select_from(Deployment))) == records
    assert cms(lambda s: s.get(Deployment, 2)).evidence["manual_backout"]["deployment"] == (
        backout_id
    )

    # once a later deployment succeeded on the hosts, backing out an earlier one is refused
    # before anything is recorded (it would put them under the later release to its prior)
    third = _deploy(run_ferry, fleet, work, "3.0")["id"]
    res = run_ferry("remediate", "backout", "1", "--rfc", rfc(run_ferry, "shop@1.0"))
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"run shop@3.0 from deployment {third}" in res.stderr
    assert f"ferry remediate backout {third}" in res.stderr
    assert _on_release(fleet, "shop@3.0") == fleet.hosts


def test_recover_after_sigkill_mid_wave_backs_out_every_touched_host_and_is_idempotent(
    clean_small, run_ferry
):
    fleet, work = clean_small, Path.cwd()
    _deploy(run_ferry, fleet, work, "1.0")
    build(work, "2.0")
    rfc_id = rfc(run_ferry, "shop@2.0")
    slow = plan(
        work,
        fleet,
        milestone={"max_failed": 0, "deadline": "120s", "soak": "3s", "checks": [BROKEN_CHECK]},
    )
    proc = subprocess.Popen(
        [str(FERRY_BIN), "deploy", str(slow), "--release", "shop@2.0", "--rfc", rfc_id],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            activated = cms(
                lambda s: s.scalar(
                    select(func.count()).where(
                        HostStep.deployment_id == 2,
                        HostStep.step == "activate",
                        HostStep.status == "succeeded",
                    )
                )
            )
            if activated:
                break
            time.sleep(0.1)
        else:
            pytest.fail("no host activated shop@2.0")
    finally:
        proc.kill()
        proc.wait()
    touched = cms(
        lambda s: set(s.scalars(select(HostStep.host).where(HostStep.deployment_id == 2)))
    )
    assert any(host_release(fleet, h) == rid("shop@2.0") for h in touched)

    st = _status(run_ferry)
    assert _deployment(st, 2)["status"] == "running"
    assert _deployment(st, 2)["liveness"] == "interrupted"
    flagged = {n["host"] for n in st["needs_remediation"] if n["deployment"] == 2}
    assert flagged == touched
    assert all(n["next"] == "ferry remediate recover 2" for n in st["needs_remediation"])

    res = run_ferry("remediate", "recover", "2", "-o", "json")
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.json()
    assert out["status"] == "backed-out" and out["status_before"] == "running"
    assert set(out["hosts"]) == touched
    assert _on_release(fleet, "shop@1.0") == fleet.hosts
    for host in fleet.hosts:
        assert shared_file(fleet, host, "data/schema") == "1.0", host
    dep = cms(lambda s: s.get(Deployment, 2))
    assert dep.status == "backed-out" and dep.finished_at is not None
    assert dep.evidence["recovered"]["by"] == "alice"
    assert cms(lambda s: s.get(RFC, int(rfc_id)).status) == "backed-out"
    assert {b for b in cms(lambda s: list(s.scalars(select(HostBaseline.release))))} == {"shop@1.0"}

    journal_rows = cms(lambda s: s.scalar(select(func.count()).select_from(HostStep)))
    again = run_ferry("remediate", "recover", "2", "-o", "json")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.json()["action"] == "already-finished"
    assert "already finished" in again.stderr
    assert cms(lambda s: s.scalar(select(func.count()).select_from(HostStep))) == journal_rows
    assert _status(run_ferry)["needs_remediation"] == []


def test_drift_audit_finds_a_hand_flipped_host_a_modified_file_and_unreachable_hosts(
    clean_small, run_ferry
):
    fleet, work = clean_small, Path.cwd()
    _deploy(run_ferry, fleet, work, "1.0")
    res = run_ferry("remediate", "drift", "--inventory", str(fleet.inventory_path), "-o", "json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert {h["state"] for h in res.json()["hosts"].values()} == {"ok"}

    good = rid("shop@1.0")
    # h5: someone switched `current` by hand to a copy they made
    root5 = fleet.root_dir("h5")
    subprocess.run(["cp", "-a", str(root5 / "releases" / good), str(root5 / "releases" / "hotfix")])
    os.symlink("releases/hotfix", root5 / "current.tmp")
    os.replace(root5 / "current.tmp", root5 / "current")
    # h7: a file edited in place, same size (only a re-hash can tell)
    version = fleet.root_dir("h7") / "releases" / good / "app" / "VERSION"
    version.write_text("1.1\n")
    # h12: a host the CMS has no baseline for
    cms(lambda s: s.delete(s.get(HostBaseline, "h12")))

    quick = run_ferry("remediate", "drift", "--env", "dev", "-o", "json")  # plan's inventory
    assert quick.returncode == 5, quick.stdout + quick.stderr
    hosts = quick.json()["hosts"]
    assert hosts["h5"]["state"] == "drifted" and hosts["h5"]["current"] == "hotfix"
    assert hosts["h7"]["state"] == "ok", "a same-size edit passes the quick read-back"
    assert hosts["h12"]["state"] == "unmanaged"

    with fleet.faulted("h9", "kill"):
        full = run_ferry("remediate", "drift", "--full", "-o", "json")
    assert full.returncode == 6, full.stdout + full.stderr
    data = full.json()
    states = {h: d["state"] for h, d in data["hosts"].items()}
    assert states["h7"] == "tampered" and "app/VERSION" in data["hosts"]["h7"]["detail"]
    assert states["h5"] == "drifted" and states["h9"] == "unreachable"
    assert states["h12"] == "unmanaged"
    assert {h for h, s in states.items() if s == "ok"} == set(fleet.hosts) - {
        "h5", "h7", "h9", "h12"
    }  # fmt: skip
    assert data["counts"] == {
        "ok": 8, "drifted": 1, "tampered": 1, "unreachable": 1, "unmanaged": 1
    }  # fmt: skip
    assert "h7: tampered" in full.stderr
    # each host not ok says what to do next (JSON here; the text adds a `next:` line)
    assert "deploy the baseline again" in data["hosts"]["h7"]["next"]
    assert "--release shop@1.0" in data["hosts"]["h5"]["next"]
    assert data["hosts"]["h1"]["next"] is None
    # the audit itself changed nothing
    assert version.read_text() == "1.1\n" and host_release(fleet, "h5") == "hotfix"

    # `ferry status` names what the newest audit of each host found, with its next step…
    needs = {n["host"]: n for n in _status(run_ferry)["needs_remediation"]}
    assert {h: n["state"] for h, n in needs.items()} == {
        "h5": "drifted", "h7": "tampered", "h9": "unreachable"
    }  # fmt: skip
    assert "deploy the baseline again" in needs["h7"]["next"]
    assert "h7: tampered (drift audit " in run_ferry("status").stdout
    # …until a deployment records those hosts again (the baseline, deployed anew)
    res = deploy(run_ferry, plan(work, fleet), "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert _status(run_ferry)["needs_remediation"] == []
    assert version.read_text() == "1.0\n" and host_release(fleet, "h5") == good
