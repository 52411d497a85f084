"""Where a Ferry project lives, found like git finds its repository.

From the working directory up to the file system's root, the nearest directory holding a
`ferry.toml` or a `.ferry/` home is the project: its `ferry.toml` is the settings file and
its `.ferry/` the home (unless the file's `home =` says otherwise, read relative to the
file). `FERRY_HOME` overrides the home and `FERRY_CONFIG` the file. Nothing found: the
working directory is the project, as before.

Why: run from `deploy_plans/`, Ferry used to make a new, empty CMS there and report "no
deployments" about a project that has many.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CONFIG = "ferry.toml"
HOME = ".ferry"


@dataclass(frozen=True)
class Project:
    root: Path  # relative paths of ferry.toml are read from here
    config: Path | None  # the ferry.toml in use, if any
    found_by: str  # "ferry.toml", ".ferry", "FERRY_CONFIG" or "cwd"


def discover(start: Path | None = None) -> Project:
    """The project the working directory (or `start`) belongs to."""
    named = os.environ.get("FERRY_CONFIG")
    if named:
        path = Path(named).absolute()
        return Project(path.parent, path, "FERRY_CONFIG")
    here = (start or Path.cwd()).absolute()
    for d in (here, *here.parents):
        if (d / CONFIG).is_file():
            return Project(d, d / CONFIG, CONFIG)
        if (d / HOME).is_dir():
            return Project(d, None, HOME)
    return Project(here, None, "cwd")


def home_of(project: Project) -> Path:
    """The home a project's ferry.toml names (`home =`), else its `.ferry/`."""
    if project.config is not None:
        import tomllib

        try:
            named = tomllib.loads(project.config.read_text()).get("home")
        except (OSError, ValueError):
            named = None
        if isinstance(named, str):
            try:
                return project.root / Path(named).expanduser()
            except RuntimeError:  # `~name` of no user here: the settings refuse it (exit 2)
                return project.root / named
    return project.root / HOME


def cms_above(home: Path) -> Path | None:
    """The CMS (`cms.db`) of a project in a parent directory of the one `home` serves, if
    any: a command about to make a new CMS under `home` says so."""
    mine = home.absolute()
    for d in mine.parent.parents:
        if not ((d / CONFIG).is_file() or (d / HOME).is_dir()):
            continue
        db = home_of(Project(d, d / CONFIG if (d / CONFIG).is_file() else None, "")) / "cms.db"
        if db.is_file() and db.parent != mine:
            return db
    return None
