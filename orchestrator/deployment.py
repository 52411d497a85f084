"""One deployment, start to end: the records around the executor (Orchestrate layer).

`DeploymentRun` wires Model (plan, inventory, package), Decide (planner, gate, milestone,
backout) and Act (executor) and writes the CMS records: the deployment, its waves, the
journal, baselines, the RFC's lifecycle and the audit trail. The Prefect flow calls its
methods as tasks and holds no rules of its own.

Statuses: planned → running → succeeded | backed-out | failed | refused.
`failed` with `needs_remediation` means the backout could not restore some hosts.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from orchestrator.backout import backout_actions
from orchestrator.change import gate, lifecycle
from orchestrator.cms import audit
from orchestrator.cms.db import session_scope
from orchestrator.cms.models import (
    Deployment,
    EnvironmentBaseline,
    HostBaseline,
    Wave,
    utcnow,
)
from orchestrator.cms.models import Host as HostCI
from orchestrator.errors import AuthorizationRefused, FerryError
from orchestrator.executor import BackoutResult, Executor, elapsed_since
from orchestrator.inventory import Inventory, load_inventory
from orchestrator.journal import Journal
from orchestrator.milestone import HostOutcome, Verdict, milestone_verdict
from orchestrator.plan import DeployPlan, inventory_path, load_plan
from orchestrator.planner import Baseline, Rollout, plan_rollout
from orchestrator.settings import Settings

Progress = Callable[[str], None]


@dataclass
class DeployRequest:
    plan_path: Path
    release: str
    rfc: str | None
    actor: str


class DeploymentRun:
    def __init__(
        self,
        request: DeployRequest,
        settings: Settings,
        progress: Progress,
        stop: threading.Event | None = None,
    ) -> None:
        self.req = request
        self.settings = settings
        self.url = settings.cms_url
        self.progress = progress
        self.stop = stop or threading.Event()
        self.plan: DeployPlan
        self.inventory: Inventory
        self.rollout: Rollout
        self.package: Any = None
        self.dml: Any = None
        self.deployment_id: int | None = None
        self.executor: Executor | None = None
        self.verdicts: list[Verdict] = []
        self.outcomes: dict[str, HostOutcome] = {}
        self.backout: list[BackoutResult] = []
        self.done_waves: list[int] = []

    # -- Model + Decide (the dry run stops here) -------------------------------------------
    def prepare(self) -> Rollout:
        from dml.store import DML

        self.plan = load_plan(self.req.plan_path)
        self.inventory = load_inventory(inventory_path(self.plan, self.req.plan_path))
        hosts = self.inventory.select(self.plan.targets)
        self.dml = DML.from_settings()
        self.package = self.dml.open(self.req.release)  # signature + every checksum
        with session_scope(self.url) as s:
            rows = s.scalars(
                select(HostBaseline).where(HostBaseline.host.in_([h.name for h in hosts]))
            )
            baselines = {r.host: Baseline(r.release, r.package_digest) for r in rows}
        self.rollout = plan_rollout(
            self.plan,
            hosts,
            self.inventory.groups(),
            baselines,
            self.req.release,
            self.package.digest,
        )
        return self.rollout

    # -- records + gate --------------------------------------------------------------------
    def open(self) -> int:
        """Record the deployment, then authorize it; nothing has touched a host yet."""
        from dml import catalog

        ro = self.rollout
        with session_scope(self.url) as s:
            dep = Deployment(
                rfc_id=gate.parse_rfc_id(self.req.rfc) if self.req.rfc else None,
                release=ro.release,
                package_digest=ro.digest,
                environment=ro.environment,
                plan_file=str(self.req.plan_path),
                strategy=ro.strategy,
                method=ro.method,
                status="planned",
                rollout=ro.to_dict(),
                actor=self.req.actor,
                # who runs it: `ferry status` and `ferry remediate recover` tell a live run
                # from an interrupted one by this process id on this machine
                evidence={"runner": {"pid": os.getpid(), "host": socket.gethostname()}},
            )
            s.add(dep)
            s.flush()
            self.deployment_id = dep.id
            for i, wave in enumerate(ro.waves, start=1):
                s.add(Wave(deployment_id=dep.id, index=i, hosts=wave.names))
            self._upsert_hosts(s)
            audit.append(
                s,
                actor=self.req.actor,
                action="deploy.planned",
                subject_type="deployment",
                subject_id=dep.id,
                data={"release": ro.release, "rfc": self.req.rfc, "waves": ro.to_dict()["waves"]},
            )
        try:
            if not self.req.rfc:
                raise AuthorizationRefused(
                    "no RFC given: every deployment needs an authorized change (--rfc ID)",
                    reasons=["no RFC"],
                )
            with session_scope(self.url) as s:
                names = [h.host for h in ro.hosts()]
                gate.require(
                    s,
                    rfc_id=self.req.rfc,
                    stage="deploy",
                    release=ro.release,
                    environment=ro.environment,
                    hosts=names,
                    now=utcnow(),
                    actor=self.req.actor,
                )
            with session_scope(self.url) as s:
                catalog.checkin(s, ro.release, self.req.rfc, self.req.actor, dml=self.dml)
                lifecycle.transition(
                    s,
                    gate.parse_rfc_id(self.req.rfc),
                    "implementing",
                    actor=self.req.actor,
                    data={"deployment": self.deployment_id},
                )
        except AuthorizationRefused as exc:
            self._finish("refused", {"reasons": exc.reasons, "message": exc.message})
            raise
        self._set_status("running")
        self.executor = Executor(
            rollout=ro,
            plan=self.plan,
            ssh=self.inventory.ssh,
            package=self.package,
            public_key_hex=self.dml.public_key_bytes().hex(),
            journal=Journal(self.url, self.deployment_id),
            deployment_id=self.deployment_id,
            cache_root=self.settings.home / "cache" / f"deployment-{self.deployment_id}",
            progress=self.progress,
            stop=self.stop,
        )
        return self.deployment_id

    def _upsert_hosts(self, s: Any) -> None:
        for action in self.rollout.hosts():
            ci = s.scalar(select(HostCI).where(HostCI.name == action.host))
            if ci is None:
                ci = HostCI(name=action.host, address=action.address, deploy_root="")
                s.add(ci)
            ci.address = action.address
            ci.environment = self.rollout.environment
            ci.deploy_root = action.deploy_root
            ci.groups = list(self.inventory.hosts[action.host].groups)

    # -- waves -----------------------------------------------------------------------------
    def gate_wave(self, index: int) -> None:
        """Before every wave: does the change authorization still hold (window, blackout)?"""
        wave = self.rollout.waves[index - 1]
        with session_scope(self.url) as s:
            gate.require(
                s,
                rfc_id=self.req.rfc,
                stage="deploy",
                release=self.rollout.release,
                environment=self.rollout.environment,
                hosts=wave.names,
                now=utcnow(),
                actor=self.req.actor,
            )

    def run_wave(self, index: int) -> Verdict:
        assert self.executor is not None
        wave = self.rollout.waves[index - 1]
        start = time.monotonic()
        self._wave_status(index, "running", started=True)
        self.progress(
            f"wave {index}/{len(self.rollout.waves)}: {len(wave.hosts)} host(s): "
            f"{_names(wave.names)}"
        )
        outcomes = self.executor.run_wave(wave)
        self._tell(outcomes, "deployed")
        if not self.stop.is_set():
            self.executor.soak(self.plan.milestone.soak)
            outcomes = self.executor.run_checks(wave, outcomes)
        verdict = milestone_verdict(
            index,
            outcomes,
            self.plan.milestone,
            elapsed=elapsed_since(start),
            interrupted=self.stop.is_set(),
        )
        for o in outcomes:
            self.outcomes[o.host] = o
        self.verdicts.append(verdict)
        self._wave_status(index, "passed" if verdict.passed else "failed", verdict=verdict)
        word = "passed" if verdict.passed else "FAILED"
        self.progress(f"  milestone {index} {word}: {verdict.reason}")
        if verdict.passed:
            self.done_waves.append(index)
            tolerated = [o.host for o in outcomes if not o.ok]
            if tolerated:
                self.progress(f"  backing out tolerated failed host(s): {_names(tolerated)}")
                self.back_out(only=tolerated)
        return verdict

    def _tell(self, outcomes: list[HostOutcome], word: str) -> None:
        bad = [o for o in outcomes if not o.ok]
        self.progress(
            f"  {len(outcomes) - len(bad)}/{len(outcomes)} {word}"
            + "".join(f"\n  ✗ {o.host}: {o.failed_step}: {o.reason}" for o in bad[:10])
        )

    # -- backout ---------------------------------------------------------------------------
    def back_out(self, only: list[str] | None = None) -> list[BackoutResult]:
        """Return every touched host (or `only` these) to its own prior baseline."""
        assert self.executor is not None
        touched = {h: s for h, s in self.executor.touched.items() if only is None or h in only}
        by_host = {a.host: a for a in self.rollout.hosts()}
        priors = {h: by_host[h].prior for h in touched}
        actions = backout_actions(touched, priors)
        needed = [a for a in actions if a.needed]
        if only is None:
            self.progress(
                f"backing out {len(needed)} host(s) to their prior baselines"
                + (
                    f" ({len(actions) - len(needed)} never switched)"
                    if len(actions) > len(needed)
                    else ""
                )
            )
        results = self.executor.back_out(needed, by_host)
        for r in results:
            mark = "↩" if r.restored else "✗"
            extra = f" (warnings: {'; '.join(r.warnings)})" if r.warnings else ""
            what = f"restored to {r.current}" if r.restored else f"NOT restored: {r.error}"
            self.progress(f"  {mark} {r.host}: {what}{extra}")
        self.backout.extend(results)
        return results

    # -- the end ---------------------------------------------------------------------------
    def succeed(self) -> None:
        """Read every host back before declaring success; then record the new baselines."""
        assert self.executor is not None
        ro = self.rollout
        ok_hosts = [
            a for a in ro.hosts() if self.outcomes.get(a.host, HostOutcome(a.host, False)).ok
        ]
        current = self.executor.prune(ok_hosts)  # retention, and `current` read back
        wrong = {h: c for h, c in current.items() if c != ro.release_id}
        if wrong:
            raise FerryError(f"read-back found hosts not on {ro.release_id}: {wrong}")
        with session_scope(self.url) as s:
            for a in ok_hosts:
                row = s.get(HostBaseline, a.host) or HostBaseline(host=a.host)
                row.environment, row.release = ro.environment, ro.release
                row.package_digest, row.deployment_id = ro.digest, self.deployment_id
                row.recorded_at = utcnow()
                s.merge(row)
            if len(ok_hosts) == len(ro.hosts()):
                env = s.get(EnvironmentBaseline, ro.environment) or EnvironmentBaseline(
                    environment=ro.environment
                )
                env.release, env.package_digest = ro.release, ro.digest
                env.deployment_id, env.recorded_at = self.deployment_id, utcnow()
                s.merge(env)
            from dml import catalog

            catalog.mark_deployed(s, ro.release, ro.environment, actor=self.req.actor)
            lifecycle.transition(
                s,
                gate.parse_rfc_id(self.req.rfc or ""),
                "implemented",
                actor=self.req.actor,
                data={"deployment": self.deployment_id},
            )
        self._finish("succeeded", {"verdicts": [v.to_dict() for v in self.verdicts]})

    def fail(self, verdict: Verdict | None, reason: str) -> str:
        """After a failed milestone: back out, record the evidence, tell the RFC."""
        results = self.back_out()
        stuck = [r for r in results if not r.restored]
        status = "failed" if stuck else "backed-out"
        evidence = {
            "reason": reason,
            "failed_milestone": verdict.to_dict() if verdict else None,
            "backout": [r.to_dict() for r in results],
            "needs_remediation": [
                {"host": r.host, "current": r.current, "error": r.error} for r in stuck
            ],
        }
        with session_scope(self.url) as s:
            lifecycle.transition(
                s,
                gate.parse_rfc_id(self.req.rfc or ""),
                status,
                actor=self.req.actor,
                note=reason,
                data={"deployment": self.deployment_id},
            )
        self._finish(status, evidence)
        return status

    def halt(self, exc: AuthorizationRefused) -> None:
        """The gate refused a later wave: stop at this boundary; earlier waves stay."""
        assert self.executor is not None
        done = [a for i in self.done_waves for a in self.rollout.waves[i - 1].hosts]
        with session_scope(self.url) as s:
            for a in done:
                if self.outcomes.get(a.host) and self.outcomes[a.host].ok:
                    row = s.get(HostBaseline, a.host) or HostBaseline(host=a.host)
                    row.environment, row.release = self.rollout.environment, self.rollout.release
                    row.package_digest, row.deployment_id = self.rollout.digest, self.deployment_id
                    row.recorded_at = utcnow()
                    s.merge(row)
        self._finish(
            "refused", {"reasons": exc.reasons, "halted_before_wave": len(self.done_waves) + 1}
        )

    def _set_status(self, status: str) -> None:
        with session_scope(self.url) as s:
            dep = s.get(Deployment, self.deployment_id)
            assert dep is not None
            dep.status = status

    def _finish(self, status: str, evidence: dict[str, Any]) -> None:
        with session_scope(self.url) as s:
            dep = s.get(Deployment, self.deployment_id)
            assert dep is not None
            dep.status, dep.finished_at = status, utcnow()
            dep.evidence = {**(dep.evidence or {}), **evidence}
            audit.append(
                s,
                actor=self.req.actor,
                action=f"deploy.{status}",
                subject_type="deployment",
                subject_id=dep.id,
                data={"release": dep.release, "rfc": dep.rfc_id, **evidence},
            )

    def _wave_status(
        self, index: int, status: str, *, started: bool = False, verdict: Verdict | None = None
    ) -> None:
        with session_scope(self.url) as s:
            w = s.scalar(
                select(Wave).where(Wave.deployment_id == self.deployment_id, Wave.index == index)
            )
            assert w is not None
            w.status = status
            if started:
                w.started_at = utcnow()
            if verdict is not None:
                w.verdict, w.finished_at = verdict.to_dict(), utcnow()

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()

    # -- the report ------------------------------------------------------------------------
    def report(self, status: str) -> dict[str, Any]:
        ro = self.rollout
        restored = {r.host: r for r in self.backout}
        hosts: dict[str, Any] = {}
        for a in ro.hosts():
            o = self.outcomes.get(a.host)
            prior = a.prior.release if a.prior else None
            if a.host in restored:
                r = restored[a.host]
                state = "backed-out" if r.restored else "needs-remediation"
                release = prior if r.restored else None
            elif o is None:
                state, release = "untouched", prior
            elif o.ok:
                state, release = "deployed", ro.release
            else:
                state, release = "failed", prior
            hosts[a.host] = {"release": release, "status": state}
            if o is not None and not o.ok:
                hosts[a.host]["failure"] = {"step": o.failed_step, "reason": o.reason}
        ex = self.executor
        return {
            "id": self.deployment_id,
            "status": status,
            "release": ro.release,
            "digest": ro.digest,
            "rfc": self.req.rfc,
            "environment": ro.environment,
            "strategy": ro.strategy,
            "waves": [w.names for w in ro.waves],
            "hosts": hosts,
            "milestones": [v.to_dict() for v in self.verdicts],
            "backout": [r.to_dict() for r in self.backout],
            "needs_remediation": [r.host for r in self.backout if not r.restored],
            "bytes_sent": sum(ex.bytes_sent.values()) if ex else 0,
        }


def _names(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" … (+{len(names) - limit})" if len(names) > limit else "")
