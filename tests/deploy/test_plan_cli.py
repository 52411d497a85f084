"""The dry run: Model + Decide only. Stable output, documented in docs/deploy.md; no host,
no CMS record is touched. Needs no fleet (the inventory's addresses are never dialled)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from sqlalchemy import func, select

from orchestrator.cms.models import AuditEvent, Deployment
from tests.deploy.helpers import HOOKS, build, cms

DATA = Path(__file__).parent / "data"


def _plan(work: Path, **extra: object) -> Path:
    import yaml

    doc = {
        "environment": "dev",
        "inventory": str(DATA / "inventory.yaml"),
        "strategy": "phased",
        "waves": [1, "canary", "25%", "rack-a", "100%"],
        "hooks": HOOKS,
        **extra,
    }
    path = work / "plan.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_dry_run_output_is_stable_and_matches_the_documented_golden_file(ferry_home, run_ferry):
    build(ferry_home, "1.0")
    events_before = cms(lambda s: s.scalar(select(func.count()).select_from(AuditEvent)))
    res = run_ferry(
        "deploy", str(_plan(ferry_home)), "--release", "shop@1.0", "--dry-run", "-o", "json"
    )
    assert res.returncode == 0, res.stderr
    golden = json.loads((DATA / "dry_run.golden.json").read_text())
    got = res.json()
    # the plan names its inventory by absolute path, so its hash depends on the checkout
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", got.pop("plan_hash"))
    golden.pop("plan_hash", None)
    assert got == golden
    again = run_ferry(
        "deploy", str(_plan(ferry_home)), "--release", "shop@1.0", "--dry-run", "-o", "json"
    )
    assert again.stdout == res.stdout
    # touches nothing: no deployment, no new audit event
    assert cms(lambda s: s.scalar(select(func.count()).select_from(Deployment))) == 0
    assert cms(lambda s: s.scalar(select(func.count()).select_from(AuditEvent))) == events_before


def test_dry_run_text_shows_every_wave_and_step(ferry_home, run_ferry):
    build(ferry_home, "1.0")
    res = run_ferry("deploy", str(_plan(ferry_home)), "--release", "shop@1.0", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "wave 1: 1 host(s)" in res.stdout
    assert "h1: stage → verify → snapshot → install → activate → check" in res.stdout


def test_plan_errors_name_the_file_and_field_and_exit_2(ferry_home, run_ferry):
    build(ferry_home, "1.0")
    bad = _plan(ferry_home, waves=[1, "50%"])
    res = run_ferry("deploy", str(bad), "--release", "shop@1.0", "--dry-run")
    assert res.returncode == 2
    assert "100%" in res.stderr
    typo = _plan(ferry_home, stratgy="phased")
    res = run_ferry("deploy", str(typo), "--release", "shop@1.0", "--dry-run")
    assert res.returncode == 2
    assert "plan.yaml: stratgy" in res.stderr
    res = run_ferry("deploy", str(_plan(ferry_home)), "--release", "shop@7.7", "--dry-run")
    assert res.returncode == 2, res.stderr
    assert "shop@7.7" in res.stderr
