"""A release reference, NAME@VERSION: the one parser for the form (model layer, pure).

The DML is the authority on it because a release exists only once built from a spec, and a
spec's `name` and `version` follow the same two patterns (`NAME_RE`, `VERSION_RE`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from orchestrator.errors import BadInput

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
VERSION_RE = r"^[A-Za-z0-9][A-Za-z0-9._+~-]{0,99}$"

_FORM = "expected NAME@VERSION, e.g. shop@1.4.0"
_NAME_RULE = "1-100 letters, digits and . _ -, the first a letter or digit"
_VERSION_RULE = "1-100 letters, digits and . _ + ~ -, the first a letter or digit"


@dataclass(frozen=True)
class ReleaseRef:
    """`shop@1.4.0` as data; every instance is valid (the constructor checks both parts)."""

    name: str
    version: str

    def __post_init__(self) -> None:
        for part, value, pattern, rule in (
            ("name", self.name, NAME_RE, _NAME_RULE),
            ("version", self.version, VERSION_RE, _VERSION_RULE),
        ):
            if not value:
                self._refuse(f"the {part} is empty")
            if not re.fullmatch(pattern, value):  # fullmatch: `$` alone lets a newline through
                self._refuse(f"the {part} {value!r} must be {rule}")

    @classmethod
    def parse(cls, text: str) -> ReleaseRef:
        """'shop@1.4.0' → ReleaseRef('shop', '1.4.0'); BadInput (exit 2) for anything else."""
        name, at, version = str(text).partition("@")
        if not at:
            raise BadInput(f"{text!r} is not a release: it has no '@'; {_FORM}")
        return cls(name, version)  # name@version is `text` again, so refusals quote it whole

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"

    def _refuse(self, problem: str) -> None:
        raise BadInput(f"{str(self)!r} is not a release: {problem}; {_FORM}")
