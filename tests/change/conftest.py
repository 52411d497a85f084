"""Change-authorization fixtures: a small organisation's change models and calendar.

The same YAML is used in-process (`models`, `calendar`) and by the real CLI (the
`change_files` fixture points FERRY_CHANGE_MODELS / FERRY_CALENDAR at it).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator.change.calendar import Calendar
from orchestrator.change.models import ChangeModels
from tests.cms.conftest import ferry_cli  # noqa: F401

MODELS = {
    "roles": {
        "bob": ["peer"],
        "carol": ["cab", "change-manager"],
        "dave": ["cab"],
        "erin": ["ecab"],
        "mallory": [],
    },
    "models": {
        "standard": {
            "templates": [
                {
                    "name": "web-staging",
                    "release": "web*",
                    "environments": ["stage", "dev"],
                    "max_risk": "medium",
                }
            ]
        },
        "normal": {
            "approvals": {
                "low": {"count": 1},
                "medium": {"count": 1, "roles": ["change-manager", "cab"]},
                "high": {"count": 2, "roles": ["cab"]},
            },
            "lead_time_hours": {"low": 0, "medium": 24, "high": 72},
        },
        "emergency": {"approvals": {"count": 1, "roles": ["ecab"]}, "review_within_days": 5},
    },
}

CALENDAR = {
    "environments": {
        "prod": {
            "criticality": "high",
            "windows": ["Tue,Thu 22:00-02:00 Europe/Berlin"],
            "blackouts": [
                {
                    "name": "year-end",
                    "start": "2030-12-19T00:00",
                    "end": "2031-01-05T00:00",
                    "tz": "Europe/Berlin",
                }
            ],
        },
        "stage": {"criticality": "medium", "windows": ["Mon-Fri 08:00-18:00 UTC"]},
        "dev": {"criticality": "low"},
    },
}


@pytest.fixture
def models() -> ChangeModels:
    return ChangeModels.model_validate(MODELS)


@pytest.fixture
def calendar() -> Calendar:
    return Calendar.model_validate(CALENDAR)


@pytest.fixture
def change_files(ferry_home: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """The test organisation's YAML on disk, found through FERRY_CHANGE_MODELS/FERRY_CALENDAR."""
    models_file = ferry_home / "change_models.yaml"
    calendar_file = ferry_home / "calendar.yaml"
    models_file.write_text(yaml.safe_dump(MODELS))
    calendar_file.write_text(yaml.safe_dump(CALENDAR))
    monkeypatch.setenv("FERRY_CHANGE_MODELS", str(models_file))
    monkeypatch.setenv("FERRY_CALENDAR", str(calendar_file))
    return models_file, calendar_file
