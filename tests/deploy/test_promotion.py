"""The release lifecycle on the real fleet: environments in order (dev → qa → live), the
same package digest as the evidence, acceptance tests as part of a deployment, a pilot
wave as evidence, and the user-acceptance sign-off's separation of duties.

One host per environment of the 12-host small fleet: dev = h1, qa = h2, live = h3."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, select

from orchestrator.cms.models import Deployment, ReleaseEvidence
from tests.deploy.helpers import build, cms, deploy, host_release, plan, rid

pytestmark = pytest.mark.fleet

LIFECYCLE = {"promotion": {"qa": {"after": ["dev"]}, "live": {"after": ["qa"], "acceptance": True}}}
ACCEPTANCE = [
    {"name": "runs", "type": "functional", "command": "{{ release_path }}/app/run"},
    {
        "name": "version",
        "type": "operational",
        "command": "grep -qx '{{ version }}' {{ release_path }}/app/VERSION",
    },
]
TARGET = {"dev": "h1", "qa": "h2", "live": "h3", "prod": "h1,h2"}  # h1: the `canary` group
REPO_MODELS = Path(__file__).resolve().parents[2] / "deploy_plans" / "change_models.yaml"


def _organisation(work: Path, lifecycle: dict) -> None:
    """The repo's change models with one more template (dev, qa, live) and a lifecycle."""
    plans = work / "deploy_plans"
    plans.mkdir(exist_ok=True)
    models = yaml.safe_load(REPO_MODELS.read_text())
    models["models"]["standard"]["templates"].append(
        {
            "name": "pipeline",
            "release": "*",
            "environments": ["dev", "qa", "live", "prod"],
            "max_risk": "high",
            "stages": ["plan", "checkin", "deploy"],
        }
    )
    (plans / "change_models.yaml").write_text(yaml.safe_dump(models))
    (plans / "lifecycle.yaml").write_text(yaml.safe_dump(lifecycle))


def _rfc(run_ferry, release: str, env: str) -> str:
    res = run_ferry(
        "rfc", "new", "--release", release, "--env", env, "--model", "standard",
        "--template", "pipeline", "-o", "json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return str(res.json()["id"])


def _plan(work: Path, fleet, env: str, **fields) -> Path:
    base = {"environment": env, "targets": TARGET[env], "strategy": "big-bang", "waves": None}
    return plan(work, fleet, f"{env}.yaml", **{**base, **fields})


def _ship(run_ferry, work, fleet, release: str, env: str, **fields):
    return deploy(
        run_ferry, _plan(work, fleet, env, **fields), release, _rfc(run_ferry, release, env)
    )


def _evidence(release: str, env: str) -> list[tuple[str, str | None, bool, str, int]]:
    return cms(
        lambda s: [
            (r.kind, r.name, r.passed, r.output, r.duration_ms)
            for r in s.scalars(
                select(ReleaseEvidence)
                .where(ReleaseEvidence.release == release, ReleaseEvidence.environment == env)
                .order_by(ReleaseEvidence.id)
            )
        ]
    )


def _untouched(fleet, host: str) -> bool:
    root = fleet.root_dir(host)
    return not root.exists() or list(root.iterdir()) == []


def _deployments() -> int:
    return cms(lambda s: s.scalar(select(func.count()).select_from(Deployment)))


def test_environments_in_order_with_acceptance_tests_as_evidence_on_the_same_digest(
    clean_small, run_ferry
):
    fleet, work = clean_small, Path.cwd()
    _organisation(work, LIFECYCLE)
    build(work, "1.0")

    # live before qa: refused, naming qa, and no host changed
    early = _ship(run_ferry, work, fleet, "shop@1.0", "live")
    assert early.returncode == 3, early.stdout + early.stderr
    assert "has not succeeded in qa" in early.stderr
    assert _untouched(fleet, "h3") and _deployments() == 1

    # dev, then qa with acceptance tests that pass: evidence with output and duration
    assert _ship(run_ferry, work, fleet, "shop@1.0", "dev").returncode == 0
    qa = _ship(run_ferry, work, fleet, "shop@1.0", "qa", acceptance=ACCEPTANCE)
    assert qa.returncode == 0, qa.stderr
    rows = _evidence("shop@1.0", "qa")
    assert [(k, n, ok) for k, n, ok, _o, _d in rows] == [
        ("acceptance", "runs", True),
        ("acceptance", "version", True),
    ]
    assert "shop 1.0" in rows[0][3] and all(d >= 0 for *_x, d in rows)

    # the same digest now goes to live
    live = _ship(run_ferry, work, fleet, "shop@1.0", "live")
    assert live.returncode == 0, live.stderr
    assert host_release(fleet, "h3") == rid("shop@1.0")

    # a rebuilt package under a new version has no evidence: refused in live (deploy and
    # check-in alike) until it passes qa
    build(work, "2.0", extra={"feature.txt": b"new\n"})
    refused = _ship(run_ferry, work, fleet, "shop@2.0", "live")
    assert refused.returncode == 3 and "has not succeeded in qa" in refused.stderr
    checkin = run_ferry(
        "release", "checkin", "shop@2.0", "--rfc", _rfc(run_ferry, "shop@2.0", "live")
    )
    assert checkin.returncode == 3 and "has not succeeded in qa" in checkin.stderr
    assert host_release(fleet, "h3") == rid("shop@1.0")
    assert _ship(run_ferry, work, fleet, "shop@2.0", "dev").returncode == 0
    assert _ship(run_ferry, work, fleet, "shop@2.0", "qa", acceptance=ACCEPTANCE).returncode == 0
    promoted = _ship(run_ferry, work, fleet, "shop@2.0", "live")
    assert promoted.returncode == 0, promoted.stderr
    assert host_release(fleet, "h3") == rid("shop@2.0")

    # ferry release show: per environment, where the digest ran and where it is promotable
    shown = run_ferry("release", "show", "shop@2.0", "-o", "json")
    assert shown.returncode == 0, shown.stderr
    envs = shown.json()["environments"]
    assert list(envs)[:3] == ["dev", "qa", "live"]
    assert [d["status"] for d in envs["qa"]["deployments"]] == ["succeeded"]
    assert envs["qa"]["acceptance"] == {"runs": True, "version": True}
    assert envs["live"]["promotable"] and envs["live"]["succeeded"]
    text = run_ferry("release", "show", "shop@2.0")
    assert "acceptance: runs passed, version passed" in text.stdout
    fresh = run_ferry("release", "show", "shop@1.0", "-o", "json").json()["environments"]
    assert fresh["live"]["promotable"] is True

    # a failing acceptance test (in dev, which has no rule) backs the deployment out and
    # stays on record as evidence; without a success in qa, live stays refused
    build(work, "3.0", extra={"feature.txt": b"newer\n"})
    failing = [*ACCEPTANCE, {"name": "login", "type": "security", "command": "echo denied; false"}]
    bad = _ship(run_ferry, work, fleet, "shop@3.0", "dev", acceptance=failing)
    assert bad.returncode == 4, bad.stdout + bad.stderr
    assert bad.json()["status"] == "backed-out"
    assert host_release(fleet, "h1") == rid("shop@2.0")  # back on its prior baseline
    rows = _evidence("shop@3.0", "dev")
    assert [(n, ok) for _k, n, ok, _o, _d in rows] == [
        ("runs", True),
        ("version", True),
        ("login", False),
    ]
    assert "denied" in rows[2][3]
    qa = _ship(run_ferry, work, fleet, "shop@3.0", "qa")
    assert qa.returncode == 3 and "has not succeeded in dev" in qa.stderr
    assert host_release(fleet, "h2") == rid("shop@2.0")
    shown = run_ferry("release", "show", "shop@3.0", "-o", "json").json()["environments"]
    assert shown["dev"]["failed_acceptance"] == ["login"] and not shown["dev"]["succeeded"]
    assert not shown["qa"]["promotable"] and not shown["live"]["promotable"]


def test_user_acceptance_sign_off_is_refused_to_the_requester(clean_small, run_ferry):
    fleet, work = clean_small, Path.cwd()
    _organisation(work, {"promotion": {"live": {"after": ["qa"], "sign_off": True}}})
    build(work, "1.0")
    unrun = run_ferry("release", "accept", "shop@1.0", "--env", "qa", "--comment", "fine")
    assert unrun.returncode == 3 and "has not succeeded in qa" in unrun.stderr
    assert _ship(run_ferry, work, fleet, "shop@1.0", "qa").returncode == 0
    not_signed = _ship(run_ferry, work, fleet, "shop@1.0", "live")
    assert not_signed.returncode == 3 and "no user-acceptance sign-off in qa" in not_signed.stderr

    own = run_ferry("release", "accept", "shop@1.0", "--env", "qa", "--comment", "looks fine")
    assert own.returncode == 3, own.stdout + own.stderr
    assert "separation of duties" in own.stderr and "Traceback" not in own.stderr
    assert _evidence("shop@1.0", "qa") == []
    history = run_ferry("release", "show", "shop@1.0", "-o", "json").json()["history"]
    assert history[-1]["action"] == "release.accept.refused" and history[-1]["actor"] == "alice"

    bob = run_ferry(
        "release", "accept", "shop@1.0", "--env", "qa", "--comment", "UAT passed", "-o", "json",
        env={"FERRY_USER": "bob"},
    )  # fmt: skip
    assert bob.returncode == 0, bob.stderr
    assert [(k, ok) for k, _n, ok, _o, _d in _evidence("shop@1.0", "qa")] == [("sign-off", True)]
    live = _ship(run_ferry, work, fleet, "shop@1.0", "live")
    assert live.returncode == 0, live.stderr


def test_a_pilot_wave_is_the_evidence_for_after_pilot_and_a_failed_pilot_stops_there(
    clean_small, run_ferry
):
    fleet, work = clean_small, Path.cwd()
    _organisation(work, {"promotion": {"prod": {"after": ["pilot"]}}})
    checks = [{"name": "marker", "type": "functional",
               "command": "test ! -e {{ shared }}/reject-{{ version }}"}]  # fmt: skip
    build(work, "1.0")
    # the dry run shows the pilot wave and each host's rendered acceptance tests
    dry = deploy(
        run_ferry, _plan(work, fleet, "prod", acceptance=checks, pilot="canary"), "shop@1.0",
        None, "--dry-run",
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert dry.json()["waves"] == [["h1"], ["h2"]]
    rendered = dry.json()["hosts"]["h2"]["commands"]["acceptance"][0]
    assert rendered["type"] == "functional" and rendered["target"].endswith("/reject-1.0")
    typo = [{"name": "t", "type": "security", "command": "test -d {{ relase_path }}"}]
    bad = deploy(
        run_ferry, _plan(work, fleet, "prod", acceptance=typo), "shop@1.0", None, "--dry-run"
    )
    assert bad.returncode == 2 and "acceptance[0]" in bad.stderr and "relase_path" in bad.stderr
    unpiloted = _ship(run_ferry, work, fleet, "shop@1.0", "prod", acceptance=checks)
    assert unpiloted.returncode == 3 and "has not passed a pilot wave in prod" in unpiloted.stderr
    piloted = _ship(run_ferry, work, fleet, "shop@1.0", "prod", acceptance=checks, pilot="canary")
    assert piloted.returncode == 0, piloted.stderr
    assert piloted.json()["waves"] == [["h1"], ["h2"]]
    assert ("pilot", "canary", True) in [
        (k, n, ok) for k, n, ok, _o, _d in _evidence("shop@1.0", "prod")
    ]

    # 2.0 fails its pilot's acceptance test on h1: backed out there, h2 never touched
    build(work, "2.0", extra={"feature.txt": b"new\n"})
    (fleet.root_dir("h1") / "shared" / "reject-2.0").write_text("")
    before = _deployments()
    failed = _ship(run_ferry, work, fleet, "shop@2.0", "prod", acceptance=checks, pilot="canary")
    assert failed.returncode == 4, failed.stdout + failed.stderr
    assert _deployments() == before + 1
    assert host_release(fleet, "h1") == rid("shop@1.0")
    assert host_release(fleet, "h2") == rid("shop@1.0")
    assert ("pilot", "canary", False) in [
        (k, n, ok) for k, n, ok, _o, _d in _evidence("shop@2.0", "prod")
    ]


def test_a_bad_lifecycle_file_is_exit_2_before_anything_is_recorded(clean_small, run_ferry):
    fleet, work = clean_small, Path.cwd()
    _organisation(work, {"promotion": {"live": {"after": "qa"}}})
    build(work, "1.0")
    res = _ship(run_ferry, work, fleet, "shop@1.0", "live")
    assert res.returncode == 2, res.stdout + res.stderr
    line = res.stderr.strip()
    assert "lifecycle.yaml: promotion.live.after" in line and "after: [qa]" in line
    assert "Traceback" not in line and _deployments() == 0
