"""How a deploy plan runs its image units (Model, pure): the plan's `containers:` mapping.

```yaml
containers:
  web:                                   # an image unit of the release spec
    command: ["/bin/httpd", "-f"]        # optional: the image's entrypoint/cmd otherwise
    env: {MODE: blue}                    # optional; secret-looking values never printed
    volumes: ["/srv/app/shared/data:/data"]   # docker's -v syntax; host path absolute
    health: "wget -qO- http://127.0.0.1:8081/ok"   # run inside the container (sh -c)
    health_timeout: 30s                  # how long the health check may take to pass
    stop_timeout: 10s                    # docker stop's grace for the container replaced
```
Every container runs on the host's network as `ferry-<unit>`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_VOLUME = re.compile(r"^(/[^:]*|[A-Za-z0-9][A-Za-z0-9_.-]*):(/[^:]*)(:(ro|rw))?$")


def _seconds(value: Any) -> float:
    from orchestrator.plan import parse_duration

    return parse_duration(value)


class ContainerSpec(BaseModel):
    """One image unit's container on every host."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    command: tuple[Annotated[str, StringConstraints(min_length=1)], ...] | None = None
    env: dict[str, str] = {}
    volumes: tuple[str, ...] = ()
    health: str | None = Field(None, min_length=1)
    health_timeout: float = 30.0
    stop_timeout: float = 10.0

    @field_validator("health_timeout", "stop_timeout", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        seconds = _seconds(value)
        if seconds <= 0:
            raise ValueError("must be longer than 0s (e.g. 30s)")
        return seconds

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        for key, v in value.items():
            if not isinstance(key, str) or not _ENV_NAME.match(key):
                raise ValueError(f"env {key!r}: a name is letters, digits and '_'")
            if isinstance(v, dict | list) or v is None:
                raise ValueError(f"env {key}: give a string, number or boolean")
        return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in value.items()}

    @field_validator("volumes")
    @classmethod
    def _volumes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for v in value:
            if not _VOLUME.match(v):
                raise ValueError(
                    f"volume {v!r}: write HOST_PATH:CONTAINER_PATH[:ro|rw] with absolute paths "
                    "(docker's -v syntax), e.g. /srv/app/shared/data:/data"
                )
        return value

    def record(self, image: str) -> dict[str, Any]:
        """What the rollout records for this unit (plain JSON): the run spec, by image ID."""
        return {
            "image": image,
            "command": list(self.command) if self.command is not None else None,
            "env": dict(self.env),
            "volumes": list(self.volumes),
            "health": self.health,
            "health_timeout": self.health_timeout,
            "stop_timeout": self.stop_timeout,
        }
