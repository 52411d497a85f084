"""From a deploy request to a recorded, planned deployment (Model + Decide, then one record).

`prepare` reads every user file and decides the whole Rollout — the plan, the one
inventory resolution, the SSH files, the package (signature and every checksum), the CMS
baselines, every rendered command — and touches nothing: a bad input is an exit 2 here,
before any record is written or any host is dialled, and the dry run stops here too.
`open_deployment` then writes the deployment record that the flow runs from.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import addresses
from orchestrator.change import config, gate
from orchestrator.change.promotion import load_lifecycle
from orchestrator.cms.deployments import DeploymentRecord, host_baselines
from orchestrator.els import els_record
from orchestrator.errors import PlanError, SpecError
from orchestrator.inventory import inventory_path, load_inventory
from orchestrator.plan import load_plan
from orchestrator.planner import plan_rollout
from orchestrator.pullwindow import require_windows
from orchestrator.rollout import Rollout
from orchestrator.settings import Settings


@dataclass(frozen=True)
class DeployRequest:
    plan_path: Path
    release: str
    rfc: str | None
    actor: str
    inventory: Path | None = None
    hosts: str | None = None  # --hosts: narrows the plan's targets, never widens them


@dataclass(frozen=True)
class Prepared:
    request: DeployRequest
    rollout: Rollout
    rfc_id: int | None
    groups: dict[str, list[str]]  # host → its inventory groups (for the host CIs)
    els: dict[str, Any] | None = None  # early life support: period, every, rendered checks
    ci: dict[str, str] | None = None  # the CI job that asked for it (orchestrator.ci)
    notify: dict[str, str] | None = None  # the plan's `notify:` (orchestrator.notify)


def _template_text(src: Path, plan_file: str, index: int) -> str:
    try:
        return src.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(
            plan_file,
            f"config.{index}.src",
            f"{src} is not UTF-8 text (byte {exc.start})",
            "save the template as UTF-8",
        ) from None


def prepare(request: DeployRequest, settings: Settings) -> Prepared:
    from dml.store import DML

    plan_file = str(request.plan_path)
    rfc_id = gate.parse_rfc_id(request.rfc) if request.rfc else None
    plan = load_plan(request.plan_path)
    load_lifecycle()  # a bad lifecycle.yaml is exit 2 here, not a refusal mid-run
    inventory_file = inventory_path(
        override=request.inventory,
        plan_inventory=plan.inventory,
        default=settings.inventory,
        plan_file=plan_file,
    )
    inventory = load_inventory(inventory_file)
    try:
        hosts = inventory.select(plan.targets)
    except PlanError as exc:  # the plan's targets: say which file
        raise PlanError(f"{plan_file}: {exc.message}") from None
    if request.hosts is not None:
        from orchestrator.hostlimit import narrow

        kept = set(narrow([h.name for h in hosts], request.hosts, inventory.groups()))
        hosts = [h for h in hosts if h.name in kept]
    addresses.require_resolvable(hosts, inventory.ssh, inventory_file)
    require_windows(plan, hosts, str(inventory_file), plan_file)  # pull apply: window
    # the gate reads these at the start and before every wave: a bad one is exit 2 now,
    # not an aborted deployment after the record was written
    config.load_change_models()
    config.load_calendar()
    if rfc_id is not None:  # after the files: a bad plan is named first, and no CMS is made
        _require_rfc(settings, rfc_id)
    package = DML.from_settings().open(request.release)  # signature + every checksum
    templates = {t.dest: _template_text(t.src, plan_file, i) for i, t in enumerate(plan.config)}
    rollout = plan_rollout(
        plan,
        hosts,
        inventory.groups(),
        host_baselines(settings.cms_url, [h.name for h in hosts]),
        request.release,
        package.digest,
        ssh=inventory.ssh,
        templates=templates,
        plan_file=plan_file,
        plan_hash=plan_hash(request.plan_path, templates),
    )
    if plan.containers or package.content.get("images"):
        from orchestrator.containers import attach

        rollout = attach(rollout, plan, package.content, plan_file)
    groups = {h.name: list(h.groups) for h in hosts}
    from orchestrator import ci

    notify = plan.notify.model_dump() if plan.notify else None
    return Prepared(
        request,
        rollout,
        rfc_id,
        groups,
        els_record(plan, rollout),
        ci=ci.provenance(),
        notify=notify,
    )


def _require_rfc(settings: Settings, rfc_id: int) -> None:
    """An unknown RFC is bad input, named, before anything is recorded."""
    from orchestrator.cms.db import session_scope
    from orchestrator.cms.models import RFC
    from orchestrator.errors import NotFound

    with session_scope(settings.cms_url) as s:
        if s.get(RFC, rfc_id) is None:
            raise NotFound(
                f"--rfc: RFC-{rfc_id} does not exist (ferry rfc list shows the RFCs)",
                details={"field": "--rfc", "rfc": rfc_id},
            )


def plan_hash(path: Path, templates: dict[str, str]) -> str:
    """The plan as it was deployed: its bytes and its config templates'."""
    h = hashlib.sha256(path.read_bytes())
    for dest in sorted(templates):
        h.update(f"\0{dest}\0".encode() + templates[dest].encode())
    return "sha256:" + h.hexdigest()


def open_deployment(prepared: Prepared, settings: Settings) -> DeploymentRecord:
    """Record the deployment (planned); nothing has touched a host yet."""
    ro = prepared.rollout
    record, _ = DeploymentRecord.open(
        settings.cms_url,
        ro,
        actor=prepared.request.actor,
        rfc_id=prepared.rfc_id,
        # who runs it: `ferry status` and `ferry remediate recover` tell a live run from an
        # interrupted one by this process id on this machine (the flow updates it)
        evidence={
            "runner": runner(),
            **({"els": prepared.els} if prepared.els else {}),
            **({"limit": prepared.request.hosts} if prepared.request.hosts else {}),
            **({"ci": prepared.ci} if prepared.ci else {}),
            **({"notify": prepared.notify} if prepared.notify else {}),
        },
        groups=prepared.groups,
        audit_data={
            "release": ro.release,
            "rfc": prepared.rfc_id,
            "waves": [w.names for w in ro.waves],
            "plan_hash": ro.plan_hash,
        },
    )
    return record


def runner() -> dict[str, object]:
    return {"pid": os.getpid(), "host": socket.gethostname()}
