"""Attacks and bad inputs of the hardening issue, through `ferry deploy` on the real fleet:
forged approvals do not deploy (exit 3) and verify-audit names them; every bad input the
issue found accepted is exit 2 with one line, nothing recorded and no host touched."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from sqlalchemy import func, select

from orchestrator.cms.models import RFC, Approval, Deployment, utcnow
from tests.deploy.helpers import build, cms, deploy, plan, rfc

pytestmark = pytest.mark.fleet


def _deployments() -> int:
    return cms(lambda s: s.scalar(select(func.count()).select_from(Deployment)))


def _untouched(fleet) -> bool:
    return all(
        not fleet.root_dir(h).exists() or list(fleet.root_dir(h).iterdir()) == []
        for h in fleet.hosts
    )


def test_forged_approvals_and_status_do_not_deploy_and_verify_audit_names_them(
    clean_small, run_ferry
):
    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    res = run_ferry(
        "rfc", "new", "--release", "shop@1.0", "--env", "dev", "--model", "normal", "-o", "json"
    )
    assert res.returncode == 0, res.stderr
    rid = res.json()["id"]
    assert run_ferry("rfc", "submit", str(rid)).returncode == 0
    # what an attacker with the database's password does: rows and a status, no events
    with_sql = [
        sa.insert(Approval).values(
            rfc_id=rid, approver=who, role="cab", decision="approved", comment="",
            created_at=utcnow(),
        )
        for who in ("carol", "dave")
    ] + [sa.update(RFC).where(RFC.id == rid).values(status="authorized")]  # fmt: skip
    cms(lambda s: [s.execute(stmt) for stmt in with_sql])

    res = deploy(run_ferry, plan(work, fleet), "shop@1.0", str(rid))
    assert res.returncode == 3, res.stdout + res.stderr
    assert "has no matching audit event" in res.stderr
    assert _untouched(fleet)
    assert cms(lambda s: s.get(Deployment, 1).status) == "refused"

    audit = run_ferry("cms", "verify-audit", "-o", "json")
    assert audit.returncode == 6, audit.stdout + audit.stderr
    unbound = audit.json()["details"]["unbound"]
    assert len(unbound) == 3
    assert [u.split(":")[0] for u in unbound] == [f"RFC-{rid}"] * 3
    assert "approval" in unbound[0] and "carol" in unbound[0] and "dave" in unbound[1]
    assert "status 'authorized'" in unbound[2]


def _bad_inventory(fleet, work: Path, name: str, edit) -> Path:
    doc = yaml.safe_load(fleet.inventory_path.read_text())
    base = fleet.inventory_path.parent
    for key in ("identity_file", "known_hosts"):
        doc["ssh"][key] = str((base / doc["ssh"][key]).resolve())
    edit(doc)
    path = work / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_bad_inputs_found_accepted_are_exit_2_with_one_line_and_nothing_recorded(
    clean_small, run_ferry, monkeypatch
):
    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    rfc_id = rfc(run_ferry, "shop@1.0")

    def two_names_one_machine(doc):
        doc["hosts"]["h2"]["address"] = doc["hosts"]["h1"]["address"]
        doc["hosts"]["h2"]["port"] = doc["hosts"]["h1"].get("port")

    def unresolvable(doc):
        doc["hosts"]["h3"]["address"] = "h3.nohost.invalid"

    cases = {
        "relative-root.yaml": (plan(work, fleet, "relative-root.yaml", deploy_root="rel/path"),
                               "deploy_root"),
        "root-root.yaml": (plan(work, fleet, "root-root.yaml", deploy_root="/"), "deploy_root"),
        "zero.yaml": (plan(work, fleet, "zero.yaml", timeouts={"step": "0s"}), "timeouts.step"),
        "huge.yaml": (plan(work, fleet, "huge.yaml", timeouts={"step": "99999999999h"}),
                      "timeouts.step"),
        "injection.yaml": (plan(work, fleet, "injection.yaml", vars={"a;id>/tmp/x;b": 1}),
                           "vars"),
    }  # fmt: skip
    twice = work / "twice.yaml"
    twice.write_text(plan(work, fleet, "base.yaml").read_text() + "environment: prod\n")
    cases["twice.yaml"] = (twice, "environment")
    for name, edit, field in [
        ("same-address.yaml", two_names_one_machine, "(top level)"),
        ("unresolvable.yaml", unresolvable, "hosts.h3.address"),
    ]:
        inv = _bad_inventory(fleet, work, name, edit)
        cases[name] = (plan(work, fleet, f"plan-{name}", inventory=str(inv)), field)
    bad_calendar = work / "calendar.yaml"
    bad_calendar.write_text("environments:\n  dev: {}\n  dev: {}\n")

    for name, (path, field) in cases.items():
        res = deploy(run_ferry, path, "shop@1.0", rfc_id)
        assert res.returncode == 2, (name, res.stdout, res.stderr)
        line = res.stderr.strip()
        assert "\n" not in line and "Traceback" not in line, (name, res.stderr)
        assert f"{name}: {field}" in line, (name, line)
    res = run_ferry(
        "deploy", str(plan(work, fleet)), "-r", "shop@1.0", "--rfc", rfc_id,
        env={"FERRY_CALENDAR": str(bad_calendar)},
    )  # fmt: skip
    assert res.returncode == 2, res.stdout + res.stderr
    assert "calendar.yaml: environments.dev: key 'dev' is given twice" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert _deployments() == 0 and _untouched(fleet)
    assert cms(lambda s: s.get(RFC, int(rfc_id)).status) in ("authorized", "scheduled")


def test_a_modified_agent_file_on_a_host_never_runs_and_drift_reports_it_exit_6(
    clean_small, run_ferry
):
    from orchestrator import agent

    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    res = deploy(run_ferry, plan(work, fleet), "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert res.returncode == 0, res.stdout + res.stderr
    name = f"agent-{agent.version()}.py"
    # an agent file an older Ferry left, intact on h2 and with a payload on h3
    (fleet.root_dir("h2") / ".ferry" / name).write_bytes(agent.source())
    payload = b"import os\nopen(os.path.join(os.path.dirname(__file__), '..', 'PWNED'), 'w')\n"
    (fleet.root_dir("h3") / ".ferry" / name).write_bytes(payload + agent.source())

    drift = run_ferry("remediate", "drift", "--inventory", str(fleet.inventory_path), "-o", "json")
    assert drift.returncode == 6, drift.stdout + drift.stderr
    hosts = drift.json()["hosts"]
    assert hosts["h3"]["state"] == "tampered"
    assert f".ferry/{name} was modified on the host" in hosts["h3"]["detail"]
    assert {h for h, d in hosts.items() if d["state"] != "ok"} == {"h3"}
    # Ferry sends its agent on every session: the file on the host never ran
    build(work, "2.0")
    again = deploy(run_ferry, plan(work, fleet), "shop@2.0", rfc(run_ferry, "shop@2.0"))
    assert again.returncode == 0, again.stdout + again.stderr
    assert not any((fleet.root_dir(h) / "PWNED").exists() for h in fleet.hosts)
