"""The calendar, change-model files and risk model as data: parsing, time zones, errors."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from orchestrator.change import config
from orchestrator.change.calendar import Booking, Calendar, RecurringWindow, conflicts
from orchestrator.change.models import ChangeModels, RfcRequest, parse_window
from orchestrator.change.risk import RiskInputs, assess, override
from orchestrator.errors import SpecError


def utc(*a: int) -> datetime:
    return datetime(*a, tzinfo=UTC)


def test_a_window_past_midnight_ends_the_next_day_in_its_own_time_zone():
    w = RecurringWindow.model_validate("Tue,Thu 22:00-02:00 Europe/Berlin")
    # summer (CEST, UTC+2): Tue 22:00 local = 20:00 UTC; winter (CET, UTC+1) = 21:00 UTC
    assert w.occurrence_at(utc(2030, 6, 4, 23, 59)) == (utc(2030, 6, 4, 20), utc(2030, 6, 5, 0))
    assert w.occurrence_at(utc(2030, 1, 8, 21, 30)) == (utc(2030, 1, 8, 21), utc(2030, 1, 9, 1))
    assert w.occurrence_at(utc(2030, 6, 5, 0, 0)) is None  # the end is exclusive
    assert w.occurrence_at(utc(2030, 6, 5, 12)) is None  # Wednesday noon


def test_day_ranges_and_daily():
    assert RecurringWindow.model_validate("Mon-Fri 08:00-18:00").days == frozenset(range(5))
    assert RecurringWindow.model_validate("Sat-Mon 00:00-24:00").days == {5, 6, 0}
    assert RecurringWindow.model_validate("daily 01:00-02:00 UTC").days == frozenset(range(7))


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("Tue 22:00", "is not 'DAYS HH:MM-HH:MM"),
        ("Funday 10:00-11:00", "is not a day"),
        ("Mon 25:00-26:00", "not a time of day"),
        ("Mon 10:00-11:00 Mars/Olympus", "unknown time zone"),
    ],
)
def test_a_malformed_window_names_its_field(tmp_path: Path, spec: str, problem: str):
    path = tmp_path / "calendar.yaml"
    path.write_text(yaml.safe_dump({"environments": {"prod": {"windows": [spec]}}}))
    with pytest.raises(SpecError) as err:
        config.load_calendar(path)
    assert err.value.field == "environments.prod.windows.0"
    assert problem in err.value.problem


def test_blackouts_read_local_times_in_their_zone():
    cal = Calendar.model_validate(
        {
            "blackouts": [
                {
                    "name": "freeze",
                    "start": "2030-12-20T00:00",
                    "end": "2031-01-02",
                    "tz": "Europe/Berlin",
                }
            ]
        }
    )
    assert cal.blackouts[0].start == utc(2030, 12, 19, 23)
    assert cal.blackout_at("any-env", utc(2030, 12, 25)) is not None
    assert cal.blackout_at("any-env", utc(2031, 1, 2)) is None


def test_an_environment_without_windows_is_always_open_and_unknown_ones_get_defaults():
    cal = Calendar.model_validate({"defaults": {"criticality": "high"}})
    assert cal.window_at("anything", utc(2030, 1, 1)) is not None
    assert cal.env("anything").criticality == "high"


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"models": {"normal": {"approvals": {"low": {"count": 0}}}}}, "models.normal.approvals"),
        ({"roles": {"bob": ["janitor"]}}, "roles.bob.0"),
        ({"models": {"standard": {"templates": [{"name": "t"}]}}}, "models.standard.templates.0"),
        ({"modles": {}}, "modles"),
        ({"models": {"emergency": {"review_within_days": 0}}}, "models.emergency"),
    ],
)
def test_a_malformed_change_model_names_the_field(tmp_path: Path, doc: dict, field: str):
    path = tmp_path / "change_models.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(SpecError) as err:
        config.load_change_models(path)
    assert err.value.field.startswith(field), err.value.message
    assert str(path) in err.value.message


def test_the_shipped_examples_load():
    models = config.load_change_models(config.REPO_PLANS / "change_models.yaml")
    cal = config.load_calendar(config.REPO_PLANS / "calendar.yaml")
    assert models.models.standard.templates and models.roles
    assert cal.env("production").windows


def test_lookup_prefers_the_named_file_then_the_working_directory(
    ferry_home: Path, monkeypatch: pytest.MonkeyPatch
):
    assert config.change_models_path() == config.REPO_PLANS / "change_models.yaml"
    local = ferry_home / "deploy_plans" / "change_models.yaml"
    local.parent.mkdir()
    local.write_text("roles: {}\n")
    assert config.change_models_path() == local
    monkeypatch.setenv("FERRY_CHANGE_MODELS", str(ferry_home / "missing.yaml"))
    with pytest.raises(SpecError, match="file not found"):
        config.change_models_path()


def test_rfc_windows_parse_iso_8601_and_naive_times_are_utc():
    assert parse_window("2030-06-04T22:00+02:00/2030-06-04T23:00Z") == (
        utc(2030, 6, 4, 20),
        utc(2030, 6, 4, 23),
    )
    assert parse_window("2030-06-04T20:00/2030-06-04T21:00")[0] == utc(2030, 6, 4, 20)
    for bad in ("2030-06-04", "tomorrow/later", "2030-06-04T22:00Z/2030-06-04T21:00Z"):
        with pytest.raises(ValueError):
            parse_window(bad)


def test_an_rfc_names_its_release_as_the_dml_does():
    fields = {"environment": "dev", "model": "normal"}
    req = RfcRequest.model_validate({**fields, "release": " shop@1.4.0~rc1 "})
    assert (req.release, req.release_name) == ("shop@1.4.0~rc1", "shop")
    with pytest.raises(ValidationError, match="'shop' is not a release: it has no '@'"):
        RfcRequest.model_validate({**fields, "release": "shop"})


def test_conflicts_need_the_same_environment_overlapping_hosts_and_windows():
    w1 = ((utc(2030, 1, 1, 10), utc(2030, 1, 1, 12)),)
    w2 = ((utc(2030, 1, 1, 11), utc(2030, 1, 1, 13)),)
    w3 = ((utc(2030, 1, 1, 12), utc(2030, 1, 1, 13)),)
    a = Booking(1, "prod", ("web-*",), w1)
    assert conflicts(a, [Booking(2, "prod", ("web-1",), w2)]) == [2]
    assert conflicts(a, [Booking(2, "prod", ("db-1",), w2)]) == []
    assert conflicts(a, [Booking(2, "prod", ("web-1",), w3)]) == []  # back to back
    assert conflicts(a, [Booking(2, "stage", (), w2)]) == []
    assert conflicts(a, [Booking(2, "prod", (), ())]) == [2]  # whole env, any window


def test_risk_score_adds_up_the_documented_factors():
    w = ChangeModels().risk
    low = assess(RiskInputs("dev", "low", "standard", host_count=1), w)
    assert (low.level, low.score) == ("low", 0)
    high = assess(
        RiskInputs(
            "prod", "high", "normal", host_count=None, release_size=200 * 2**20, recent_failures=3
        ),
        w,
    )
    assert high.score == 4 + 2 + 1 + 2 + 4 and high.level == "high"
    assert [f.name for f in high.factors] == [
        "environment_criticality",
        "hosts",
        "change_model",
        "release_size",
        "recent_failures",
    ]
    lowered = override(high, "medium", "canary-only change, reviewed with the service owner")
    assert lowered.level == "medium" and lowered.computed_level == "high" and lowered.score == 13
    with pytest.raises(ValueError):
        override(high, "low", " ")
