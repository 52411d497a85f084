"""The release lifecycle: in which order a package may be promoted through environments.

`lifecycle.yaml` (found like the change models: `FERRY_LIFECYCLE`, then
`deploy_plans/lifecycle.yaml` in the working directory; with neither, every environment is
unrestricted) names, per environment, the evidence a package needs before it goes there:

```yaml
promotion:
  qa:   {after: [dev]}                      # the same package digest succeeded in dev first
  live: {after: [qa, pilot], acceptance: true, sign_off: false}
```

- `after`: environments in which a deployment of the *same package digest* succeeded; the
  word `pilot` means a pilot wave of this very environment (a plan's `pilot: GROUP`) passed
  its milestone and acceptance tests;
- `acceptance`: that successful deployment ran acceptance tests and every one passed;
- `sign_off`: a person other than the RFC's requester recorded a user-acceptance sign-off
  there (`ferry release accept`).

Environments without a rule are unrestricted, and so is a package that already succeeded
in the environment (a re-run, or a backout to it as the prior baseline). `missing()` is the
pure decision the change gate asks (orchestrator/change/gate.py); the evidence comes from
the CMS (orchestrator/cms/evidence.py) as `EnvironmentEvidence`, one per environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestrator.errors import SpecError
from orchestrator.yamlfile import load_yaml, parse_model

PILOT = "pilot"
ENV_VAR = "FERRY_LIFECYCLE"
FILENAME = "lifecycle.yaml"


class PromotionRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    after: tuple[str, ...] = Field(default=(), description="environments (or `pilot`) first")
    acceptance: bool = False
    sign_off: bool = False

    @field_validator("after", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError(f"after: {value!r} must be a list, e.g. after: [{value}]")
        for name in value or ():
            if not isinstance(name, str) or not name.strip():
                raise ValueError("after: each entry is an environment name or `pilot`")
        return value

    @model_validator(mode="after")
    def _evidence_needs_an_environment(self) -> PromotionRule:
        envs = [a for a in self.after if a != PILOT]
        if (self.acceptance or self.sign_off) and not envs:
            raise ValueError(
                "acceptance and sign_off are evidence from an earlier environment: "
                "name it in after, e.g. after: [qa]"
            )
        return self


class Lifecycle(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    promotion: dict[str, PromotionRule] = {}

    @model_validator(mode="after")
    def _order(self) -> Lifecycle:
        for env, rule in self.promotion.items():
            if env == PILOT:
                raise ValueError(
                    "promotion.pilot: `pilot` is the word for a pilot wave, not an "
                    "environment; rename the environment"
                )
            if env in rule.after:
                raise ValueError(f"promotion.{env}.after: {env} cannot come after itself")
        cycle = _cycle(self.promotion)
        if cycle:
            raise ValueError(
                f"promotion: {' → '.join(cycle)} is a cycle, so nothing could ever be "
                "deployed there; remove one of these `after` entries"
            )
        return self

    def rule(self, environment: str) -> PromotionRule | None:
        return self.promotion.get(environment)

    @property
    def environments(self) -> list[str]:
        """Every environment the lifecycle names, earlier ones first where it says so."""
        seen: list[str] = []

        def visit(env: str) -> None:
            if env in seen or env == PILOT:
                return
            rule = self.promotion.get(env)
            for before in rule.after if rule else ():
                visit(before)
            seen.append(env)

        for env in self.promotion:
            visit(env)
        return seen


def _cycle(rules: dict[str, PromotionRule]) -> list[str]:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(env: str) -> list[str]:
        if state.get(env) == 2:
            return []
        if state.get(env) == 1:
            return path[path.index(env) :] + [env]
        state[env] = 1
        path.append(env)
        rule = rules.get(env)
        for before in rule.after if rule else ():
            found = visit(before)
            if found:
                return found
        path.pop()
        state[env] = 2
        return []

    for env in rules:
        found = visit(env)
        if found:
            return found
    return []


# -- finding and reading the file ----------------------------------------------------------
def lifecycle_path() -> Path | None:
    """FERRY_LIFECYCLE, else ./deploy_plans/lifecycle.yaml, else None (no rules). A named
    file that does not exist is an error, never a silent "no rules"."""
    named = os.environ.get(ENV_VAR)
    if named:
        path = Path(named)
        if not path.is_file():
            raise SpecError(str(path), "", "file not found", f"check {ENV_VAR}")
        return path
    local = Path.cwd() / "deploy_plans" / FILENAME
    return local if local.is_file() else None


def load_lifecycle(path: Path | None = None) -> Lifecycle:
    path = path or lifecycle_path()
    if path is None:
        return Lifecycle()
    data = load_yaml(path)
    return parse_model(Lifecycle, path, {} if data is None else data)


# -- the evidence, and the decision --------------------------------------------------------
@dataclass(frozen=True)
class EnvironmentEvidence:
    """What one package digest has shown in one environment (from the CMS)."""

    environment: str
    deployments: tuple[tuple[int, str], ...] = ()  # (deployment id, status), oldest first
    acceptance: dict[str, bool] = field(default_factory=dict)  # of the latest success
    failed_acceptance: tuple[str, ...] = ()  # tests that failed in any deployment here
    sign_offs: tuple[str, ...] = ()  # who signed user acceptance off
    pilot_passed: bool = False
    requesters: tuple[str, ...] = ()  # of the RFCs it was deployed here under

    @property
    def succeeded(self) -> bool:
        return any(status == "succeeded" for _id, status in self.deployments)

    @property
    def acceptance_passed(self) -> bool:
        return bool(self.acceptance) and all(self.acceptance.values())


def missing(
    lifecycle: Lifecycle,
    environment: str,
    digest: str,
    evidence: dict[str, EnvironmentEvidence],
    *,
    deferred: tuple[str, ...] = (),
) -> list[str]:
    """Every piece of evidence `digest` still lacks for `environment` (empty: promotable).
    `deferred`: requirements this very deployment will meet before they matter (a pilot
    wave the plan runs first; the gate asks again at the next wave's boundary)."""
    rule = lifecycle.rule(environment)
    if rule is None:
        return []
    here = evidence.get(environment)
    if here is not None and here.succeeded:
        # it already ran here: deploying it again (a re-run, a backout to it as the prior
        # baseline) promotes nothing, even if it came in before the rule or by the ECAB
        return []
    short = digest.removeprefix("sha256:")[:12]
    head = f"promotion to {environment}: package {short}"
    out: list[str] = []
    for before in rule.after:
        if before == PILOT:
            if PILOT in deferred:
                continue
            if not evidence.get(environment, EnvironmentEvidence(environment)).pilot_passed:
                out.append(
                    f"{head} has not passed a pilot wave in {environment} (name a pilot group "
                    "in the plan: `pilot: GROUP`)"
                )
            continue
        ev = evidence.get(before, EnvironmentEvidence(before))
        if not ev.succeeded:
            out.append(f"{head} has not succeeded in {before} (deploy the same package there)")
            continue
        if rule.acceptance and not ev.acceptance_passed:
            if ev.acceptance:
                bad = ", ".join(sorted(n for n, ok in ev.acceptance.items() if not ok))
                out.append(f"{head} failed acceptance tests in {before}: {bad}")
            else:
                out.append(
                    f"{head} has no passed acceptance tests in {before} (its plan there "
                    "declares `acceptance:` tests)"
                )
        if rule.sign_off and not ev.sign_offs:
            out.append(
                f"{head} has no user-acceptance sign-off in {before} "
                f"(ferry release accept NAME@VERSION --env {before})"
            )
    return out
