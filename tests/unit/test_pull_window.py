"""`apply: window` (issue 12): each pull host's maintenance window comes from the inventory
(the plan's `pull.window` is the default for hosts without one). Window decisions as data:
the agent's stdlib rule agrees with the change calendar's; bad input is exit 2, one line."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.agent import ferry_agent
from orchestrator.errors import ExitCode, SpecError
from orchestrator.inventory import Host, load_inventory
from orchestrator.plan import DeployPlan
from orchestrator.planner import plan_rollout
from orchestrator.pull import forward_spec
from orchestrator.pullwindow import agent_window, require_windows, window_open
from orchestrator.rollout import Rollout

# (window, instant in UTC, open?) — 2026-12-05 is a Saturday; Berlin is UTC+1 in December
CASES = [
    ("Sat 02:00-04:00 UTC", "2026-12-05T03:00", True),
    ("Sat 02:00-04:00 UTC", "2026-12-05T04:00", False),  # the end is not inside
    ("Sat 02:00-04:00 UTC", "2026-12-05T01:59", False),
    ("Sat 02:00-04:00 UTC", "2026-12-06T03:00", False),  # Sunday
    ("Sat 22:00-02:00 UTC", "2026-12-05T23:30", True),  # past midnight
    ("Sat 22:00-02:00 UTC", "2026-12-06T01:00", True),  # Sunday morning: Saturday's window
    ("Sat 22:00-02:00 UTC", "2026-12-05T01:00", False),  # Saturday morning: Friday's (none)
    ("Mon-Fri 09:00-17:00 UTC", "2026-12-04T12:00", True),  # Friday
    ("Mon-Fri 09:00-17:00 UTC", "2026-12-05T12:00", False),
    ("daily 02:00-04:00", "2026-12-02T02:30", True),  # no zone: UTC
    ("Sat 02:00-04:00 Europe/Berlin", "2026-12-05T01:30", True),  # 02:30 in Berlin
    ("Sat 02:00-04:00 Europe/Berlin", "2026-12-05T03:30", False),  # 04:30 in Berlin
    ("Sat 00:30-01:00 Europe/Berlin", "2026-12-04T23:45", True),  # Friday in UTC
    ("Sat 02:00-04:00 Asia/Kolkata", "2026-12-04T21:00", True),  # 02:30 IST Saturday
    ("daily 05:00-05:00 UTC", "2026-12-02T17:00", True),  # end == start: a whole day
]


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(("spec", "instant", "inside"), CASES)
def test_the_window_rule_as_data_on_both_sides(spec: str, instant: str, inside: bool) -> None:
    assert window_open(spec, at(instant)) is inside  # the orchestrator's (the calendar's)
    assert ferry_agent.in_window(agent_window(spec), at(instant).timestamp()) is inside


def test_the_older_window_shape_and_none() -> None:
    noon = at("2026-12-02T12:00").timestamp()
    assert ferry_agent.in_window({"start": "11:00", "end": "13:00"}, noon)  # daily, UTC
    assert not ferry_agent.in_window({"start": "13:00", "end": "11:00"}, noon)
    assert ferry_agent.in_window(None, noon) is False
    # a zone this host's tz database does not know: closed, never guessed open
    assert not ferry_agent.in_window({"start": "00:00", "end": "00:00", "tz": "Mars/Base"}, noon)


@settings(max_examples=150, deadline=None)
@given(
    days=st.sets(st.integers(0, 6), min_size=1),
    start=st.integers(0, 24 * 60 - 1),
    end=st.integers(0, 24 * 60 - 1),
    tz=st.sampled_from(["UTC", "Asia/Kolkata", "Asia/Kathmandu", "Pacific/Chatham"]),
    minutes=st.integers(0, 60 * 24 * 21),
)
def test_the_agent_agrees_with_the_change_calendar(days, start, end, tz, minutes) -> None:  # type: ignore[no-untyped-def]
    # zones without daylight saving: the calendar's and the wall clock's reading of a
    # skipped or doubled hour differ by design, and no maintenance window sits there
    names = ",".join(("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")[d] for d in sorted(days))
    spec = f"{names} {start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d} {tz}"
    now = at("2026-11-30T00:00") + timedelta(minutes=minutes, seconds=30)
    assert ferry_agent.in_window(agent_window(spec), now.timestamp()) == window_open(spec, now)


INVENTORY = """\
ssh: {user: root, identity_file: key, known_hosts: known_hosts}
hosts:
  h1: {address: 198.18.0.11, window: "Sat 02:00-04:00 Europe/Berlin"}
  h2: {address: 198.18.0.12%s}
"""


def write_inventory(tmp_path: Path, h2: str = "") -> Path:
    (tmp_path / "key").write_text("")
    (tmp_path / "known_hosts").write_text("")
    path = tmp_path / "inventory.yaml"
    path.write_text(INVENTORY % h2)
    return path


@pytest.mark.parametrize(
    ("window", "says"),
    [
        ("Sat 2am", "is not 'DAYS HH:MM-HH:MM [ZONE]'"),
        ("Sat 02:00-04:00 Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
        ("Caturday 02:00-04:00", "is not a day or range"),
        ("Sat 02:00-25:00", "is not a time of day"),
    ],
)
def test_an_unparsable_inventory_window_is_exit_2_naming_file_and_field(
    tmp_path: Path, window: str, says: str
) -> None:
    path = write_inventory(tmp_path, f', window: "{window}"')
    with pytest.raises(SpecError) as caught:
        load_inventory(path)
    err = caught.value
    assert err.exit_code == ExitCode.BAD_INPUT and "\n" not in err.message
    assert err.message.startswith(f"{path}: hosts.h2.window: ") and says in err.message


def pull_plan(**pull: object) -> DeployPlan:
    return DeployPlan.model_validate(
        {"environment": "dev", "strategy": "big-bang", "method": "pull",
         "pull": {"server": "https://198.18.0.1:8443", **pull}}
    )  # fmt: skip


def hosts(tmp_path: Path) -> list[Host]:
    return load_inventory(write_inventory(tmp_path)).all_hosts()


def test_apply_window_with_a_host_lacking_any_window_and_no_default_is_exit_2(
    tmp_path: Path,
) -> None:
    with pytest.raises(SpecError) as caught:
        require_windows(pull_plan(apply="window"), hosts(tmp_path), "inv.yaml", "plan.yaml")
    err = caught.value
    assert err.exit_code == ExitCode.BAD_INPUT and "\n" not in err.message
    assert err.message.startswith("inv.yaml: hosts.h2.window: plan.yaml has pull.apply: window")
    assert "pull.window" in err.message  # the fix names both ways out
    # with a default, or when the plan does not wait for windows, there is nothing to refuse
    require_windows(pull_plan(apply="window", window="daily 01:00-02:00"), hosts(tmp_path),
                    "inv.yaml", "plan.yaml")  # fmt: skip
    require_windows(pull_plan(apply="now"), hosts(tmp_path), "inv.yaml", "plan.yaml")


def test_each_host_gets_its_own_window_the_default_only_where_it_has_none(tmp_path: Path):
    plan = pull_plan(apply="window", window={"start": "01:00", "end": "02:00"})
    ro = plan_rollout(plan, hosts(tmp_path), {}, {}, "shop@1.0", "sha256:" + "a" * 64)
    h1, h2 = ro.host("h1"), ro.host("h2")
    assert (h1.window, h2.window) == ("Sat 02:00-04:00 Europe/Berlin", "daily 01:00-02:00 UTC")
    # the desired state the agent is given, and the record's round trip
    assert forward_spec(ro, h1)["window"] == {
        "days": [5], "start": "02:00", "end": "04:00", "tz": "Europe/Berlin",
        "spec": "Sat 02:00-04:00 Europe/Berlin",
    }  # fmt: skip
    assert forward_spec(ro, h2)["window"]["days"] == list(range(7))
    again = Rollout.from_record(ro.to_record())
    assert [h.window for h in again.hosts()] == [h1.window, h2.window]
    # apply: now records no window and gives the agent none
    now = plan_rollout(pull_plan(), hosts(tmp_path), {}, {}, "shop@1.0", "sha256:" + "a" * 64)
    assert now.host("h1").window is None and "window" not in forward_spec(now, now.host("h1"))


def test_ferry_deploy_refuses_a_host_without_a_window_before_recording_anything(
    run_ferry, ferry_home: Path
) -> None:
    inv = write_inventory(ferry_home)
    plan = ferry_home / "plan.yaml"
    plan.write_text(textwrap.dedent(f"""\
        environment: dev
        inventory: {inv}
        targets: all
        strategy: big-bang
        method: pull
        pull: {{server: "https://198.18.0.1:8443", apply: window}}
        """))  # fmt: skip
    res = run_ferry("deploy", str(plan), "--release", "shop@1.0")
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"{inv}: hosts.h2.window:" in lines[0], res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    from orchestrator.cms import deployments
    from orchestrator.settings import get_settings

    assert deployments.recent(get_settings().cms_url, 10) == []  # nothing recorded
