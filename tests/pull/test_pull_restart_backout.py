"""The DML server killed and restarted mid-wave, then a failing check (issue 12): the
deployment backs out through the agents after the restart, and nothing is lost — the
reports the agents made while the server was away reach the journal."""

from __future__ import annotations

import signal
import threading
import time

from tests.deploy.helpers import HOOKS, build, deploy, files_match, host_release, rfc, rid
from tests.pull.test_pull_deploy import install, pull_plan, wait_for

THREE = ["h1", "h2", "h3"]


def test_the_server_killed_mid_wave_then_a_failing_check_backs_out_and_loses_nothing(
    pull_fleet, dml_server, run_ferry, ferry_home
):
    fleet = pull_fleet
    build(ferry_home, "1.0")
    build(ferry_home, "2.0")
    # only 2.0's install is slow, so the kill lands while wave 1's hook runs
    hooks = {**HOOKS, "install": "{% if version == '2.0' %}sleep 8 && {% endif %}"
             + HOOKS["install"]}  # fmt: skip
    p = pull_plan(ferry_home, fleet, dml_server, targets=THREE, waves=[1, "100%"], hooks=hooks)
    install(run_ferry, p)
    res = deploy(run_ferry, p, "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert res.returncode == 0, res.stdout + res.stderr
    old, new = rid("shop@1.0"), rid("shop@2.0")
    (fleet.root_dir("h3") / "shared" / "broken-2.0").write_text("x")  # wave 2's check fails
    from orchestrator import pullstate
    from orchestrator.settings import get_settings

    url = get_settings().cms_url
    seen = max((r.id for r in pullstate.reports(url, THREE)), default=0)
    result = {}

    def run() -> None:
        result["res"] = deploy(run_ferry, p, "shop@2.0", rfc(run_ferry, "shop@2.0"))

    t = threading.Thread(target=run)
    t.start()

    def h1_steps() -> set[str]:
        return {r.step for r in pullstate.reports(url, ["h1"], seen) if r.release_id == new}

    wait_for(lambda: "verify" in h1_steps(), 180, "wave 1 under way on h1")
    assert "install" not in h1_steps()  # its install hook still runs
    dml_server.stop(signal.SIGKILL)
    time.sleep(10)  # the hook ends while the server is away: h1's reports wait in its outbox
    assert "install" not in h1_steps()
    dml_server.start()
    t.join(timeout=400)
    res = result["res"]
    assert res.returncode == 4, res.stdout + res.stderr  # backed out, as for push
    out = res.json()
    assert {r["host"] for r in out["backout"] if r["restored"]} == set(THREE), out["backout"]
    for h in THREE:
        assert host_release(fleet, h) == old, h
        assert files_match(fleet, h, "shop@1.0"), h
    # nothing lost: what h1 reported while the server was down is in the journal
    from orchestrator.cms import deployments

    journal = [
        (r["host"], r["step"], r["status"]) for r in deployments.journal_rows(url, out["id"])
    ]
    for step in ("install", "activate", "check"):
        assert ("h1", step, "succeeded") in journal, journal
    assert ("h1", "revert", "succeeded") in journal, journal  # backed out through its agent
    # the wave after the restart failed on h3's milestone check, and only there
    outcomes = deployments.load(url, out["id"]).latest("outcomes")
    assert {h for h, o in outcomes.items() if not o["ok"]} == {"h3"}, outcomes
    assert outcomes["h3"]["failed_step"] == "check" and outcomes["h1"]["ok"], outcomes
