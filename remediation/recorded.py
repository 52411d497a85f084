"""A deployment as the CMS recorded it, made ready to act on again (status, backout, recover).

The CMS keeps what remediation needs: the deployment row (release, environment, the
rollout with each host's prior baseline, the plan file), its journal and the host CIs.
From those this module rebuilds the Rollout and an Executor whose `back_out` runs the
plan's own hooks, so a backout at 3 a.m. is the same backout the deploy would have run.

Inventory, in order: `--inventory`, FERRY_INVENTORY, then the inventory named by the plan
file recorded in the deployment (when that file still exists).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from orchestrator.cms.db import session_scope
from orchestrator.cms.models import Deployment, Release
from orchestrator.cms.models import Host as HostCI
from orchestrator.errors import BadInput, NotFound
from orchestrator.executor import Executor
from orchestrator.inventory import Inventory, load_inventory
from orchestrator.journal import Journal
from orchestrator.plan import DeployPlan, load_plan
from orchestrator.planner import Baseline, HostAction, Rollout, WavePlan, release_id
from orchestrator.settings import Settings

Progress = Callable[[str], None]
OPEN_STATUSES = ("planned", "running")


@dataclass(frozen=True)
class RecordedDeployment:
    """A detached snapshot of one Deployment row (safe to use after its session closed)."""

    id: int
    status: str
    release: str
    digest: str
    environment: str
    strategy: str
    plan_file: str
    rfc_id: int | None
    rollout: dict[str, Any]
    evidence: dict[str, Any]
    actor: str
    started_at: datetime
    finished_at: datetime | None
    wave_status: dict[int, str] = field(default_factory=dict)

    @property
    def release_id(self) -> str:
        return release_id(self.release, self.digest)

    @property
    def open(self) -> bool:
        """Never finished: running now, or interrupted (see `runner_alive`)."""
        return self.finished_at is None and self.status in OPEN_STATUSES

    @property
    def hosts(self) -> list[str]:
        return [h for wave in self.rollout.get("waves", []) for h in wave]


def snapshot(dep: Deployment) -> RecordedDeployment:
    return RecordedDeployment(
        id=dep.id,
        status=dep.status,
        release=dep.release,
        digest=dep.package_digest,
        environment=dep.environment,
        strategy=dep.strategy,
        plan_file=dep.plan_file,
        rfc_id=dep.rfc_id,
        rollout=dict(dep.rollout or {}),
        evidence=dict(dep.evidence or {}),
        actor=dep.actor,
        started_at=dep.started_at,
        finished_at=dep.finished_at,
        wave_status={w.index: w.status for w in dep.waves},
    )


def parse_deployment_id(value: str | int) -> int:
    text = str(value).strip().removeprefix("#")
    if not text.isdigit():
        raise BadInput(f"DEPLOYMENT_ID: {value!r} is not a deployment id (a number, e.g. 7)")
    return int(text)


def load(url: str, deployment_id: str | int) -> RecordedDeployment:
    did = parse_deployment_id(deployment_id)
    with session_scope(url) as s:
        dep = s.get(Deployment, did)
        if dep is None:
            raise NotFound(
                f"deployment {did} does not exist (`ferry status` lists recent deployments)"
            )
        return snapshot(dep)


def journal(url: str, rec: RecordedDeployment) -> dict[str, dict[str, str]]:
    """host → {step: last status}: the deployment's journal, with the backout steps of every
    earlier manual backout of it laid over (so a restore already done is not done twice)."""
    from orchestrator.journal import steps_by_host
    from orchestrator.planner import BACKOUT_STEPS

    merged = steps_by_host(url, rec.id)
    with session_scope(url) as s:
        rows = s.scalars(
            select(Deployment)
            .where(Deployment.strategy == "backout", Deployment.environment == rec.environment)
            .order_by(Deployment.id)
        )
        earlier = [r.id for r in rows if (r.evidence or {}).get("backs_out") == rec.id]
    for bid in earlier:
        for host, steps in steps_by_host(url, bid).items():
            if host in merged:
                merged[host].update({k: v for k, v in steps.items() if k in BACKOUT_STEPS})
    return merged


# -- is anybody still running it? ------------------------------------------------------------
def runner_alive(evidence: dict[str, Any]) -> bool | None:
    """True/False when the deploying process was on this machine; None when we cannot tell."""
    runner = evidence.get("runner") or {}
    pid, host = runner.get("pid"), runner.get("host")
    if not isinstance(pid, int) or host != socket.gethostname():
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    # the pid may have been reused by another program since
    return b"ferry" in cmdline or b"orchestrator" in cmdline


# -- what each host returns to -----------------------------------------------------------------
def priors(url: str, rec: RecordedDeployment) -> dict[str, Baseline | None]:
    """Each host's own prior baseline, as recorded in this deployment's rollout."""
    names: dict[str, str | None] = rec.rollout.get("prior", {})
    digests: dict[str, str | None] = rec.rollout.get("prior_digest", {})
    out: dict[str, Baseline | None] = {}
    with session_scope(url) as s:
        for host, release in names.items():
            if release is None:
                out[host] = None
                continue
            digest = digests.get(host)
            if digest is None:  # recorded before prior digests were: the DML catalog knows
                name, _, version = release.partition("@")
                row = s.scalar(
                    select(Release).where(Release.name == name, Release.version == version)
                )
                if row is None:
                    raise NotFound(
                        f"deployment {rec.id}: {host}'s prior {release} is not in the DML catalog"
                    )
                digest = row.digest
            out[host] = Baseline(release, digest)
    return out


# -- plan, inventory, rollout, executor --------------------------------------------------------
def resolve_plan(rec: RecordedDeployment, override: Path | None) -> tuple[DeployPlan, Path]:
    path = override or Path(rec.plan_file)
    if not path.is_file():
        raise BadInput(
            f"deployment {rec.id}: its plan file {path} no longer exists; pass --plan PATH "
            "(the same plan) so the backout runs the plan's activate/restore/verify hooks"
        )
    return load_plan(path), path


def resolve_inventory(
    settings: Settings, override: Path | None, plan: DeployPlan | None
) -> Inventory:
    path = override or settings.inventory or (plan.inventory if plan else None)
    if path is None:
        env = os.environ.get("FERRY_INVENTORY")
        path = Path(env) if env else None
    if path is None:
        raise BadInput(
            "no inventory: pass --inventory PATH or set FERRY_INVENTORY (the deployment's plan "
            "names none, or its file is gone)"
        )
    if not Path(path).is_file():
        raise BadInput(f"inventory {path} does not exist")
    return load_inventory(Path(path))


def deploy_roots(url: str, names: list[str]) -> dict[str, str]:
    """The deploy root each host CI was last deployed under (plan overrides included)."""
    with session_scope(url) as s:
        rows = s.scalars(select(HostCI).where(HostCI.name.in_(names)))
        return {r.name: r.deploy_root for r in rows if r.deploy_root}


def rebuild_rollout(
    url: str,
    rec: RecordedDeployment,
    plan: DeployPlan,
    inventory: Inventory,
    prior: dict[str, Baseline | None],
) -> Rollout:
    roots = deploy_roots(url, rec.hosts)
    steps: dict[str, list[str]] = rec.rollout.get("steps", {})
    missing = [h for h in rec.hosts if h not in inventory.hosts]
    if missing:
        raise BadInput(
            f"deployment {rec.id} touched host(s) the inventory does not name: "
            f"{', '.join(missing[:10])} (pass the inventory it was deployed with: --inventory)"
        )
    waves = []
    for i, names in enumerate(rec.rollout.get("waves", []), start=1):
        actions = []
        for name in names:
            host = inventory.host(name)
            actions.append(
                HostAction(
                    host=name,
                    address=host.address,
                    port=host.port,
                    deploy_root=roots.get(name) or plan.deploy_root or host.deploy_root,
                    steps=tuple(steps.get(name, ())),
                    prior=prior.get(name),
                )
            )
        waves.append(WavePlan(i, tuple(actions)))
    return Rollout(
        release=rec.release,
        digest=rec.digest,
        release_id=rec.release_id,
        environment=rec.environment,
        strategy=rec.strategy,
        method=rec.rollout.get("method", "push"),
        concurrency=int(rec.rollout.get("concurrency", plan.concurrency)),
        waves=tuple(waves),
    )


@dataclass(frozen=True)
class NoTransfer:
    """The package stand-in of a backout: it only ever switches to releases already on hosts."""

    digest: str
    files: tuple[Any, ...] = ()


def backout_executor(
    *,
    settings: Settings,
    rec: RecordedDeployment,
    rollout: Rollout,
    plan: DeployPlan,
    inventory: Inventory,
    journal_deployment: int,
    progress: Progress,
) -> Executor:
    """An Executor for backout only: journals under `journal_deployment`, while hooks see
    the original deployment's id (its snapshot dir is where `restore` finds the data)."""
    return Executor(
        rollout=rollout,
        plan=plan,
        ssh=inventory.ssh,
        package=NoTransfer(rec.digest),
        public_key_hex="",
        journal=Journal(settings.cms_url, journal_deployment),
        deployment_id=rec.id,
        # never filled (a backout transfers nothing); Executor.close() removes it
        cache_root=settings.home / "cache" / f"remediation-{journal_deployment}",
        progress=progress,
        stop=threading.Event(),
    )


def current_of(executor: Executor, actions: list[HostAction]) -> dict[str, str | None | Exception]:
    """Ask each host what `current` is (the agent's state); the error when unreachable."""
    from concurrent.futures import ThreadPoolExecutor

    from orchestrator.errors import StepFailed, TransportError

    def one(a: HostAction) -> tuple[str, str | None | Exception]:
        try:
            return a.host, executor.host_ops(a).state().get("current")
        except (StepFailed, TransportError) as exc:
            return a.host, exc

    if not actions:
        return {}
    with ThreadPoolExecutor(max_workers=min(executor.plan.concurrency, len(actions))) as pool:
        return dict(pool.map(one, actions))
