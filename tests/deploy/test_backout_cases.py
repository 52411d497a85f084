"""Backout lessons from the field: uneven fleets, broken old hooks, tolerated failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.helpers import BROKEN_CHECK, HOOKS, build, deploy, host_release, plan, rfc, rid

pytestmark = pytest.mark.fleet


def test_each_host_backs_out_to_its_own_prior_baseline_on_an_uneven_fleet(clean_small, run_ferry):
    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    build(work, "1.1")
    build(work, "2.0")
    assert (
        deploy(run_ferry, plan(work, fleet), "shop@1.0", rfc(run_ferry, "shop@1.0")).returncode == 0
    )
    # only h1..h3 move on to 1.1: the fleet is now uneven
    some = plan(work, fleet, name="some.yaml", targets="h1,h2,h3")
    assert deploy(run_ferry, some, "shop@1.1", rfc(run_ferry, "shop@1.1")).returncode == 0
    (fleet.root_dir("h5") / "shared" / "broken-2.0").write_text("x")
    # waves 1 (h1), 3 total (h2, h3), 6 total (h4..h6): h5 fails in wave 3
    p = plan(work, fleet, name="v2.yaml", waves=[1, 3, 6, "100%"])
    res = deploy(run_ferry, p, "shop@2.0", rfc(run_ferry, "shop@2.0"))
    assert res.returncode == 4, res.stdout + res.stderr
    out = res.json()
    for host in ["h1", "h2", "h3"]:
        assert host_release(fleet, host) == rid("shop@1.1"), host
        assert out["hosts"][host]["release"] == "shop@1.1"
    for host in ["h4", "h5", "h6"]:
        assert host_release(fleet, host) == rid("shop@1.0"), host
        assert out["hosts"][host]["release"] == "shop@1.0"
    for host in [f"h{i}" for i in range(7, 13)]:
        assert out["hosts"][host]["status"] == "untouched"


def test_a_failing_hook_of_the_old_release_is_reported_but_cannot_trap_the_fleet(
    clean_small, run_ferry
):
    fleet, work = clean_small, Path.cwd()
    hooks = dict(HOOKS, activate="test ! -e {{ shared }}/activate-broken-{{ version }}")
    p = plan(work, fleet, hooks=hooks, targets="h1,h2,h3,h4")
    build(work, "1.0")
    assert deploy(run_ferry, p, "shop@1.0", rfc(run_ferry, "shop@1.0")).returncode == 0
    build(work, "2.0")
    for host in ["h1", "h2"]:
        # the OLD release's activate hook is broken now, and 2.0 fails on h2
        (fleet.root_dir(host) / "shared" / "activate-broken-1.0").write_text("x")
    (fleet.root_dir("h2") / "shared" / "broken-2.0").write_text("x")
    res = deploy(run_ferry, p, "shop@2.0", rfc(run_ferry, "shop@2.0"))
    assert res.returncode == 4, res.stdout + res.stderr
    out = res.json()
    restored = {r["host"]: r for r in out["backout"]}
    assert set(restored) == {"h1", "h2", "h3"}  # waves 1 and 2
    for host in ["h1", "h2", "h3"]:
        assert restored[host]["restored"] is True
        assert host_release(fleet, host) == rid("shop@1.0")
    for host in ["h1", "h2"]:
        assert any("reactivate" in w for w in restored[host]["warnings"])
    assert restored["h3"]["warnings"] == []


def test_failures_within_the_tolerance_pass_and_only_the_failed_host_is_backed_out(
    clean_small, run_ferry
):
    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    assert (
        deploy(run_ferry, plan(work, fleet), "shop@1.0", rfc(run_ferry, "shop@1.0")).returncode == 0
    )
    build(work, "2.0")
    (fleet.root_dir("h7") / "shared" / "broken-2.0").write_text("x")
    checks = [BROKEN_CHECK, {"tcp": 22, "address": "{{ address }}"}]
    tolerant = {"max_failed": 1, "deadline": "120s", "soak": "0s", "checks": checks}
    p = plan(work, fleet, name="tolerant.yaml", milestone=tolerant)
    res = deploy(run_ferry, p, "shop@2.0", rfc(run_ferry, "shop@2.0"))
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.json()
    assert out["status"] == "succeeded"
    assert out["milestones"][-1]["failed"] == ["h7"]
    assert [r["host"] for r in out["backout"]] == ["h7"]
    assert host_release(fleet, "h7") == rid("shop@1.0")
    assert out["hosts"]["h7"]["release"] == "shop@1.0"
    others = [h for h in fleet.hosts if h != "h7"]
    assert {host_release(fleet, h) for h in others} == {rid("shop@2.0")}
