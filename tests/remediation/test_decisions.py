"""Remediation decisions (pure): what each host needs, and how a read-back is judged."""

from __future__ import annotations

from orchestrator.errors import TransportError
from orchestrator.planner import Baseline, release_id
from remediation.decisions import plan_host
from remediation.drift import exit_code, judge

PRIOR = Baseline("shop@1.0", "sha256:" + "a" * 64)
NEW = release_id("shop@2.0", "sha256:" + "b" * 64)
FULL = {s: "succeeded" for s in ("stage", "verify", "snapshot", "install", "activate", "check")}


def test_a_host_on_the_new_release_is_backed_out_with_every_step():
    p = plan_host("h1", FULL, PRIOR, NEW, NEW)
    assert (p.verdict, p.steps) == ("back-out", ("revert", "reactivate", "restore", "recheck"))


def test_keep_data_skips_only_the_restore_hook():
    p = plan_host("h1", FULL, PRIOR, NEW, NEW, keep_data=True)
    assert (p.verdict, p.steps) == ("back-out", ("revert", "reactivate", "recheck"))


def test_a_host_already_on_its_prior_with_data_restored_needs_nothing():
    journal = {**FULL, "revert": "succeeded", "restore": "succeeded"}
    p = plan_host("h1", journal, PRIOR, PRIOR.release_id, NEW)
    assert (p.verdict, p.steps) == ("at-prior", ())


def test_a_host_killed_after_install_but_before_activate_gets_its_data_restored():
    journal = {"stage": "succeeded", "snapshot": "succeeded", "install": "started"}
    p = plan_host("h1", journal, PRIOR, PRIOR.release_id, NEW)
    assert (p.verdict, p.steps) == ("data-only", ("restore", "recheck"))


def test_a_host_that_never_got_past_staging_is_left_as_it_is():
    journal = {"stage": "succeeded", "verify": "started"}
    p = plan_host("h1", journal, PRIOR, PRIOR.release_id, NEW)
    assert (p.verdict, p.steps) == ("at-prior", ())


def test_a_host_on_a_third_release_is_left_alone_and_named():
    p = plan_host("h1", FULL, PRIOR, "shop-3.0-cccccccccccc", NEW)
    assert p.verdict == "elsewhere" and p.steps == () and "shop-3.0" in p.note


def test_a_host_without_prior_loses_current_and_an_unreachable_one_is_named():
    p = plan_host("h1", FULL, None, NEW, NEW)
    assert (p.verdict, p.steps) == ("back-out", ("revert", "restore"))
    # already reverted to no release, data not yet restored: restore (no prior to recheck)
    p = plan_host("h1", FULL, None, None, NEW)
    assert (p.verdict, p.steps) == ("data-only", ("restore",))
    p = plan_host("h1", {**FULL, "restore": "succeeded"}, None, None, NEW)
    assert (p.verdict, p.steps) == ("at-prior", ())
    down = plan_host("h1", FULL, PRIOR, TransportError("h1", "connection refused"), NEW)
    assert (down.verdict, down.steps, down.current) == ("unreachable", (), None)
    assert "connection refused" in down.note  # the reason the transport gave
    assert down.note == "h1: connection refused"


def test_drift_judgement_and_exit_codes():
    rid = PRIOR.release_id
    ok = judge("h1", rid, "shop@1.0", {"current": rid, "ok": True, "files": 3})
    moved = judge("h2", rid, "shop@1.0", {"current": "x", "ok": False, "mismatches": ["…"]})
    bad = judge("h3", rid, "shop@1.0", {"current": rid, "ok": False, "mismatches": ["a: x"]})
    assert (ok.state, moved.state, bad.state) == ("ok", "drifted", "tampered")
    assert exit_code([ok]) == 0
    assert exit_code([ok, moved]) == 5
    assert exit_code([ok, moved, bad]) == 6


def test_a_modified_agent_file_on_a_host_is_tampering_and_an_intact_one_is_not():
    rid = PRIOR.release_id
    back = {"current": rid, "ok": True, "files": 3}
    intact = judge(
        "h1",
        rid,
        "shop@1.0",
        {**back, "agents": [{"file": ".ferry/agent-ab.py", "modified": False}]},
    )
    changed = judge(
        "h2",
        rid,
        "shop@1.0",
        {**back, "agents": [{"file": ".ferry/agent-ab.py", "modified": True}]},
    )
    assert intact.state == "ok"
    assert changed.state == "tampered" and ".ferry/agent-ab.py was modified" in changed.detail
    assert exit_code([intact, changed]) == 6
