"""What a plan's templates see, and how they are rendered (pure; no I/O).

Hooks, config templates and checks are Jinja2, rendered per host in a sandbox with
StrictUndefined, so a typo (`{{ relase_path }}`) is an error at plan time, not a
half-empty command on a host. The deployment id is not known when planning (the dry run
has none): it renders as PLACEHOLDER, which `Rollout.bind` replaces once the deployment
is recorded, so the record holds exactly the commands that run.
"""

from __future__ import annotations

from typing import Any

from jinja2 import StrictUndefined, Template, TemplateError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment

from dml.ref import ReleaseRef
from orchestrator.errors import PlanError

PLACEHOLDER = "<deployment-id>"
# the names Ferry sets for every host: a plan var may not take one of them
RESERVED = frozenset(
    {
        "host", "address", "environment", "release", "name", "version", "release_id",
        "release_path", "deploy_root", "current", "shared", "snapshot_dir", "deployment_id",
    }
)  # fmt: skip
_JINJA = SandboxedEnvironment(
    undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True
)


def host_context(
    *,
    plan_vars: dict[str, Any],
    host: str,
    address: str,
    environment: str,
    release: str,
    release_id: str | None,
    deploy_root: str,
    deployment_id: str = PLACEHOLDER,
) -> dict[str, Any]:
    """The names a template may use for one host and one release (None: no release)."""
    root = deploy_root.rstrip("/") or "/"
    ref = ReleaseRef.parse(release)
    return {
        **plan_vars,
        "host": host,
        "address": address,
        "environment": environment,
        "release": release,
        "name": ref.name,
        "version": ref.version,
        "release_id": release_id or "",
        "release_path": f"{root}/releases/{release_id}" if release_id else root,
        "deploy_root": root,
        "current": f"{root}/current",
        "shared": f"{root}/shared",
        "snapshot_dir": f"{root}/.ferry/snapshots/{deployment_id}",
        "deployment_id": deployment_id,
    }


def scalars(context: dict[str, Any]) -> dict[str, str]:
    """The context's scalar values as text: what a record keeps and hooks get as env."""
    return {
        k: str(v)
        for k, v in context.items()
        if isinstance(v, str | int | float) and not isinstance(v, bool)
    }


def hook_env(context: dict[str, str]) -> dict[str, str]:
    """FERRY_<NAME> for every (scalar) context value: hooks may read them from the shell."""
    return {f"FERRY_{k.upper()}": v for k, v in context.items()}


class Renderer:
    """Compiles each template once and renders it for many hosts; errors name the field."""

    def __init__(self, where: str) -> None:
        self.where = where  # the plan file, for messages
        self._compiled: dict[str, Template] = {}

    def render(self, template: str, context: dict[str, Any], field: str, host: str) -> str:
        try:
            compiled = self._compiled.get(template)
            if compiled is None:
                compiled = self._compiled[template] = _JINJA.from_string(template)
            return compiled.render(context)
        except UndefinedError as exc:
            names = ", ".join(sorted(k for k in context if not k.startswith("_")))
            raise PlanError(
                f"{self.where}: {field}: {exc.message} (host {host}; a template may use: {names})"
            ) from None
        except TemplateError as exc:
            raise PlanError(f"{self.where}: {field}: template error: {exc}") from None
