"""Pull deployment end to end (issue 12): agents pull signed releases from `ferry dml
serve`; waves are gated by the agents' own reports; backout is desired state too."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from dml.store import DML
from tests.deploy.helpers import (
    BROKEN_CHECK,
    HOOKS,
    build,
    deploy,
    files_match,
    host_release,
    rfc,
    rid,
)  # fmt: skip

HOSTS = [f"h{i}" for i in range(1, 13)]
SIX = HOSTS[:6]


def pull_plan(work: Path, fleet, server, name: str = "plan.yaml", **fields) -> Path:  # type: ignore[no-untyped-def]
    doc = {
        "environment": "dev",
        "inventory": str(fleet.inventory_path),
        "targets": "all",
        "strategy": "phased",
        "waves": [1, 3, "100%"],
        "method": "pull",
        "pull": {"server": server.url, "poll": "5s", "heartbeat": "2s"},
        "hooks": dict(HOOKS),
        "milestone": {"max_failed": 0, "deadline": "60s", "checks": [BROKEN_CHECK]},
        "timeouts": {"step": "30s", "connect": "3s"},
    }
    doc.update(fields)
    path = work / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def install(run_ferry, plan_path: Path) -> None:  # type: ignore[no-untyped-def]
    res = run_ferry("agent", "install", "--plan", str(plan_path), "-o", "json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert all(r["installed"] for r in res.json()["installed"])


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.5)


def agent_status(run_ferry) -> dict[str, dict]:  # type: ignore[no-untyped-def,type-arg]
    res = run_ferry("agent", "status", "-o", "json")
    assert res.returncode == 0, res.stderr
    return {r["host"]: r for r in res.json()["agents"]}


def test_phased_pull_to_12_hosts_and_a_down_host_converges_when_it_is_up(
    pull_fleet, dml_server, run_ferry, ferry_home
):
    fleet = pull_fleet
    build(ferry_home, "1.0")
    p = pull_plan(ferry_home, fleet, dml_server, milestone={
        "max_failed": 1, "deadline": "40s", "checks": [BROKEN_CHECK]})  # fmt: skip
    install(run_ferry, p)
    wait_for(
        lambda: all(s["last_heartbeat"] for s in agent_status(run_ferry).values()),
        30, "every agent's first heartbeat",
    )  # fmt: skip
    with fleet.faulted("h12", "down"):
        res = deploy(run_ferry, p, "shop@1.0", rfc(run_ferry, "shop@1.0"))
        assert res.returncode == 0, res.stdout + res.stderr  # the same exit code as push
        target = rid("shop@1.0")
        for h in HOSTS[:11]:
            assert host_release(fleet, h) == target, h
            assert files_match(fleet, h, "shop@1.0"), h
        assert host_release(fleet, "h12") is None  # it never heard of the release
        status = agent_status(run_ferry)
        assert {h: status[h]["running"] for h in HOSTS[:11]} == dict.fromkeys(HOSTS[:11], target)
        assert status["h12"]["running"] is None
        assert status["h12"]["desired"] == target
    # back up: its agent finds the baseline in force and converges, reporting it
    wait_for(lambda: host_release(fleet, "h12") == target, 120, "h12 to converge")
    assert files_match(fleet, "h12", "shop@1.0")
    wait_for(
        lambda: agent_status(run_ferry)["h12"]["last_report"]["step"] == "done", 30, "h12's report"
    )
    report = agent_status(run_ferry)["h12"]["last_report"]
    assert report["ok"] and report["release_id"] == target


def test_a_failing_check_on_a_wave_2_host_backs_waves_1_and_2_out_through_the_agents(
    pull_fleet, dml_server, run_ferry, ferry_home
):
    fleet = pull_fleet
    build(ferry_home, "1.0")
    build(ferry_home, "2.0")
    # six of the fleet's hosts keep the suite's time down: waves h1 | h2, h3 | h4..h6
    p = pull_plan(ferry_home, fleet, dml_server, targets=SIX)
    install(run_ferry, p)
    res = deploy(run_ferry, p, "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert res.returncode == 0, res.stdout + res.stderr
    old, new = rid("shop@1.0"), rid("shop@2.0")
    (fleet.root_dir("h3") / "shared" / "broken-2.0").write_text("x")  # wave 2: h2, h3
    res = deploy(run_ferry, p, "shop@2.0", rfc(run_ferry, "shop@2.0"))
    assert res.returncode == 4, res.stdout + res.stderr  # backed out, as for push
    out = res.json()
    restored = {r["host"] for r in out["backout"] if r["restored"]}
    assert restored == {"h1", "h2", "h3"}, out["backout"]
    for h in SIX:
        assert host_release(fleet, h) == old, h
        assert files_match(fleet, h, "shop@1.0"), h
    for h in SIX[3:]:  # wave 3 never received the new release
        assert not (fleet.root_dir(h) / "releases" / new).exists(), h
    status = agent_status(run_ferry)
    assert {h: status[h]["desired"] for h in SIX} == dict.fromkeys(SIX, old)
    # the agents remember: pointed at the backed-out release of that deployment again,
    # they refuse it
    from orchestrator import pullstate
    from orchestrator.settings import get_settings

    url = get_settings().cms_url
    again = pullstate.desired(url, "h1")
    assert again is not None and again.purpose == "backout"
    gen = pullstate.set_desired(url, "dev", [{
        "host": "h1", "deployment_id": res.json()["id"], "purpose": "deploy",
        "release": "shop@2.0", "digest": DML.from_settings().open("shop@2.0").digest,
        "release_id": new, "spec": {},
    }])["h1"]  # fmt: skip

    def refused() -> bool:
        return any(
            r.generation == gen and r.step == "refused" and not r.ok
            for r in pullstate.reports(url, ["h1"])
        )

    wait_for(refused, 60, "h1's agent to refuse the backed-out release")
    assert host_release(fleet, "h1") == old
