"""Ferry's settings: `ferry.toml` in the working directory, then `FERRY_*` environment variables.

Embedded defaults need no set-up: the CMS is `sqlite:///.ferry/cms.db`, the DML lives in
`.ferry/dml`, Prefect runs embedded with its home in `.ferry/prefect`. Environment variables
win over the file (`FERRY_DATABASE_URL` points the CMS at PostgreSQL, `FERRY_DML_PATH` moves
the DML, `FERRY_USER` names the acting person).
"""

from __future__ import annotations

import getpass
import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FERRY_", toml_file="ferry.toml", extra="forbid", validate_default=True
    )

    home: Path = Field(Path(".ferry"), description="Ferry's working state (CMS, DML, logs)")
    database_url: str | None = Field(None, description="SQLAlchemy URL of the CMS")
    dml_path: Path | None = Field(None, description="directory of the DML store")
    user: str | None = Field(None, description="acting person recorded on every record")
    inventory: Path | None = Field(None, description="default inventory file")
    ssh_timeout: float = Field(10.0, gt=0, description="SSH connect timeout, seconds")
    command_timeout: float = Field(300.0, gt=0, description="default remote step timeout")
    retention: int = Field(3, ge=1, description="releases kept per host (baseline always kept)")
    change_models: Path | None = Field(None, description="change models YAML (docs/change.md)")
    calendar: Path | None = Field(None, description="change calendar YAML (docs/change.md)")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @property
    def cms_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'cms.db'}"

    @property
    def dml_dir(self) -> Path:
        return self.dml_path or self.home / "dml"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def prefect_home(self) -> Path:
        return self.home / "prefect"

    @property
    def actor(self) -> str:
        """Who acts: FERRY_USER, else the CI job's identity, else the OS user."""
        if self.user:
            return self.user
        if os.environ.get("GITLAB_CI"):
            return f"gitlab:{os.environ.get('GITLAB_USER_LOGIN', 'ci')}"
        if os.environ.get("GITHUB_ACTIONS"):
            return f"github:{os.environ.get('GITHUB_ACTOR', 'ci')}"
        try:
            return getpass.getuser()
        except Exception:  # no passwd entry (containers)
            return f"uid:{os.getuid()}"


@lru_cache(maxsize=1)
def _cached() -> Settings:
    """The settings, or one exit-2 line naming ferry.toml / FERRY_* and the field."""
    import tomllib

    from pydantic import ValidationError

    from orchestrator.errors import SpecError

    try:
        return Settings()
    except tomllib.TOMLDecodeError as exc:
        raise SpecError("ferry.toml", "", f"not valid TOML: {exc}", "fix the syntax") from None
    except UnicodeDecodeError as exc:
        raise SpecError("ferry.toml", "", f"not UTF-8 text: {exc.reason}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        fix = {"extra_forbidden": "remove it, or check its spelling"}.get(err["type"])
        raise SpecError(f"ferry.toml (or FERRY_{field.upper()})", field, err["msg"], fix) from None


def get_settings() -> Settings:
    """Settings read once per process; `reset_settings()` re-reads them (tests, CLI)."""
    return _cached()


def reset_settings() -> None:
    _cached.cache_clear()
