"""Release specs: what a release package is built from (model layer, no writes).

```yaml
name: shop
version: 1.4.0
units:
  app:    {source: build/app}                          # relative to the spec file
  config: {source: config, include: ["*.j2", "*.toml"], exclude: ["*.bak"]}
  schema: {git: ../schema-repo, ref: v7, path: migrations}
  web:    {image: "shop-web:1.4"}                      # or docker-archive:web.tar (dml/image.py)
```

Every problem becomes one SpecError naming the file, the field and the fix. YAML itself
silently keeps the last of two equal keys, so `load_yaml` refuses a key given twice.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dml.globs import Glob, GlobError, compile_glob
from dml.ref import NAME_RE, VERSION_RE
from orchestrator.errors import SpecError
from orchestrator.yamlfile import load_yaml, parse_model

UnitName = Annotated[str, StringConstraints(pattern=NAME_RE)]


def _inside_spec(where: Path, base: str | Path, info: ValidationInfo) -> None:
    """A unit's source directory or image archive lies in the spec's tree, unless the unit
    says `outside_spec_dir: true` (validated before it: the field order)."""
    if not where.is_relative_to(Path(base).resolve()) and not (info.data or {}).get(
        "outside_spec_dir"
    ):
        raise ValueError(
            f"{where} is outside the spec's directory {Path(base).resolve()}: a package "
            "takes only what the spec's tree holds (set outside_spec_dir: true on the unit "
            "if this one is meant)"
        )


class Unit(BaseModel):
    """One release unit: a directory, or a subdirectory of a git ref."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # before `source`: its validator reads it
    outside_spec_dir: bool = Field(
        False, description="allow a source directory outside the spec file's directory"
    )
    source: str | None = Field(None, description="directory, relative to the spec file")
    git: str | None = Field(None, description="git repository: URL or path relative to spec")
    ref: str | None = Field(None, description="branch, tag or commit (git units; default HEAD)")
    path: str | None = Field(None, description="subdirectory inside the git tree (git units)")
    image: str | None = Field(
        None, description="container image: NAME:TAG in the local engine, or docker-archive:FILE"
    )
    include: list[str] = Field(default_factory=list, description="globs to take (all if empty)")
    exclude: list[str] = Field(default_factory=list, description="globs to leave out")

    @field_validator("include", "exclude")
    @classmethod
    def _globs(cls, patterns: list[str]) -> list[str]:
        for p in patterns:
            try:
                compile_glob(p)
            except GlobError as exc:
                raise ValueError(f"invalid glob: {exc}; see docs/dml.md#globs") from None
        return patterns

    @field_validator("source")
    @classmethod
    def _source_dir(cls, value: str | None, info: ValidationInfo) -> str | None:
        base = (info.context or {}).get("base_dir")
        if value is None or base is None:
            return value
        where = (Path(base) / value).resolve()
        if not where.exists():
            raise ValueError(
                f"directory {where} does not exist (paths are relative to the spec file)"
            )
        if not where.is_dir():
            raise ValueError(f"{where} is not a directory")
        _inside_spec(where, base, info)
        return value

    @field_validator("image")
    @classmethod
    def _image_archive(cls, value: str | None, info: ValidationInfo) -> str | None:
        # docker-archive:FILE is read like a source directory: from the spec's tree only
        base = (info.context or {}).get("base_dir")
        if value is None or base is None or not value.startswith("docker-archive:"):
            return value
        where = (Path(base) / value[len("docker-archive:") :]).resolve()
        if not where.is_file():
            raise ValueError(f"{where} is not a file (paths are relative to the spec file)")
        _inside_spec(where, base, info)
        return value

    @field_validator("path")
    @classmethod
    def _subdir(cls, value: str | None) -> str | None:
        if value is not None and (value.startswith("/") or ".." in value.split("/")):
            raise ValueError("must be a path inside the repository (no leading '/', no '..')")
        return value

    @model_validator(mode="after")
    def _one_origin(self) -> Unit:
        if [self.source, self.git, self.image].count(None) != 2:
            raise ValueError(
                "give exactly one of 'source' (a directory), 'git' (a repository) or "
                "'image' (a container image)"
            )
        if self.image is not None and (self.include or self.exclude or self.ref or self.path):
            raise ValueError("an image unit takes no include/exclude/ref/path; remove them")
        if self.source is not None and (self.ref is not None or self.path is not None):
            raise ValueError("'ref' and 'path' belong to git units; remove them or use 'git'")
        return self

    def globs(self) -> tuple[list[Glob], list[Glob]]:
        return [compile_glob(p) for p in self.include], [compile_glob(p) for p in self.exclude]


class ReleaseSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, StringConstraints(pattern=NAME_RE)]
    version: Annotated[str, StringConstraints(pattern=VERSION_RE)]
    description: str = ""
    units: dict[UnitName, Unit] = Field(min_length=1)

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        # `version: 1.10` is the float 1.1 to YAML: what the user typed is lost, so refuse
        # it rather than build app@1.1; a whole number (`version: 2`) reads as typed
        if isinstance(value, float):
            raise ValueError(
                f"{value!r} was read by YAML as a number, which may not be the version typed "
                f'(1.10 reads as 1.1): quote it, e.g. version: "{value}"'
            )
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def load_spec(path: Path, version: str | None = None) -> ReleaseSpec:
    """Read and validate a release spec; `version` overrides the spec's own."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(str(path), "", "file not found", "check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(str(path), "", f"cannot read: {exc}") from None
    data = load_yaml(path, text)  # a key given twice is refused there
    if version is not None and isinstance(data, dict):
        if not re.fullmatch(VERSION_RE, version):
            raise SpecError(
                str(path),
                "--version",
                f"{version!r} is not a version",
                "use letters, digits and . _ + ~ - (e.g. 1.4.0)",
            )
        data = {**data, "version": version}
    return parse_model(ReleaseSpec, path, data)


def without_units(spec: ReleaseSpec, path: Path, without: list[str]) -> dict[str, Unit]:
    """The spec's units minus those left out by name (ITIL: a unit that failed testing)."""
    unknown = [u for u in without if u not in spec.units]
    if unknown:
        raise SpecError(
            str(path),
            "--without",
            f"no unit named {', '.join(repr(u) for u in unknown)} in this spec",
            f"use one of: {', '.join(sorted(spec.units))}",
        )
    kept = {k: v for k, v in spec.units.items() if k not in without}
    if not kept:
        raise SpecError(str(path), "--without", "every unit was left out", "keep at least one")
    return kept
