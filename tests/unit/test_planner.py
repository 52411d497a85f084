"""The planner, milestone verdicts and backout decisions: pure logic, no hosts."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.backout import backout_actions
from orchestrator.errors import PlanError
from orchestrator.inventory import Host
from orchestrator.milestone import HostOutcome, milestone_verdict
from orchestrator.plan import DeployPlan, Hooks, Milestone, parse_duration
from orchestrator.planner import Baseline, plan_rollout, release_id, split_waves

ROOT = Path(__file__).resolve().parents[2]


def hosts(n: int) -> list[Host]:
    return [
        Host(name=f"h{i}", address=f"198.18.0.{i}", port=22, groups=(), deploy_root="/srv/app")
        for i in range(1, n + 1)
    ]


def phased(*waves: object, **kw: object) -> DeployPlan:
    return DeployPlan(environment="dev", strategy="phased", waves=waves, **kw)


def test_waves_are_cumulative_counts_and_percentages_rounded_up():
    names = [h.name for h in hosts(12)]
    waves, notes = split_waves(phased(1, 3, "100%"), names, {})
    assert waves == [["h1"], ["h2", "h3"], names[3:]]
    waves, _ = split_waves(phased(1, "10%", "50%", "100%"), names, {})
    # cumulative: 1, ceil(1.2)=2, 6, 12 hosts in all
    assert waves == [
        ["h1"],
        ["h2"],
        ["h3", "h4", "h5", "h6"],
        ["h7", "h8", "h9", "h10", "h11", "h12"],
    ]


def test_a_wave_that_adds_no_host_is_dropped_with_a_note():
    waves, notes = split_waves(phased(2, "10%", "100%"), ["a", "b", "c", "d", "e"], {})
    assert waves == [["a", "b"], ["c", "d", "e"]]
    # 10% of 5 is ceil(0.5)=1 host in all, and 2 are already in: that entry alone adds none
    assert notes == ["wave entry '10%' adds no host (2 of 5 already)"]


def test_group_waves_take_the_groups_remaining_hosts():
    names = ["a", "b", "c", "d"]
    waves, _ = split_waves(
        phased("canary", "rack", "100%"), names, {"canary": ["c"], "rack": ["a", "c"]}
    )
    assert waves == [["c"], ["a"], ["b", "d"]]


def test_waves_that_never_reach_every_target_are_refused():
    with pytest.raises(PlanError, match="end with 100%"):
        split_waves(phased(1, "50%"), [f"h{i}" for i in range(10)], {})
    with pytest.raises(PlanError, match="neither a host count"):
        split_waves(phased("nosuchgroup", "100%"), ["a"], {"web": ["a"]})


@given(
    st.integers(1, 60),
    st.lists(st.one_of(st.integers(1, 80), st.integers(1, 100).map(lambda p: f"{p}%")), max_size=5),
)
def test_every_target_is_in_exactly_one_wave_in_inventory_order(n, entries):
    names = [f"h{i}" for i in range(n)]
    waves, _ = split_waves(phased(*entries, "100%"), names, {})
    flat = [h for w in waves for h in w]
    assert flat == names
    assert all(waves)


def test_each_host_returns_to_its_own_prior_baseline():
    b = {
        "h1": Baseline("shop@1.0", "sha256:" + "a" * 64),
        "h2": Baseline("shop@0.9", "sha256:" + "b" * 64),
    }
    hooks = Hooks(
        snapshot="snap {{ version }} {{ release_path }}",
        activate="act {{ version }} {{ release_path }}",
        restore="rest {{ version }} {{ release_path }}",
    )
    ro = plan_rollout(
        DeployPlan(environment="dev", strategy="big-bang", hooks=hooks),
        hosts(3),
        {},
        b,
        "shop@2.0",
        "sha256:" + "c" * 64,
    )
    prior = {h.host: h.prior for h in ro.hosts()}
    assert prior == {"h1": b["h1"], "h2": b["h2"], "h3": None}
    assert ro.release_id == "shop-2.0-cccccccccccc"
    # name-version-<12 hex of the digest>
    assert release_id("shop@1.0", b["h1"].digest) == "shop-1.0-aaaaaaaaaaaa"
    assert b["h1"].release_id == "shop-1.0-aaaaaaaaaaaa"
    assert b["h2"].release_id == "shop-0.9-bbbbbbbbbbbb"
    # forward: every host renders the new release
    for name in ("h1", "h2", "h3"):
        fwd = ro.host(name).forward["activate"].command
        assert fwd == "act 2.0 /srv/app/releases/shop-2.0-cccccccccccc"
    # backout: each host's commands render ITS prior, not the new release nor another's
    h1, h2, h3 = ro.host("h1").backout, ro.host("h2").backout, ro.host("h3").backout
    assert list(h1) == ["revert", "reactivate", "restore", "recheck"]
    assert h1["reactivate"].command == "act 1.0 /srv/app/releases/shop-1.0-aaaaaaaaaaaa"
    assert h1["restore"].command == "rest 1.0 /srv/app/releases/shop-1.0-aaaaaaaaaaaa"
    assert list(h2) == ["revert", "reactivate", "restore", "recheck"]
    assert h2["reactivate"].command == "act 0.9 /srv/app/releases/shop-0.9-bbbbbbbbbbbb"
    assert h2["restore"].command == "rest 0.9 /srv/app/releases/shop-0.9-bbbbbbbbbbbb"
    # no prior: nothing to reactivate or recheck, only revert (current removed) and restore
    assert list(h3) == ["revert", "restore"]


def test_tolerated_failures_fail_the_milestone_only_when_exceeded():
    def outcomes(failed: int, total: int = 10) -> list[HostOutcome]:
        return [
            HostOutcome(f"h{i}", i >= failed, None if i >= failed else "check", "x")
            for i in range(total)
        ]

    m = Milestone(max_failed=2)
    assert milestone_verdict(1, outcomes(2), m, elapsed=1).passed  # reaching the limit passes
    assert not milestone_verdict(1, outcomes(3), m, elapsed=1).passed  # exceeding it fails
    pct = Milestone(max_failed="20%")  # of 10 hosts: 2 tolerated
    assert milestone_verdict(1, outcomes(2), pct, elapsed=1).passed
    assert not milestone_verdict(1, outcomes(3), pct, elapsed=1).passed
    assert Milestone(max_failed="10%").allowed_failures(9) == 0  # rounds down


def test_a_missed_deadline_or_a_signal_fails_the_milestone_whatever_the_counts():
    ok = [HostOutcome("h1", True)]
    m = Milestone(deadline=parse_duration("2m"))
    assert not milestone_verdict(1, ok, m, elapsed=121).passed
    assert not milestone_verdict(1, ok, m, elapsed=1, interrupted=True).passed


def test_backout_undoes_only_what_each_host_got_to():
    prior = Baseline("shop@1.0", "sha256:" + "a" * 64)
    journal = {
        "switched": {
            "stage": "succeeded",
            "verify": "succeeded",
            "snapshot": "succeeded",
            "install": "succeeded",
            "activate": "started",
        },
        "installed": {"stage": "succeeded", "snapshot": "succeeded", "install": "failed"},
        "staged": {"stage": "failed"},
        "fresh": {"activate": "succeeded"},
    }
    acts = {
        a.host: a.steps
        for a in backout_actions(
            journal, {"switched": prior, "installed": prior, "staged": prior, "fresh": None}
        )
    }
    assert acts["switched"] == ("revert", "reactivate", "restore", "recheck")
    assert acts["installed"] == ("restore", "recheck")
    assert acts["staged"] == ()
    assert acts["fresh"] == ("revert",)  # no prior: current is removed


def test_plan_validation_messages_name_the_field():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="needs waves"):
        DeployPlan(environment="dev", strategy="phased")
    with pytest.raises(ValidationError, match="remove waves"):
        DeployPlan(environment="dev", strategy="big-bang", waves=[1])
    with pytest.raises(ValidationError, match="percentage"):
        Milestone(max_failed="150%")
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")


@pytest.mark.parametrize(
    "module",
    [
        "orchestrator/planner.py",
        "orchestrator/plan.py",
        "orchestrator/milestone.py",
        "orchestrator/backout.py",
    ],
)
def test_decide_modules_do_no_io(module):
    """Model and Decide layers import nothing that reaches a host, a database or a process."""
    tree = ast.parse((ROOT / module).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    banned = (
        "paramiko",
        "sqlalchemy",
        "subprocess",
        "socket",
        "orchestrator.cms",
        "orchestrator.transport",
        "prefect",
    )
    assert not [n for n in names if n.startswith(banned)], names
