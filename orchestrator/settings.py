"""Ferry's settings: the project's `ferry.toml`, then `FERRY_*` environment variables.

The project is found like git finds a repository (`orchestrator.home`): the nearest of the
working directory and its parents holding a `ferry.toml` or a `.ferry/` home. Relative paths
in `ferry.toml` are read from its directory. Embedded defaults need no set-up: the CMS is
`sqlite:///<project>/.ferry/cms.db`, the DML lives in `.ferry/dml`, Prefect runs embedded
with its home in `.ferry/prefect`. Environment variables win over the file
(`FERRY_HOME` moves the home, `FERRY_DATABASE_URL` points the CMS at PostgreSQL,
`FERRY_DML_KEY_FILE` names a team's shared signing key, `FERRY_USER` the acting person).
A typo in the file or a bad value is exit 2 naming the file (or variable) and the field.
"""

from __future__ import annotations

import getpass
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from orchestrator import home as project_home
from orchestrator.errors import SpecError

# ferry.toml's path settings, read relative to the file's directory
_PATHS = ("home", "dml_path", "dml_key_file", "inventory", "change_models", "calendar")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FERRY_", extra="forbid", validate_default=True)

    home: Path = Field(Path(".ferry"), description="Ferry's working state (CMS, DML, logs)")
    database_url: str | None = Field(None, description="SQLAlchemy URL of the CMS")
    dml_path: Path | None = Field(None, description="directory of the DML store")
    dml_key_file: Path | None = Field(
        None, description="the DML signing key (raw 32 bytes), shared by a team's homes"
    )
    user: str | None = Field(None, description="acting person recorded on every record")
    inventory: Path | None = Field(None, description="default inventory file")
    ssh_timeout: float = Field(10.0, gt=0, description="SSH connect timeout, seconds")
    command_timeout: float = Field(300.0, gt=0, description="default remote step timeout")
    retention: int = Field(3, ge=1, description="releases kept per host (baseline always kept)")
    change_models: Path | None = Field(None, description="change models YAML (docs/change.md)")
    calendar: Path | None = Field(None, description="change calendar YAML (docs/change.md)")

    @field_validator("database_url")
    @classmethod
    def _cms_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():  # set but empty (a CI secret not given): unset
            return None
        # what the CMS can be (docs/cms.md): anything else failed at first use, as an
        # internal error (no such dialect, or a driver that is not installed)
        if not re.match(r"^(sqlite|postgresql(\+psycopg2?)?)://", value):
            # the scheme only: whatever follows may hold a password
            shown = re.split(r"[:/@?]", value, maxsplit=1)[0][:30] + "…"
            raise ValueError(
                f"{shown!r} is not a CMS URL: use sqlite:///PATH (the default) or "
                "postgresql://USER@HOST/DB"
            )
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        project = project_home.discover()
        data = read_config(project)
        return (init_settings, env_settings, InitSettingsSource(settings_cls, data))

    @property
    def root(self) -> Path:
        """The project's directory (where ferry.toml or .ferry/ was found)."""
        return project_home.discover().root

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


def read_config(project: project_home.Project) -> dict[str, Any]:
    """ferry.toml's settings, relative paths made absolute from its directory; the home
    defaults to the project's `.ferry/`."""
    data: dict[str, Any] = {"home": str(project.root / project_home.HOME)}
    if project.config is None:
        return data
    import tomllib

    try:
        with project.config.open("rb") as f:
            loaded = tomllib.load(f)
    except FileNotFoundError:
        raise SpecError(str(project.config), "", "file not found", "check FERRY_CONFIG") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SpecError(str(project.config), "", f"not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(str(project.config), "", f"not UTF-8 text: {exc.reason}") from None
    for key in _PATHS:
        value = loaded.get(key)
        if not isinstance(value, str):
            continue
        try:
            path = Path(value).expanduser()
        except RuntimeError:  # `~name` of a user this machine does not have
            raise SpecError(
                str(project.config), key, f"{value!r}: no user's home directory is called that",
                "write an absolute path, a path relative to ferry.toml, or ~/… for your own home",
            ) from None  # fmt: skip
        if not path.is_absolute():
            loaded[key] = str(project.root / value)
    return {**data, **loaded}


def _explain(exc: ValidationError) -> SpecError:
    """A bad setting as file (or variable), field and fix."""
    import difflib

    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "(settings)"
    env_var = f"FERRY_{field.upper()}"
    project = project_home.discover()
    source = env_var if env_var in os.environ else str(project.config or env_var)
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(field, list(Settings.model_fields), n=1)
        fix = (
            f"did you mean {close[0]!r}?"
            if close
            else "settings: " + ", ".join(Settings.model_fields)
        )
        return SpecError(source, field, "unknown setting", fix)
    return SpecError(source, field, str(err["msg"]).removeprefix("Value error, "))


@lru_cache(maxsize=1)
def _cached() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        raise _explain(exc) from None


def get_settings() -> Settings:
    """Settings read once per process; `reset_settings()` re-reads them (tests, CLI)."""
    return _cached()


def reset_settings() -> None:
    _cached.cache_clear()
