"""The planner (pure): plan + inventory hosts + CMS baselines → a Rollout.

The dry run prints this very object and the executor runs this very object, so what the
dry run shows is what happens. No I/O here (a test enforces the imports).

Each host goes through the same short, ordered steps, shown identically in the dry run,
the journal and the report:

    stage → verify → snapshot → install → activate → check       (forward)
    revert → reactivate → restore → recheck                      (backout)

`snapshot`/`restore` appear only when the plan has those hooks, `install` when it has an
install hook or config templates, `check` when it has a verify hook.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from orchestrator.errors import PlanError
from orchestrator.inventory import Host
from orchestrator.plan import DeployPlan

FORWARD_STEPS = ("stage", "verify", "snapshot", "install", "activate", "check")
BACKOUT_STEPS = ("revert", "reactivate", "restore", "recheck")
_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)%$")


def release_id(release: str, digest: str) -> str:
    """The directory name of a release on a host: name-version-<12 hex of the digest>."""
    name, _, version = release.partition("@")
    return f"{name}-{version}-{digest.removeprefix('sha256:')[:12]}"


@dataclass(frozen=True)
class Baseline:
    """What the CMS records a host (or environment) as running."""

    release: str
    digest: str

    @property
    def release_id(self) -> str:
        return release_id(self.release, self.digest)


@dataclass(frozen=True)
class HostAction:
    host: str
    address: str
    port: int
    deploy_root: str
    steps: tuple[str, ...]
    prior: Baseline | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "address": self.address,
            "deploy_root": self.deploy_root,
            "steps": list(self.steps),
            "prior": asdict(self.prior) if self.prior else None,
        }


@dataclass(frozen=True)
class WavePlan:
    index: int
    hosts: tuple[HostAction, ...]

    @property
    def names(self) -> list[str]:
        return [h.host for h in self.hosts]


@dataclass(frozen=True)
class Rollout:
    release: str
    digest: str
    release_id: str
    environment: str
    strategy: str
    method: str
    concurrency: int
    waves: tuple[WavePlan, ...]
    notes: tuple[str, ...] = field(default=())

    def hosts(self) -> list[HostAction]:
        return [h for w in self.waves for h in w.hosts]

    def to_dict(self) -> dict[str, Any]:
        return {
            "release": self.release,
            "digest": self.digest,
            "release_id": self.release_id,
            "environment": self.environment,
            "strategy": self.strategy,
            "method": self.method,
            "concurrency": self.concurrency,
            "waves": [w.names for w in self.waves],
            "steps": {h.host: list(h.steps) for h in self.hosts()},
            "prior": {h.host: (h.prior.release if h.prior else None) for h in self.hosts()},
            # the digest too: a manual backout or `recover` rebuilds each host's prior from here
            "prior_digest": {h.host: (h.prior.digest if h.prior else None) for h in self.hosts()},
            "notes": list(self.notes),
        }


def forward_steps(plan: DeployPlan) -> tuple[str, ...]:
    wanted = {
        "stage": True,
        "verify": True,
        "snapshot": plan.hooks.snapshot is not None,
        "install": plan.hooks.install is not None or bool(plan.config),
        "activate": True,
        "check": plan.hooks.verify is not None,
    }
    return tuple(s for s in FORWARD_STEPS if wanted[s])


def split_waves(
    plan: DeployPlan, names: Sequence[str], groups: Mapping[str, Sequence[str]]
) -> tuple[list[list[str]], list[str]]:
    """Target names → waves (cumulative entries); empty waves are dropped with a note."""
    n = len(names)
    if plan.strategy == "big-bang":
        return [list(names)], []
    waves: list[list[str]] = []
    notes: list[str] = []
    done: set[str] = set()
    for entry in plan.waves or ():
        remaining = [h for h in names if h not in done]
        if isinstance(entry, int):
            wave = remaining[: max(0, min(entry, n) - len(done))]
        elif m := _PERCENT.match(entry):
            target = math.ceil(n * float(m.group(1)) / 100)
            wave = remaining[: max(0, target - len(done))]
        elif entry in groups:
            members = set(groups[entry])
            wave = [h for h in remaining if h in members]
        else:
            raise PlanError(
                f"waves: {entry!r} is neither a host count, a percentage nor a group of the "
                f"inventory (groups: {', '.join(sorted(groups))})"
            )
        if not wave:
            notes.append(f"wave entry {entry!r} adds no host ({len(done)} of {n} already)")
            continue
        waves.append(wave)
        done.update(wave)
    left = [h for h in names if h not in done]
    if left:
        raise PlanError(
            f"waves {list(plan.waves or [])} reach {len(done)} of {n} targets; the last wave "
            f"must reach all of them (end with 100%), else {', '.join(left[:5])} never deploy"
        )
    return waves, notes


def plan_rollout(
    plan: DeployPlan,
    hosts: Sequence[Host],
    groups: Mapping[str, Sequence[str]],
    baselines: Mapping[str, Baseline],
    release: str,
    digest: str,
) -> Rollout:
    """Decide the whole rollout before touching anything."""
    if not hosts:
        raise PlanError("targets select no host")
    by_name = {h.name: h for h in hosts}
    waves, notes = split_waves(plan, [h.name for h in hosts], groups)
    steps = forward_steps(plan)
    wave_plans = []
    for i, wave in enumerate(waves, start=1):
        actions = tuple(
            HostAction(
                host=name,
                address=by_name[name].address,
                port=by_name[name].port,
                deploy_root=plan.deploy_root or by_name[name].deploy_root,
                steps=steps,
                prior=baselines.get(name),
            )
            for name in wave
        )
        wave_plans.append(WavePlan(i, actions))
    same = [h for h in hosts if (b := baselines.get(h.name)) and b.digest == digest]
    if same:
        notes.append(f"{len(same)} host(s) already run this package: nothing to transfer there")
    return Rollout(
        release=release,
        digest=digest,
        release_id=release_id(release, digest),
        environment=plan.environment,
        strategy=plan.strategy,
        method=plan.method,
        concurrency=plan.concurrency,
        waves=tuple(wave_plans),
        notes=tuple(notes),
    )
