"""`apply: window` on the real fleet (issue 12): each host applies inside its own
maintenance window, read from its inventory entry; a host whose window is closed is
pending, never deployed, and the milestone counts only the hosts whose time has come."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import yaml

from tests.deploy.helpers import BROKEN_CHECK, build, deploy, files_match, host_release, rfc, rid
from tests.pull.test_pull_deploy import agent_status, pull_plan, wait_for

THREE = ["h1", "h2", "h3"]


def window_around(now: datetime, zone: str, start_min: int, end_min: int) -> str:
    """A daily window from `start_min` to `end_min` minutes from `now`, wall-clock in `zone`."""
    local = now.astimezone(ZoneInfo(zone))
    a, b = local + timedelta(minutes=start_min), local + timedelta(minutes=end_min)
    return f"daily {a:%H:%M}-{b:%H:%M} {zone}"


def inventory_with_windows(fleet, work: Path, windows: dict[str, str]) -> Path:  # type: ignore[no-untyped-def]
    """The fleet's inventory, its SSH files made absolute, with `window:` on some hosts."""
    src = Path(fleet.inventory_path)
    doc = yaml.safe_load(src.read_text())
    for key in ("identity_file", "known_hosts", "ssh_config"):
        value = doc["ssh"].get(key)
        if value and not Path(value).is_absolute():
            doc["ssh"][key] = str((src.parent / value).resolve())
    for name, window in windows.items():
        doc["hosts"][name]["window"] = window
    path = work / "inventory-windows.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_apply_window_hosts_apply_in_their_own_inventory_window_and_the_rest_are_pending(
    pull_fleet, dml_server, run_ferry, ferry_home
):
    fleet = pull_fleet
    build(ferry_home, "1.0")
    now = datetime.now(UTC)
    windows = {
        "h1": window_around(now, "UTC", -60, 120),  # open now
        "h2": window_around(now, "Asia/Kolkata", -60, 120),  # open now, in its own zone
        "h3": window_around(now, "UTC", 360, 420),  # opens in six hours
    }
    inv = inventory_with_windows(fleet, ferry_home, windows)
    # no pull.window default: every host's window is its own
    p = pull_plan(ferry_home, fleet, dml_server, inventory=str(inv), targets=THREE,
                  strategy="big-bang", waves=None,
                  milestone={"max_failed": 0, "deadline": "45s", "checks": [BROKEN_CHECK]},
                  pull={"server": dml_server.url, "poll": "5s", "heartbeat": "2s",
                        "apply": "window"})  # fmt: skip
    res = run_ferry("agent", "install", "--plan", str(p), "-o", "json")
    assert res.returncode == 0, res.stdout + res.stderr
    installed = res.json()["installed"]
    assert all(r["installed"] for r in installed)
    # no systemd on the lab's hosts (their PID 1 is not systemd): the supervised loop
    assert {r["supervisor"] for r in installed} == {"loop"}
    assert all("not systemd" in r["supervisor_why"] for r in installed)
    wait_for(
        lambda: all(agent_status(run_ferry)[h]["last_heartbeat"] for h in THREE), 30,
        "the agents' heartbeats",
    )  # fmt: skip
    res = deploy(run_ferry, p, "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert res.returncode == 0, res.stdout + res.stderr
    target = rid("shop@1.0")
    for h in ("h1", "h2"):
        assert host_release(fleet, h) == target, h
        assert files_match(fleet, h, "shop@1.0"), h
    from orchestrator.cms import deployments
    from orchestrator.settings import get_settings

    rec = deployments.load(get_settings().cms_url, res.json()["id"])
    # each host was given its own window from the inventory
    assert {h.host: h.window for h in rec.plan().hosts()} == windows
    # the milestone counted only h1 and h2; h3 is recorded pending
    assert set(rec.latest("outcomes")) == {"h1", "h2"}
    assert all(o["ok"] for o in rec.latest("outcomes").values())
    assert [e["host"] for e in rec.evidence["pending"]] == ["h3"]
    time.sleep(3)
    assert host_release(fleet, "h3") is None  # never deployed
    assert agent_status(run_ferry)["h3"]["pending"] == target
    status = run_ferry("status", "-o", "json")
    assert status.returncode == 0, status.stderr
    shown = {h["host"]: h["release"] for h in status.json()["hosts"]}
    assert shown.get("h1") == shown.get("h2") == "shop@1.0" and "h3" not in shown
    assert [(x["host"], x["release_id"], x["apply"]) for x in status.json()["pending"]] == [
        ("h3", target, "window")
    ]
