"""Push deployments against the real SSH fleet: phased, backout, faults, gate, integrity."""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from dml.store import DML
from orchestrator.cms.models import RFC, Deployment, HostBaseline, HostStep, Wave
from tests.conftest import FERRY_BIN
from tests.deploy.helpers import (
    BROKEN_CHECK,
    build,
    cms,
    deploy,
    files_match,
    host_release,
    inventory_variant,
    plan,
    rfc,
    rid,
    shared_file,
)

pytestmark = pytest.mark.fleet

WAVE_1, WAVE_2 = ["h1"], ["h2", "h3"]
WAVE_3 = [f"h{i}" for i in range(4, 13)]


def _deploy_v1(run_ferry, fleet, work):
    build(work, "1.0")
    res = deploy(run_ferry, plan(work, fleet), "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert res.returncode == 0, res.stderr
    return res.json()


def test_phased_push_to_12_hosts_in_waves_succeeds_and_records_baselines(clean_small, run_ferry):
    fleet, work = clean_small, Path.cwd()
    out = _deploy_v1(run_ferry, fleet, work)
    assert out["status"] == "succeeded"
    assert out["waves"] == [WAVE_1, WAVE_2, WAVE_3]
    expected = rid("shop@1.0")
    for host in fleet.hosts:
        assert out["hosts"][host]["release"] == "shop@1.0"
        assert host_release(fleet, host) == expected
        assert files_match(fleet, host, "shop@1.0"), host
        assert shared_file(fleet, host, "data/schema") == "1.0"
    rows = cms(lambda s: {b.host: b.release for b in s.scalars(select(HostBaseline))})
    assert rows == {h: "shop@1.0" for h in fleet.hosts}
    assert cms(lambda s: s.get(RFC, 1).status) == "implemented"
    # every step of every host was journaled, each with an end
    steps = cms(lambda s: list(s.scalars(select(HostStep))))
    assert {r.host for r in steps} == set(fleet.hosts)
    assert all(r.status == "succeeded" and r.finished_at for r in steps)


def test_health_check_failing_in_wave_two_backs_out_waves_one_and_two(clean_small, run_ferry):
    fleet, work = clean_small, Path.cwd()
    _deploy_v1(run_ferry, fleet, work)
    build(work, "2.0")
    (fleet.root_dir("h3") / "shared" / "broken-2.0").write_text("x")
    res = deploy(run_ferry, plan(work, fleet), "shop@2.0", rfc(run_ferry, "shop@2.0"))
    assert res.returncode == 4, res.stdout + res.stderr
    out = res.json()
    assert out["status"] == "backed-out"
    prior = rid("shop@1.0")
    for host in WAVE_1 + WAVE_2:
        assert out["hosts"][host]["status"] == "backed-out"
        assert host_release(fleet, host) == prior
        assert files_match(fleet, host, "shop@1.0")
        # data restored by the plan's restore hook (v2's install had rewritten it)
        assert shared_file(fleet, host, "data/schema") == "1.0"
    for host in WAVE_3:
        assert out["hosts"][host]["status"] == "untouched"
        assert host_release(fleet, host) == prior
    touched = cms(
        lambda s: {r.host for r in s.scalars(select(HostStep).where(HostStep.deployment_id == 2))}
    )
    assert touched == set(WAVE_1 + WAVE_2), "wave 3 was never touched"
    dep = cms(lambda s: s.get(Deployment, 2))
    assert dep.status == "backed-out"
    evidence = dep.evidence["failed_milestone"]
    assert evidence["wave"] == 2 and evidence["failed"] == ["h3"]
    assert (
        "broken-{{ version }}" in evidence["evidence"][0]["reason"]
        or evidence["evidence"][0]["output"]
    )
    assert cms(lambda s: s.get(RFC, 2).status) == "backed-out"
    # the baseline stays the prior one
    rows = cms(lambda s: {b.host: b.release for b in s.scalars(select(HostBaseline))})
    assert set(rows.values()) == {"shop@1.0"}


def test_host_going_down_mid_wave_counts_as_failed_and_the_wave_backs_out(
    clean_small, run_ferry, ferry_home
):
    fleet, work = clean_small, Path.cwd()
    _deploy_v1(run_ferry, fleet, work)
    build(work, "2.0")
    rfc_id = rfc(run_ferry, "shop@2.0")
    # a soak on every wave gives the test time to cut h3's link while wave 2 runs
    p = plan(
        work,
        fleet,
        milestone={"max_failed": 0, "deadline": "120s", "soak": "3s", "checks": [BROKEN_CHECK]},
    )
    proc = subprocess.Popen(
        [str(FERRY_BIN), "deploy", str(p), "--release", "shop@2.0", "--rfc", rfc_id, "-o", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            status = cms(
                lambda s: s.scalar(
                    select(Wave.status).where(Wave.deployment_id == 2, Wave.index == 2)
                )
            )
            if status == "running":
                break
            time.sleep(0.2)
        else:
            pytest.fail("wave 2 never started")
        with fleet.faulted("h3", "down"):
            stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (4, 5), stdout + stderr
    out = json.loads(stdout)
    assert "h3" in out["milestones"][-1]["failed"]
    # h3 was unreachable during the backout. Where its link was cut decides what can be said:
    if out["hosts"]["h3"]["status"] == "needs-remediation":
        # inside one of its steps (its session died mid-step): its state is unknown, so the
        # backout is not called complete, h3 is named, exit 5
        assert proc.returncode == 5 and out["status"] == "failed", stdout
        why = out["hosts"]["h3"]["failure"]["reason"]
        # said beside the host's name, which it does not repeat ("h3 at milestone: unreachable: …")
        assert why and not why.startswith("h3"), stdout
    else:  # before or after its steps: it never switched, or it was put back; exit 4
        assert proc.returncode == 4 and out["status"] == "backed-out", stdout
        assert out["hosts"]["h3"]["status"] in ("backed-out", "failed"), stdout
    prior = rid("shop@1.0")
    for host in ["h1", "h2"]:
        assert host_release(fleet, host) == prior
    for host in WAVE_3:
        assert host_release(fleet, host) == prior


def test_disk_full_on_one_host_fails_its_wave_and_backs_out(clean_small, run_ferry):
    fleet, work = clean_small, Path.cwd()
    _deploy_v1(run_ferry, fleet, work)
    build(work, "2.0")
    with fleet.faulted("h2", "disk_full"):
        res = deploy(run_ferry, plan(work, fleet), "shop@2.0", rfc(run_ferry, "shop@2.0"))
    assert res.returncode == 4, res.stdout + res.stderr
    out = res.json()
    assert out["milestones"][-1]["wave"] == 2 and out["milestones"][-1]["failed"] == ["h2"]
    prior = rid("shop@1.0")
    for host in fleet.hosts:
        assert host_release(fleet, host) == prior, host


def test_a_disk_that_fills_in_the_middle_of_a_transfer_is_reported_as_full(clean_small, run_ferry):
    """The agent refuses, answers and ends while Ferry is still sending: the failure is its
    answer (disk-full), not the broken pipe the sender is left with."""
    fleet, work = clean_small, Path.cwd()
    build(work, "1.0", extra={"blob.bin": os.urandom(24 << 20)})  # far more than the pipes hold
    with fleet.faulted("h1", "disk_full", size_mib=4, fill=False):  # wave 1's host
        res = deploy(run_ferry, plan(work, fleet), "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert res.returncode == 4, res.stdout + res.stderr
    failure = res.json()["hosts"]["h1"]["failure"]
    assert failure["kind"] == "disk-full" and failure["step"] == "stage", failure
    assert "No space left on device" in failure["reason"] and "Broken pipe" not in failure["reason"]
    assert all(host_release(fleet, h) is None for h in fleet.hosts)


def test_without_an_authorizing_rfc_nothing_reaches_any_host(clean_small, run_ferry):
    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    p = plan(work, fleet)
    res = deploy(run_ferry, p, "shop@1.0", None)
    assert res.returncode == 3, res.stderr
    assert res.json()["status"] == "refused"
    # an RFC for another release, and one whose window has passed
    other = rfc(run_ferry, "shop@9.9")
    assert deploy(run_ferry, p, "shop@1.0", other).returncode == 3
    start = datetime.now(UTC) + timedelta(days=1)
    window = f"{start:%Y-%m-%dT%H:%M}/{start + timedelta(hours=1):%Y-%m-%dT%H:%M}"
    later = rfc(run_ferry, "shop@1.0", "dev", "--window", window)
    res = deploy(run_ferry, p, "shop@1.0", later)
    assert res.returncode == 3, res.stdout + res.stderr
    assert "window" in res.stderr
    for host in fleet.hosts:
        assert list(fleet.root_dir(host).iterdir()) == [], f"{host} was touched"


def test_tampered_package_is_refused_before_any_host_changes(clean_small, run_ferry):
    fleet, work = clean_small, Path.cwd()
    built = build(work, "1.0")
    blob = DML.from_settings().blob_path(built["archive_digest"])
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    res = deploy(run_ferry, plan(work, fleet), "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert res.returncode == 6, res.stdout + res.stderr
    assert (
        built["archive_digest"].removeprefix("sha256:")[:12] in res.stderr
        or "archive" in res.stderr
    )
    for host in fleet.hosts:
        assert list(fleet.root_dir(host).iterdir()) == [], f"{host} was touched"


def test_second_deploy_of_the_same_release_transfers_no_package_bytes(clean_small, run_ferry):
    fleet, work = clean_small, Path.cwd()
    first = _deploy_v1(run_ferry, fleet, work)
    assert first["bytes_sent"] > 0
    again = deploy(run_ferry, plan(work, fleet), "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert again.returncode == 0, again.stderr
    assert again.json()["bytes_sent"] == 0
    assert all(host_release(fleet, h) == rid("shop@1.0") for h in fleet.hosts)


def test_the_paramiko_transfer_path_deploys_the_same_files(clean_small, run_ferry):
    fleet, work = clean_small, Path.cwd()
    inventory = inventory_variant(fleet, work, "inv-paramiko.yaml", bulk="paramiko")
    build(work, "1.0")
    p = plan(work, fleet, inventory=str(inventory), targets="h1,h2,h3")
    res = deploy(run_ferry, p, "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert res.returncode == 0, res.stderr
    assert res.json()["bytes_sent"] > 0
    for host in ["h1", "h2", "h3"]:
        assert files_match(fleet, host, "shop@1.0")


def test_a_host_whose_key_is_not_the_known_one_is_refused_and_never_written(clean_small, run_ferry):
    fleet, work = clean_small, Path.cwd()
    # known_hosts where h1's address carries h2's host key: a man in the middle, as SSH sees it
    lines = [ln.split(None, 1) for ln in fleet.known_hosts_path.read_text().splitlines() if ln]
    h2_key = next(key for names, key in lines if fleet.address("h2") in names.split(","))
    forged = work / "known_hosts.forged"
    forged.write_text(
        "".join(
            f"{names} {h2_key if fleet.address('h1') in names.split(',') else key}\n"
            for names, key in lines
        )
    )
    inventory = inventory_variant(fleet, work, "inv-forged.yaml", known_hosts=str(forged))
    build(work, "1.0")
    p = plan(work, fleet, inventory=str(inventory), targets="h1,h2")
    res = deploy(run_ferry, p, "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert res.returncode == 4, res.stdout + res.stderr
    failure = res.json()["hosts"]["h1"]["failure"]
    assert "host key" in failure["reason"]
    assert list(fleet.root_dir("h1").iterdir()) == []


def test_a_hung_host_times_out_counts_as_failed_and_never_hangs_the_rollout(clean_small, run_ferry):
    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    p = plan(work, fleet, targets="h1,h2", waves=[1, "100%"])
    with fleet.faulted("h2", "hang"):  # sshd stopped: TCP connects, no banner ever comes
        started = time.monotonic()
        res = deploy(run_ferry, p, "shop@1.0", rfc(run_ferry, "shop@1.0"))
        took = time.monotonic() - started
    assert res.returncode == 4, res.stdout + res.stderr
    out = res.json()
    assert out["milestones"][-1]["failed"] == ["h2"]
    assert out["hosts"]["h1"]["status"] == "backed-out"
    assert host_release(fleet, "h1") is None  # no prior baseline: current removed
    assert took < 60, f"the rollout took {took:.0f}s with a 3s connect timeout"


def test_a_release_altered_on_a_host_is_staged_afresh_when_deployed_again(clean_small, run_ferry):
    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    p = plan(work, fleet, targets="h1,h2", waves=[1, "100%"])
    first = deploy(run_ferry, p, "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert first.returncode == 0
    version = fleet.root_dir("h1") / "releases" / rid("shop@1.0") / "app" / "VERSION"
    version.write_text("6.6\n")  # same size, other bytes
    res = deploy(run_ferry, p, "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert res.returncode == 0, res.stdout + res.stderr
    # the altered copy is never a source again: h1 gets the release anew, h2 nothing
    assert res.json()["bytes_sent"] == first.json()["bytes_sent"] // 2
    assert files_match(fleet, "h1", "shop@1.0") and files_match(fleet, "h2", "shop@1.0")


def test_a_file_edited_in_place_in_the_live_release_and_a_kept_one_is_sent_again(
    clean_small, run_ferry
):
    """An unchanged file is one inode in every release that has it: edited in place on the
    host, it is altered in the live release and in a kept one alike. Deploying the live
    release again sets it aside (the service keeps running it meanwhile), asks for the
    object again rather than taking the kept release's altered copy, and ends live and clean."""
    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    build(work, "2.0")
    p = plan(work, fleet, targets="h1")
    for version in ("1.0", "2.0", "1.0"):  # 1.0 live, 2.0 kept
        release = f"shop@{version}"
        assert deploy(run_ferry, p, release, rfc(run_ferry, release)).returncode == 0
    releases = fleet.root_dir("h1") / "releases"
    live, kept = (releases / rid(r) / "app" / "health.ok" for r in ("shop@1.0", "shop@2.0"))
    assert live.stat().st_ino == kept.stat().st_ino
    with open(live, "r+b") as f:  # in place: the inode both releases share
        f.write(b"ko")
    res = deploy(run_ferry, p, "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.json()["bytes_sent"] > 0  # sent, not linked from 2.0's altered copy
    assert host_release(fleet, "h1") == rid("shop@1.0") and files_match(fleet, "h1", "shop@1.0")
    assert [p.name for p in releases.glob(".broken-*")], "the altered copy is kept aside"


def test_a_window_closing_mid_rollout_stops_at_the_next_wave_boundary(clean_small, run_ferry):
    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    # the RFC's own window closes while wave 1 soaks; wave 2 must not start
    start = datetime.now(UTC) - timedelta(minutes=1)
    end = datetime.now(UTC) + timedelta(seconds=25)
    window = f"{start:%Y-%m-%dT%H:%M:%S}/{end:%Y-%m-%dT%H:%M:%S}"
    rfc_id = rfc(run_ferry, "shop@1.0", "dev", "--window", window)
    milestone = {"max_failed": 0, "deadline": "120s", "soak": "30s", "checks": [BROKEN_CHECK]}
    p = plan(work, fleet, milestone=milestone)
    res = deploy(run_ferry, p, "shop@1.0", rfc_id)
    assert res.returncode == 3, res.stdout + res.stderr
    out = res.json()
    assert out["status"] == "halted"
    assert out["halted_before_wave"] == 2
    assert "window" in res.stderr
    # the change did not complete within its authorization: the RFC moves on (a new RFC
    # continues it), it does not stay `implementing`
    assert cms(lambda s: s.get(RFC, int(rfc_id)).status) == "failed"
    assert host_release(fleet, "h1") == rid("shop@1.0")  # wave 1 passed its milestone: kept
    assert out["hosts"]["h1"]["status"] == "deployed"
    for host in WAVE_2 + WAVE_3:
        assert list(fleet.root_dir(host).iterdir()) == [], f"{host} was touched"
    rows = cms(lambda s: {b.host: b.release for b in s.scalars(select(HostBaseline))})
    assert rows == {"h1": "shop@1.0"}
