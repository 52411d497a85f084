"""Container release units on hosts: decide what to send, then ask the host's agent.

A release's image units (dml/image.py) are deployed with its files, in the same steps:

    stage     the host says which images (and so which layer chains) its engine holds;
              only the config and the layers it lacks are sent, verified there against
              the signed manifest, and `docker load`ed (bytes recorded in the journal)
    activate  ferry-<unit> is started on the new image (host network); the container it
              replaces is stopped and kept as ferry-<unit>-prior (downtime recorded)
    milestone the container's health command (inside it) joins the plan's checks
    revert    ferry-<unit> goes and ferry-<unit>-prior runs again; the plan's restore hook
              then puts the volume's snapshotted data back, as for files

`attach` and `layers_to_send` are pure decisions; the rest are thin requests.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dml.digest import hex_of
from dml.image import ImageRecord, images_of
from orchestrator.container_plan import ContainerSpec
from orchestrator.errors import SpecError

if TYPE_CHECKING:  # annotations only: `ferry status` imports this module, and stays light
    from orchestrator.hostops import HostOps
    from orchestrator.plan import DeployPlan
    from orchestrator.rollout import Rollout

_MARGIN = 15.0


# -- decisions (pure) ----------------------------------------------------------------------
def attach(rollout: Rollout, plan: DeployPlan, content: dict[str, Any], plan_file: str) -> Rollout:
    """The rollout with each image unit's container spec; a `containers:` entry naming no
    image unit of the release is exit 2, before anything is recorded."""
    images = images_of(content)
    for name in plan.containers:
        if name not in images:
            have = ", ".join(sorted(images)) or "none"
            raise SpecError(
                plan_file,
                f"containers.{name}",
                f"{rollout.release} has no image unit {name!r} (its image units: {have})",
                "name an image unit of the release spec, or remove the entry",
            )
    if not images:
        return rollout
    if plan.method == "pull":  # the files would land and the containers not: never half
        raise SpecError(
            plan_file,
            "method",
            f"{rollout.release} has image units ({', '.join(sorted(images))}); pull agents "
            "do not load images yet",
            "deploy it with method: push",
        )
    specs = {
        name: plan.containers.get(name, ContainerSpec()).record(record.image_id)
        for name, record in images.items()
    }
    return dataclasses.replace(rollout, containers=specs)


def layers_to_send(layers: list[str], engine: dict[str, list[str]]) -> list[str]:
    """The layers a host's engine lacks: a layer is there only on the same chain (its
    predecessors too), so the longest prefix any of its images shares is kept."""
    have = 0
    for other in engine.values():
        n = 0
        for a, b in zip(layers, other, strict=False):
            if a != b:
                break
            n += 1
        have = max(have, n)
    return layers[have:]


# -- acts (over the host's session) --------------------------------------------------------
def _blob_path(package: Any, digest: str) -> Path:
    """Blobs sit next to the package's archive blob in the DML (blobs/sha256/ab/cdef…)."""
    root = Path(package.archive_path).parents[1]
    h = hex_of(digest)
    return root / h[:2] / h[2:]


def stage(ops: HostOps, rollout: Rollout, package: Any) -> dict[str, Any]:
    """Send and load each image the host's engine lacks; only its missing layers cross."""
    records: dict[str, ImageRecord] = images_of(package.content)
    units = sorted(rollout.containers)
    engine = ops.call("stage", "images", units=units)
    held = engine["images"]
    done: dict[str, Any] = {}
    total = 0
    for unit in units:
        record = records[unit]
        if record.image_id in held:
            done[unit] = {"image": record.image_id, "layers_sent": 0, "bytes": 0, "held": True}
            continue
        send = layers_to_send([b.digest for b in record.layers], held)
        paths = [_blob_path(package, record.config.digest)]
        paths += [_blob_path(package, d) for d in send]
        args = {"id": rollout.release_id, "unit": unit, "digest": rollout.digest, "send": send}
        res = ops.session.stream("stage", "image_load", args, paths, timeout=ops.timeout)
        sent = sum(b.size for b in record.layers if b.digest in send)
        total += sent
        done[unit] = {
            "image": res["image"],
            "layers_sent": len(send),
            "layers": len(record.layers),
            "bytes": sent,
        }
        held[record.image_id] = [b.digest for b in record.layers]
    return {"image_bytes_sent": total, "images": done}


def activate(ops: HostOps, rollout: Rollout) -> dict[str, Any]:
    out = {}
    for unit in sorted(rollout.containers):
        spec = rollout.containers[unit]
        out[unit] = ops.call(
            "activate", "container_switch", id=rollout.release_id, unit=unit, container=spec
        )
    return {"containers": out}


def health(ops: HostOps, rollout: Rollout) -> tuple[bool, str]:
    """Every container's health command, run inside it until it passes or times out."""
    evidence = []
    for unit in sorted(rollout.containers):
        spec = rollout.containers[unit]
        timeout = float(spec.get("health_timeout") or 30)
        res = ops.session.request(
            "milestone",
            "container_health",
            {"unit": unit, "command": spec.get("health"), "timeout": timeout},
            timeout=timeout + _MARGIN,
        )
        label = f"container {unit} health"
        if not res["ok"]:
            return False, f"{label}: exit {res['rc']} {res['output'].strip()[-300:]}"
        evidence.append(f"{label}: ok after {res['attempts']} attempt(s)")
    return True, "; ".join(evidence)


def revert(ops: HostOps, rollout: Rollout) -> dict[str, Any]:
    out = {}
    for unit in sorted(rollout.containers):
        out[unit] = ops.call("revert", "container_revert", unit=unit, id=rollout.release_id)
    return {"containers": out}


def set_state(ops: HostOps, rollout: Rollout, action: str) -> dict[str, Any]:
    """Stop or start every unit's container (around a backout's data restore)."""
    return {
        unit: ops.call("restore", "container_state", unit=unit, action=action)
        for unit in sorted(rollout.containers)
    }


def inspect(ops: HostOps, units: list[str]) -> dict[str, Any]:
    """What the host runs: each unit's container (image, running) — for status and drift."""
    return ops.call("readback", "images", units=sorted(units))


def drift(expected: dict[str, str], seen: dict[str, Any]) -> list[str]:
    """Pure: the baseline's image IDs per unit and the host's containers → what differs."""
    problems = []
    for unit, image in sorted(expected.items()):
        c = (seen or {}).get(unit)
        if c is None:
            problems.append(f"container ferry-{unit} is missing (the baseline runs {image[:19]})")
        elif c["image"] != image:
            problems.append(
                f"container ferry-{unit} runs image {c['image'][:19]}, the baseline's is "
                f"{image[:19]}"
            )
        elif not c["running"]:
            problems.append(f"container ferry-{unit} is {c['status']}, not running")
    return problems


def baseline_images(session: Any, digests: set[str]) -> dict[str, dict[str, str]]:
    """package digest → {unit: image ID}, from the CMS package rows' provenance."""
    from sqlalchemy import select

    from orchestrator.cms.models import Package

    if not digests:
        return {}
    out = {}
    for p in session.scalars(select(Package).where(Package.digest.in_(digests))):
        units = (p.provenance or {}).get("units") or {}
        found = {
            u: v["image_id"] for u, v in units.items() if isinstance(v, dict) and v.get("image_id")
        }
        if found:
            out[p.digest] = found
    return out
