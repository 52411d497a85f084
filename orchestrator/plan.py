"""Deploy plans (YAML, pydantic-validated): what to deploy where, how, and how to judge it.

```yaml
environment: staging
inventory: inventory.yaml          # relative to the plan file, or FERRY_INVENTORY
targets: all                       # a group, host names or glob patterns (comma list ok)
strategy: phased                   # or big-bang (one wave, one milestone)
waves: [1, 3, 100%]                # cumulative: hosts done after each wave
                                   # {hosts: 3, approve: true}: a person approves after it
method: push
deploy_root: /srv/app              # overrides the inventory's
concurrency: 20                    # hosts at once within a wave
shard_size: 200                    # on a Prefect work pool: waves split across workers
hooks:                             # shell, Jinja2-rendered per host (sandboxed, strict)
  snapshot: "cp -a {{ shared }}/data {{ snapshot_dir }}/"
  install: "..."
  activate: "true"
  check: "test -f {{ release_path }}/app/health.ok"   # the `check` step's health hook
  restore: "rm -rf {{ shared }}/data && cp -a {{ snapshot_dir }}/data {{ shared }}/"
config:                            # rendered per host into <release>/.rendered/<dest>
  - {src: templates/app.toml.j2, dest: app.toml}
vars: {port: 8080}
milestone:
  max_failed: 0                    # tolerated failed hosts per wave: fail when EXCEEDED
  deadline: 120s                   # from the wave's start to its verdict
  soak: 0s                         # wait after the wave before the checks
  checks:
    - {command: "test -x {{ release_path }}/app/run"}
    - {http: "http://127.0.0.1:8080/health", status: 200}
    - {tcp: 8080}
timeouts: {step: 120s, connect: 10s}
retention: 3                       # releases kept per host; the baseline is always kept
els:                               # early life support after success (`ferry els run`)
  period: 24h
  every: 10m
  checks: [{http: "http://127.0.0.1:8080/health"}]
pilot: canary                      # an inventory group deployed first, as its own wave
acceptance:                        # after the last milestone (and the pilot's): evidence
  - {name: smoke, type: functional, http: "http://127.0.0.1:8080/", status: 200}
containers:                        # how image units run (orchestrator/container_plan.py)
  web: {volumes: ["/srv/app/shared/data:/data"], health: "wget -qO- http://127.0.0.1:8081/ok"}
```
Waves are cumulative: `[1, 10%, 50%, 100%]` means 1 host, then up to 10% of the targets,
then 50%, then all; a count is hosts, `N%` rounds up, a group name takes the group's
remaining hosts. The last wave must reach every target.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from orchestrator.change.calendar import RecurringWindow
from orchestrator.container_plan import ContainerSpec
from orchestrator.context import RESERVED
from orchestrator.inventory import deploy_root_problem
from orchestrator.yamlfile import parse_model

UNIT_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"  # dml.ref.NAME_RE: a release spec's unit
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}


def parse_duration(value: Any) -> float:
    """'90s', '2m', '1.5h', '500ms' or a number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:  # an integer beyond any float: far longer than a week
            raise ValueError(
                f"{str(value)[:20]}… is longer than a week (7d = 168h), the longest Ferry waits"
            ) from None
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ValueError(f"{value!r} is not a duration (e.g. 30s, 2m, 1h)")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if not seconds <= MAX_DURATION:  # also NaN and infinity
        raise ValueError(f"{value!r} is longer than a week (7d = 168h), the longest Ferry waits")
    return seconds


def is_http_url(value: str) -> bool:
    """An http(s) URL with a host: a pull server, a webhook, an http check once rendered."""
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise ValueError("0s would time out at once: give a duration above zero, e.g. 30s")
    return seconds


def _a_person_can_answer(seconds: float) -> float:
    # Prefect's pause counts whole seconds: below one, no one is waited for at all
    if seconds < 1:
        raise ValueError(
            f"{seconds:g}s leaves no time to decide: a manual milestone waits at least 1s "
            "for a person (e.g. 30m, 4h)"
        )
    return seconds


MAX_DURATION = 7 * 24 * 3600.0
Duration = Annotated[float, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_positive)]
_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)%$")
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _tolerance(value: Any) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _PERCENT.match(value.strip())
        if m and 0 <= float(m.group(1)) <= 100:
            return value.strip()
        if re.fullmatch(r"[0-9]+", value.strip()):  # str.isdigit also takes '²'
            return int(value)
    raise ValueError(f"{value!r}: use a count of hosts (0, 1, …) or a percentage like 10%")


class Check(BaseModel):
    """One health check run on each host of the wave: a command, an HTTP status or a port."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str | None = None
    command: str | None = None
    http: str | None = None  # a URL (a template: checked once rendered, planner.py)
    status: int = Field(200, ge=100, le=599)
    tcp: int | None = Field(None, ge=1, le=65535)
    address: str = "127.0.0.1"
    timeout: PositiveDuration = 10.0

    @model_validator(mode="after")
    def _one_kind(self) -> Check:
        kinds = [k for k in ("command", "http", "tcp") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("a check has exactly one of: command, http, tcp")
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.command is not None:
            return f"command: {self.command}"
        if self.http is not None:
            return f"http {self.http} == {self.status}"
        return f"tcp {self.address}:{self.tcp}"


TEST_TYPES = ("functional", "performance", "security", "operational", "user-acceptance")


class AcceptanceTest(Check):
    """An acceptance criterion verified by a test, run on every host after the last milestone
    passed (and on the pilot wave's hosts after its milestone); its result is evidence."""

    name: str = Field(min_length=1)
    type: Literal["functional", "performance", "security", "operational", "user-acceptance"]


class Milestone(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_failed: Annotated[int | str, BeforeValidator(_tolerance)] = 0
    deadline: PositiveDuration = 600.0
    soak: Duration = 0.0
    checks: tuple[Check, ...] = ()

    def allowed_failures(self, wave_size: int) -> int:
        """Failed hosts a wave may have and still pass: the milestone fails when EXCEEDED."""
        if isinstance(self.max_failed, int):
            return self.max_failed
        pct = float(self.max_failed.rstrip("%"))
        return int(wave_size * pct // 100)


class EarlyLifeSupport(BaseModel):
    """ITIL early life support: after a deployment succeeds, `ferry els run` re-runs these
    checks on its hosts every `every` until `period` has passed, then records the outcome."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    period: Duration
    every: Duration = 600.0
    checks: tuple[Check, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _positive(self) -> EarlyLifeSupport:
        if self.period <= 0:
            raise ValueError("els.period must be longer than 0s (e.g. 24h)")
        if self.every <= 0:
            raise ValueError("els.every must be longer than 0s (e.g. 10m)")
        return self


class Hooks(BaseModel):
    """Shell run per host by the step of the same name (see orchestrator.steps)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    snapshot: str | None = None
    install: str | None = None
    activate: str | None = None
    check: str | None = None
    restore: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "verify" in data:
            # `verify` is the agent's signature and checksum step; the hook is the check's
            raise ValueError(
                "hooks.verify is now hooks.check (the hook runs in the `check` step; "
                "`verify` is the agent's own signature and checksum step): rename the key"
            )
        return data

    @model_validator(mode="after")
    def _paired(self) -> Hooks:
        if (self.snapshot is None) != (self.restore is None):
            raise ValueError("snapshot and restore come together (snapshotted data is restored)")
        return self


class ConfigTemplate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    src: Path
    dest: str

    @field_validator("src")
    @classmethod
    def _exists(cls, value: Path, info: ValidationInfo) -> Path:
        base = (info.context or {}).get("base_dir")
        path = (Path(base) / value) if base and not value.is_absolute() else value
        if not path.is_file():
            raise ValueError(f"template {value} not found (paths are relative to the plan)")
        return path.resolve()

    @field_validator("dest")
    @classmethod
    def _relative(cls, value: str) -> str:
        parts = value.split("/")
        if value.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"dest {value!r} must be a relative path without '..'")
        return value


class Timeouts(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    step: PositiveDuration = 300.0
    connect: PositiveDuration = 10.0


_HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")


class PullWindow(BaseModel):
    """A daily window, UTC, "HH:MM" to "HH:MM" (may pass midnight): the older shape of
    `pull.window`; the change calendar's text ("Sat 02:00-04:00 Europe/Berlin") also works."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    start: str
    end: str

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, value: str) -> str:
        if not _HHMM.match(value):
            raise ValueError(f"{value!r}: a window time is HH:MM (UTC), e.g. 02:00")
        return value

    @property
    def spec(self) -> str:
        return f"daily {self.start}-{self.end} UTC"


class Pull(BaseModel):
    """`method: pull` (issue 12): hosts pull the release from `ferry dml serve`.
    With `apply: window` each host applies inside its own inventory `window:`; `window`
    here is the default for hosts without one (orchestrator/pullwindow.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    server: str
    poll: PositiveDuration = 30.0
    heartbeat: PositiveDuration = 10.0
    apply: Literal["now", "window", "boot"] = "now"
    # the calendar's text, or the older {start, end} (daily, UTC): kept as the calendar's text
    window: str | None = None

    @field_validator("heartbeat")
    @classmethod
    def _beat(cls, value: float) -> float:
        # the server stamps hosts whose long-poll waits every 2 s; a host is silent after
        # 3 heartbeats, so a shorter heartbeat would call waiting hosts silent
        if value < 2.0:
            raise ValueError("heartbeat is at least 2s (a waiting long-poll is stamped every 2s)")
        return value

    @field_validator("server")
    @classmethod
    def _url(cls, value: str) -> str:
        if not is_http_url(value):
            raise ValueError(f"{value!r}: the DML server is https://HOST:PORT")
        return value.rstrip("/")

    @field_validator("window", mode="before")
    @classmethod
    def _calendar_text(cls, value: Any) -> Any:
        try:
            if isinstance(value, dict):
                value = PullWindow.model_validate(value).spec
            if isinstance(value, str):
                return RecurringWindow.model_validate(value).spec
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
        return value

    @property
    def default_window(self) -> str | None:
        """The default for hosts without a window of their own (None: there is none)."""
        return self.window


WaveEntry = int | str


class ApprovedWave(BaseModel):
    """`{hosts: 3, approve: true}`: a manual milestone. After this wave's milestone passes,
    the flow pauses until a person with a role in the change models approves (Prefect's UI,
    or `ferry approve ID`) or rejects, which backs the deployment out; no decision
    within `timeout` is a rejection."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    hosts: WaveEntry
    approve: bool = False
    timeout: Annotated[
        float, BeforeValidator(parse_duration), AfterValidator(_a_person_can_answer)
    ] = 3600.0


def wave_entry(entry: WaveEntry | ApprovedWave) -> WaveEntry:
    return entry.hosts if isinstance(entry, ApprovedWave) else entry


class Notify(BaseModel):
    """`notify:` — where a deployment's start, milestones, backout and end are announced
    (a Slack-compatible incoming webhook; orchestrator/notify.py). Never fails a deployment."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    webhook: str = Field(min_length=1)

    @field_validator("webhook")
    @classmethod
    def _http(cls, value: str) -> str:
        if not is_http_url(value):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value


class DeployPlan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    environment: str = Field(min_length=1)
    inventory: Path | None = None
    targets: str | list[str] = "all"
    strategy: Literal["big-bang", "phased"]
    waves: tuple[WaveEntry | ApprovedWave, ...] | None = None
    method: Literal["push", "pull"] = "push"
    pull: Pull | None = None
    deploy_root: str | None = None
    concurrency: int = Field(20, ge=1, le=1000)
    # run by a Prefect worker: a wave of more hosts runs as shard flow runs on its work pool
    shard_size: int | None = Field(None, ge=1, le=100000)
    hooks: Hooks = Hooks()
    config: tuple[ConfigTemplate, ...] = ()
    vars: dict[str, Any] = {}
    milestone: Milestone = Milestone()
    timeouts: Timeouts = Timeouts()
    retention: int = Field(3, ge=1)
    readback: Literal["full", "quick"] = "full"
    els: EarlyLifeSupport | None = None
    acceptance: tuple[AcceptanceTest, ...] = ()
    pilot: str | None = Field(None, min_length=1, description="inventory group: the first wave")
    notify: Notify | None = None
    # how the release's image units run (orchestrator/container_plan.py)
    containers: dict[Annotated[str, StringConstraints(pattern=UNIT_NAME)], ContainerSpec] = {}

    @field_validator("acceptance")
    @classmethod
    def _unique_tests(cls, value: tuple[AcceptanceTest, ...]) -> tuple[AcceptanceTest, ...]:
        names = [t.name for t in value]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"acceptance test name(s) {', '.join(twice)} used twice; rename")
        return value

    @field_validator("deploy_root")
    @classmethod
    def _deploy_root(cls, value: str | None) -> str | None:
        if value is not None and (why := deploy_root_problem(value)):
            raise ValueError(why)
        return value

    @field_validator("inventory")
    @classmethod
    def _inventory_path(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        base = (info.context or {}).get("base_dir")
        if value is not None and base and not value.is_absolute():
            return (Path(base) / value).resolve()
        return value

    @field_validator("vars")
    @classmethod
    def _var_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            # keys become template names and FERRY_<KEY> environment variables of hooks
            if not isinstance(key, str) or not _VAR_NAME.match(key):
                raise ValueError(
                    f"var {key!r}: a var name is letters, digits and '_', not starting with a digit"
                )
            if key in RESERVED:
                raise ValueError(
                    f"var {key!r} is a name Ferry sets for every host "
                    f"({', '.join(sorted(RESERVED))}); rename the var"
                )
        return value

    @field_validator("waves")
    @classmethod
    def _waves(
        cls, value: tuple[WaveEntry | ApprovedWave, ...] | None
    ) -> tuple[WaveEntry | ApprovedWave, ...] | None:
        for entry in map(wave_entry, value or ()):
            if isinstance(entry, bool):
                raise ValueError("a wave is a host count, a percentage like 10%, or a group")
            if isinstance(entry, int) and entry < 1:
                raise ValueError(f"wave {entry}: a host count is at least 1")
            if isinstance(entry, str):
                m = _PERCENT.match(entry)
                if m and not 0 < float(m.group(1)) <= 100:
                    raise ValueError(f"wave {entry}: a percentage is above 0% and at most 100%")
        return value

    @model_validator(mode="after")
    def _pull(self) -> DeployPlan:
        if self.method == "pull" and self.pull is None:
            raise ValueError("method pull needs pull: {server: https://HOST:PORT}")
        if self.method == "push" and self.pull is not None:
            raise ValueError("pull: settings need method: pull")
        return self

    @model_validator(mode="after")
    def _strategy(self) -> DeployPlan:
        if self.strategy == "phased" and not self.waves:
            raise ValueError("strategy phased needs waves, e.g. waves: [1, 10%, 100%]")
        if self.strategy == "big-bang" and self.waves:
            raise ValueError("strategy big-bang deploys every target in one wave; remove waves")
        return self


def load_plan(path: Path) -> DeployPlan:
    return parse_model(DeployPlan, path)
