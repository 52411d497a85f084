"""Drift audit: do the hosts still run what the CMS says they run?

For each host with a HostBaseline (optionally of one environment) Ferry connects, asks the
agent for a read-back of `current` and its files, and compares with the baseline:

    ok          current is the baseline's release and its files match the signed manifest
    drifted     current is another release (or none): someone switched it by hand
    tampered    current is right but files differ from the manifest (sizes always checked;
                every sha256 re-hashed with --full)
    unreachable the host did not answer (or its agent failed: the error is named)
    unmanaged   in the inventory, but the CMS records no baseline for it (not contacted)

Exit codes: 0 every managed host ok; 5 some host drifted or unreachable; 6 some host's
files differ from the manifest (integrity first: 6 wins over 5). Read-only: the audit
changes nothing on hosts (it may place Ferry's own agent under <root>/.ferry/) and writes
one audit event with the summary.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import desc, select

from orchestrator.cms import audit
from orchestrator.cms.db import session_scope
from orchestrator.cms.deployments import deploy_roots
from orchestrator.cms.models import Deployment, HostBaseline, utcnow
from orchestrator.errors import ExitCode, StepFailed, TransportError
from orchestrator.hostops import HostOps
from orchestrator.inventory import Inventory, inventory_path, load_inventory
from orchestrator.plan import load_plan
from orchestrator.planner import release_id
from orchestrator.settings import Settings
from remediation.decisions import drift_next_step

Progress = Callable[[str], None]
STATES = ("ok", "drifted", "tampered", "unreachable", "unmanaged")


@dataclass(frozen=True)
class HostDrift:
    host: str
    state: str
    expected: str | None = None  # the baseline's release id
    release: str | None = None  # the baseline's release (name@version)
    current: str | None = None
    detail: str = ""
    listed: bool = True  # in the inventory the audit was given (else it was not asked)

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "state": self.state,
            "release": self.release,
            "expected": self.expected,
            "current": self.current,
            "detail": self.detail,
            "next": next_step(self),
        }


def next_step(h: HostDrift) -> str | None:
    """What on-call does about a host in this state (docs/remediation.md), or None."""
    return drift_next_step(h.state, h.release, h.listed)


def exit_code(hosts: list[HostDrift]) -> int:
    states = {h.state for h in hosts}
    if "tampered" in states:
        return int(ExitCode.INTEGRITY)
    if states & {"drifted", "unreachable"}:
        return int(ExitCode.BACKOUT_INCOMPLETE)
    return int(ExitCode.OK)


def judge(host: str, expected: str, release: str, back: dict[str, Any]) -> HostDrift:
    """Pure: a baseline and the agent's read-back → the host's state."""
    current = back.get("current")
    modified = [a["file"] for a in back.get("agents", []) if a.get("modified")]
    if modified:
        return HostDrift(
            host,
            "tampered",
            expected,
            release,
            current,
            f"agent file {', '.join(modified)} was modified on the host (its content no longer "
            "has the hash in its name); Ferry never runs it, but whoever changed it had write "
            "access to the deploy root: investigate, then remove it",
        )
    if current != expected:
        return HostDrift(
            host,
            "drifted",
            expected,
            release,
            current,
            f"current is {current or 'unset'}, the CMS baseline is {expected} ({release})",
        )
    if not back.get("ok"):
        bad = back.get("mismatches", [])
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        return HostDrift(host, "tampered", expected, release, current, "; ".join(bad[:3]) + more)
    return HostDrift(
        host, "ok", expected, release, current, f"{back.get('files', 0)} file(s) match"
    )


def audit_drift(
    settings: Settings,
    *,
    environment: str | None,
    inventory_path: Path | None,
    full: bool,
    progress: Progress,
) -> dict[str, Any]:
    url = settings.cms_url
    started = utcnow()  # what the audit judged is the baselines as of now (ferry status)
    with session_scope(url) as s:
        q = select(HostBaseline)
        if environment:
            q = q.where(HostBaseline.environment == environment)
        rows = list(s.scalars(q))
        baselines = {b.host: (b.release, release_id(b.release, b.package_digest)) for b in rows}
        digests = {b.host: b.package_digest for b in rows}
        from orchestrator import containers

        images = containers.baseline_images(s, set(digests.values()))
    inventory = _inventory(settings, url, inventory_path, environment)
    roots = deploy_roots(url, list(baselines))
    managed = [h for h in baselines if h in inventory.hosts]
    progress(
        f"auditing {len(managed)} host(s) against the CMS"
        + (f" ({environment})" if environment else "")
        + (", re-hashing every file" if full else ", quick read-back (sizes)")
    )

    def one(name: str) -> HostDrift:
        release, expected = baselines[name]
        host = inventory.host(name)
        ops = HostOps.open(
            host,
            inventory.ssh,
            roots.get(name) or host.deploy_root,
            timeout=settings.command_timeout,
            connect_timeout=inventory.ssh.connect_timeout,
        )
        try:
            back = ops.readback(expected, full, rehash=full, digest=digests.get(name))
            verdict = judge(name, expected, release, back)
            want = images.get(digests.get(name) or "")
            if verdict.state == "ok" and want:
                seen = containers.inspect(ops, list(want))["containers"]
                if problems := containers.drift(want, seen):
                    verdict = HostDrift(
                        name, "drifted", expected, release, back.get("current"), "; ".join(problems)
                    )
            return verdict
        except TransportError as exc:
            why = exc.reason.removeprefix("unreachable: ")
            return HostDrift(name, "unreachable", expected, release, None, why)
        except StepFailed as exc:
            return HostDrift(name, "unreachable", expected, release, None, f"agent: {exc.reason}")
        finally:
            ops.close()

    results: list[HostDrift] = []
    if managed:
        with ThreadPoolExecutor(max_workers=min(20, len(managed))) as pool:
            results = list(pool.map(one, managed))
    for name in baselines:
        if name not in inventory.hosts:
            release, expected = baselines[name]
            results.append(
                HostDrift(
                    name,
                    "unreachable",
                    expected,
                    release,
                    None,
                    "not in the inventory given",
                    listed=False,
                )
            )
    scope = set(environment_hosts(inventory, url, environment)) if environment else None
    for name in inventory.hosts:
        if name not in baselines and (scope is None or name in scope):
            results.append(HostDrift(name, "unmanaged", detail="no baseline in the CMS"))
    for r in results:
        if r.state != "ok":
            progress(f"  {r.host}: {r.state}: {r.detail}")
    counts = {state: sum(r.state == state for r in results) for state in STATES}
    code = exit_code(results)
    with session_scope(url) as s:
        audit.append(
            s,
            actor=settings.actor,
            action="remediate.drift",
            subject_type="environment",
            subject_id=environment or "*",
            data={
                "started": started.isoformat(),
                "counts": counts,
                "full": full,
                "not_ok": {r.host: r.state for r in results if r.state not in ("ok", "unmanaged")},
                "unlisted": sorted(r.host for r in results if not r.listed),
            },
        )
    return {
        "environment": environment,
        "full": full,
        "counts": counts,
        "exit_code": code,
        "hosts": {r.host: r.to_dict() for r in results},
    }


def environment_hosts(inventory: Inventory, url: str, environment: str | None) -> list[str]:
    """Inventory hosts that belong to `environment`: its CIs, else every inventory host."""
    from orchestrator.cms.models import Host as HostCI

    with session_scope(url) as s:
        cis = {c.name: c.environment for c in s.scalars(select(HostCI))}
    return [h for h in inventory.hosts if cis.get(h, environment) == environment]


def _inventory(
    settings: Settings, url: str, override: Path | None, environment: str | None
) -> Inventory:
    """The one order (`orchestrator.inventory.inventory_path`): --inventory, the plan's
    `inventory:` (the newest deployment's plan that still exists), then FERRY_INVENTORY."""
    plan_inventory = None
    if override is None:
        with session_scope(url) as s:
            q = select(Deployment.plan_file).order_by(desc(Deployment.id)).limit(50)
            if environment:
                q = q.where(Deployment.environment == environment)
            plan_files = list(s.scalars(q))
        for plan_file in plan_files:
            path = Path(plan_file)
            if path.is_file():
                plan_inventory = load_plan(path).inventory
                if plan_inventory is not None:
                    break
    path = inventory_path(
        override=override,
        plan_inventory=plan_inventory,
        default=settings.inventory,
        plan_file="drift audit",
    )
    return load_inventory(path)
