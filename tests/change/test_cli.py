"""`ferry rfc` and `ferry calendar` through the real CLI, in a child process."""

from __future__ import annotations

import pytest
import yaml

AS = {name: {"FERRY_USER": name} for name in ("bob", "carol", "dave", "erin")}


@pytest.fixture
def ferry(run_ferry, change_files):
    return run_ferry


def new_rfc(ferry, *args: str) -> dict:
    r = ferry("rfc", "new", "--release", "web@1.0", *args, "--output", "json")
    assert r.returncode == 0, r.stderr
    return r.json()


def test_an_rfc_goes_from_draft_to_authorized_and_show_prints_its_history(ferry):
    rfc = new_rfc(
        ferry,
        "--env",
        "dev",
        "--model",
        "normal",
        "--hosts",
        "web-1",
        "--backout-plan",
        "redeploy web@0.9",
    )
    assert isinstance(rfc["id"], int) and rfc["status"] == "draft"
    assert rfc["risk"]["level"] == "low" and len(rfc["risk"]["factors"]) == 5
    rid = str(rfc["id"])
    assert ferry("rfc", "submit", rid).returncode == 0
    r = ferry("rfc", "approve", f"RFC-{rid}", "--comment", "looks fine", env=AS["bob"])
    assert r.returncode == 0, r.stderr
    shown = ferry("rfc", "show", rid, "--output", "json").json()
    assert shown["status"] == "authorized" and shown["missing"] == []
    actions = [e["action"] for e in shown["history"]]
    assert actions == [
        "rfc.created",
        "rfc.submitted",
        "rfc.assessed",
        "rfc.approval",
        "rfc.authorized",
    ]
    assert shown["history"][3]["actor"] == "bob"
    text = ferry("rfc", "show", rid).stdout
    assert "history:" in text and "rfc.authorized" in text and "approved by bob" in text


def test_self_approval_is_refused_with_exit_3_and_recorded(ferry):
    rid = str(new_rfc(ferry, "--env", "dev", "--model", "normal")["id"])
    ferry("rfc", "submit", rid)
    r = ferry("rfc", "approve", rid, "--output", "json")
    assert r.returncode == 3
    assert "separation of duties" in r.stderr and "alice raised" in r.stderr
    history = ferry("rfc", "show", rid, "--output", "json").json()["history"]
    assert history[-1]["action"] == "rfc.approve.refused"


def test_approving_a_rejected_rfc_is_refused(ferry):
    rid = str(new_rfc(ferry, "--env", "dev", "--model", "normal")["id"])
    ferry("rfc", "submit", rid)
    assert ferry("rfc", "reject", rid, "-m", "no backout plan", env=AS["dave"]).returncode == 0
    r = ferry("rfc", "approve", rid, env=AS["carol"])
    assert r.returncode == 3 and "was rejected" in r.stderr
    assert ferry("rfc", "close", rid, env=AS["dave"]).returncode == 0


def test_a_role_the_approver_does_not_hold_is_refused(ferry):
    rid = str(new_rfc(ferry, "--env", "dev", "--model", "normal")["id"])
    ferry("rfc", "submit", rid)
    r = ferry("rfc", "approve", rid, "--role", "cab", env=AS["bob"])
    assert r.returncode == 3 and "does not hold the cab role" in r.stderr


def test_a_standard_change_is_authorized_when_raised_or_refused_outside_its_template(ferry):
    rfc = new_rfc(ferry, "--env", "stage", "--model", "standard", "--template", "web-staging")
    assert rfc["status"] == "authorized"
    r = ferry(
        "rfc",
        "new",
        "--release",
        "db@1.0",
        "--env",
        "stage",
        "--model",
        "standard",
        "--template",
        "web-staging",
    )
    assert r.returncode == 3 and "does not match 'web*'" in r.stderr


def test_an_emergency_change_is_listed_for_review_until_closed_with_a_review(ferry):
    rid = str(new_rfc(ferry, "--env", "prod", "--model", "emergency", "--title", "cert")["id"])
    ferry("rfc", "submit", rid)
    assert ferry("rfc", "approve", rid, env=AS["erin"]).returncode == 0
    listed = ferry("rfc", "list", "--needs-review", "--output", "json").json()["rfcs"]
    assert [r["id"] for r in listed] == [int(rid)] and listed[0]["review_due"]
    assert "review due" in ferry("rfc", "list", "--needs-review").stdout
    assert ferry("rfc", "cancel", rid).returncode == 0  # never implemented: nothing to review
    assert ferry("rfc", "list", "--needs-review", "--output", "json").json()["rfcs"] == []


def test_risk_override_needs_a_reason(ferry):
    r = ferry(
        "rfc", "new", "--release", "web@1.0", "--env", "dev", "--model", "normal", "--risk", "high"
    )
    assert r.returncode == 2 and "--reason" in r.stderr
    rfc = new_rfc(
        ferry,
        "--env",
        "dev",
        "--model",
        "normal",
        "--risk",
        "high",
        "--reason",
        "touches the payment path",
    )
    assert rfc["risk"]["level"] == "high" and rfc["risk"]["overridden"]
    assert rfc["risk"]["override_reason"] == "touches the payment path"


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--release", "web-1.0", "--model", "normal"], "--release"),
        (["--release", "web@1.0", "--model", "urgent"], "--model"),
        (["--release", "web@1.0", "--model", "normal", "--window", "tomorrow"], "--window"),
        (
            [
                "--release",
                "web@1.0",
                "--model",
                "normal",
                "--window",
                "2030-01-01T10:00Z/2030-01-01T09:00Z",
            ],
            "--window",
        ),
        (["--release", "web@1.0", "--model", "normal", "--stages", "build"], "--stages"),
        (["--release", "web@1.0", "--model", "standard"], "--template"),
    ],
)
def test_malformed_rfc_input_names_the_field_and_exits_2(ferry, args, field):
    r = ferry("rfc", "new", "--env", "dev", *args)
    assert r.returncode == 2, r.stderr
    assert field in r.stderr


def test_a_malformed_change_model_file_names_its_field(ferry, change_files):
    models_file, _ = change_files
    doc = yaml.safe_load(models_file.read_text())
    doc["models"]["normal"]["lead_time_hours"]["high"] = "soon"
    models_file.write_text(yaml.safe_dump(doc))
    r = ferry("rfc", "new", "--release", "web@1.0", "--env", "dev", "--model", "normal")
    assert r.returncode == 2
    assert "models.normal.lead_time_hours.high" in r.stderr and "change_models.yaml" in r.stderr


def test_unknown_rfc_is_not_found(ferry):
    r = ferry("rfc", "show", "RFC-404")
    assert r.returncode == 2 and "RFC-404 does not exist" in r.stderr


def test_calendar_shows_windows_blackouts_scheduled_rfcs_and_conflicts(ferry):
    window = "2030-06-04T22:15+02:00/2030-06-04T23:45+02:00"
    ids = []
    for _ in range(2):
        rid = str(new_rfc(ferry, "--env", "prod", "--model", "emergency", "--window", window)["id"])
        r = ferry("rfc", "submit", rid, "--output", "json")
        ids.append(int(rid))
        ferry("rfc", "approve", rid, env=AS["erin"])
    assert f"RFC-{ids[0]}" in r.json()["warnings"][0]  # the second submit reports the conflict
    cal = ferry(
        "calendar", "--env", "prod", "--at", "2030-12-23T00:00Z", "--days", "3", "--output", "json"
    ).json()
    prod = cal["environments"][0]
    assert prod["windows"] == ["Tue,Thu 22:00-02:00 Europe/Berlin"]
    assert prod["next_windows"][0] == {
        "start": "2030-12-24T21:00:00Z",
        "end": "2030-12-25T01:00:00Z",
    }
    assert prod["blackouts"][0]["name"] == "year-end"
    assert [r["id"] for r in prod["rfcs"]] == ids and [x["status"] for x in prod["rfcs"]] == [
        "scheduled",
        "scheduled",
    ]
    assert cal["conflicts"] == [{"rfcs": ids}]
    text = ferry("calendar", "--at", "2030-12-23T00:00Z").stdout
    assert "blackout" in text and "conflict: RFC-" in text
