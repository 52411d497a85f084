"""Finding and reading `change_models.yaml` and `calendar.yaml` (the I/O half of the models).

Lookup, first found wins (documented in docs/change.md):

1. `FERRY_CHANGE_MODELS` / `FERRY_CALENDAR` (or `change_models` / `calendar` in
   ferry.toml), a path relative to the working directory;
2. `deploy_plans/change_models.yaml` / `deploy_plans/calendar.yaml` in the working
   directory (where ferry.toml lives): the organisation's own copy;
3. the examples shipped in the repository's `deploy_plans/`.

A named file that does not exist is an error (exit 2), never a silent fall-back: falling back
could authorize changes under rules nobody chose.
"""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator.change.calendar import Calendar
from orchestrator.change.models import ChangeModels
from orchestrator.errors import SpecError
from orchestrator.settings import get_settings
from orchestrator.yamlfile import load_yaml, parse_model

REPO_PLANS = Path(__file__).resolve().parents[2] / "deploy_plans"


def _find(setting: str, env_var: str, filename: str) -> Path:
    named = os.environ.get(env_var) or getattr(get_settings(), setting, None)
    if named:
        path = Path(named)
        if not path.is_file():
            raise SpecError(str(path), "", "file not found", f"check {env_var}")
        return path
    local = get_settings().root / "deploy_plans" / filename
    return local if local.is_file() else REPO_PLANS / filename


def change_models_path() -> Path:
    return _find("change_models", "FERRY_CHANGE_MODELS", "change_models.yaml")


def calendar_path() -> Path:
    return _find("calendar", "FERRY_CALENDAR", "calendar.yaml")


def _load(model: type[ChangeModels] | type[Calendar], path: Path) -> ChangeModels | Calendar:
    data = load_yaml(path)
    return parse_model(model, path, {} if data is None else data)


def load_change_models(path: Path | None = None) -> ChangeModels:
    result = _load(ChangeModels, path or change_models_path())
    assert isinstance(result, ChangeModels)
    return result


def load_calendar(path: Path | None = None) -> Calendar:
    result = _load(Calendar, path or calendar_path())
    assert isinstance(result, Calendar)
    return result
