"""The release lifecycle as data: lifecycle.yaml's validation, the promotion decision, the
acceptance verdict, the sign-off's separation of duties and the service validation KPIs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from orchestrator.acceptance import AcceptanceResult, acceptance_verdict
from orchestrator.change.promotion import (
    EnvironmentEvidence,
    Lifecycle,
    lifecycle_path,
    load_lifecycle,
    missing,
)
from orchestrator.change.release_evidence import sign_off_refusals
from orchestrator.change.validation import (
    AcceptanceFact,
    DeploymentFact,
    escaped_defects,
    pass_rates,
)
from orchestrator.errors import SpecError

DIGEST = "sha256:" + "ab" * 32
LIFECYCLE = Lifecycle.model_validate(
    {"promotion": {"qa": {"after": ["dev"]}, "live": {"after": ["qa"], "acceptance": True}}}
)


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lifecycle.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("promotion:\n  qa: {aftr: [dev]}\n", "promotion.qa.aftr", "remove it"),
        ("promotion:\n  qa: {after: dev}\n", "promotion.qa.after", "after: [dev]"),
        ("promotion:\n  qa: {after: [qa]}\n", "(top level)", "cannot come after itself"),
        (
            "promotion:\n  qa: {after: [live]}\n  live: {after: [qa]}\n",
            "(top level)",
            "qa → live → qa is a cycle",
        ),
        ("promotion:\n  live: {acceptance: true}\n", "promotion.live", "name it in after"),
        ("promotion:\n  pilot: {after: [qa]}\n", "(top level)", "rename the environment"),
        ("promotion: [qa, live]\n", "promotion", "dictionary"),
    ],
)
def test_a_bad_lifecycle_names_the_file_the_field_and_the_fix(tmp_path, text, field, words):
    path = _file(tmp_path, text)
    with pytest.raises(SpecError) as caught:
        load_lifecycle(path)
    message = caught.value.message
    assert message.startswith(f"{path}: {field}: "), message
    assert words in message
    assert "\n" not in message


def test_the_lifecycle_is_found_like_the_change_models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FERRY_LIFECYCLE", raising=False)
    assert lifecycle_path() is None and load_lifecycle() == Lifecycle()  # no rules at all
    (tmp_path / "deploy_plans").mkdir()
    local = _file(tmp_path / "deploy_plans", "promotion:\n  live: {after: [qa]}\n")
    assert lifecycle_path() == local
    assert load_lifecycle().rule("live").after == ("qa",)
    named = tmp_path / "mine.yaml"
    named.write_text("promotion: {}\n")
    monkeypatch.setenv("FERRY_LIFECYCLE", str(named))
    assert lifecycle_path() == named and load_lifecycle().promotion == {}
    monkeypatch.setenv("FERRY_LIFECYCLE", str(tmp_path / "gone.yaml"))
    with pytest.raises(SpecError, match="gone.yaml: file not found .check FERRY_LIFECYCLE"):
        lifecycle_path()


def test_environments_are_listed_earliest_first():
    assert LIFECYCLE.environments == ["dev", "qa", "live"]


def _ev(env, *statuses, acceptance=None, sign_offs=(), pilot=False, requesters=()):
    return EnvironmentEvidence(
        env,
        tuple((i + 1, s) for i, s in enumerate(statuses)),
        acceptance or {},
        (),
        tuple(sign_offs),
        pilot,
        tuple(requesters),
    )


def test_live_before_qa_names_qa_and_an_unruled_environment_is_unrestricted():
    why = missing(LIFECYCLE, "live", DIGEST, {})
    assert len(why) == 1 and "has not succeeded in qa" in why[0] and "abababababab" in why[0]
    assert missing(LIFECYCLE, "dev", DIGEST, {}) == []
    assert missing(LIFECYCLE, "staging", DIGEST, {}) == []
    # what already succeeded in live (a backout's prior baseline, say) is no promotion
    assert missing(LIFECYCLE, "live", DIGEST, {"live": _ev("live", "succeeded")}) == []
    # a deployment that was backed out is no evidence
    assert (
        "not succeeded in qa"
        in missing(LIFECYCLE, "live", DIGEST, {"qa": _ev("qa", "backed-out")})[0]
    )


def test_live_needs_passed_acceptance_tests_from_the_qa_success():
    none = missing(LIFECYCLE, "live", DIGEST, {"qa": _ev("qa", "succeeded")})
    assert none and "no passed acceptance tests in qa" in none[0]
    failed = {"qa": _ev("qa", "succeeded", acceptance={"smoke": True, "load": False})}
    assert missing(LIFECYCLE, "live", DIGEST, failed) == [
        "promotion to live: package abababababab failed acceptance tests in qa: load"
    ]
    good = {"qa": _ev("qa", "succeeded", acceptance={"smoke": True})}
    assert missing(LIFECYCLE, "live", DIGEST, good) == []
    # qa itself only needs dev
    assert "not succeeded in dev" in missing(LIFECYCLE, "qa", DIGEST, {})[0]
    assert missing(LIFECYCLE, "qa", DIGEST, {"dev": _ev("dev", "failed", "succeeded")}) == []


def test_sign_off_and_pilot_rules():
    rules = Lifecycle.model_validate(
        {"promotion": {"live": {"after": ["qa", "pilot"], "sign_off": True}}}
    )
    qa = _ev("qa", "succeeded")
    why = missing(rules, "live", DIGEST, {"qa": qa})
    assert any("user-acceptance sign-off in qa" in w for w in why)
    assert any("pilot wave in live" in w for w in why)
    # a plan with a pilot defers that requirement to wave 2's gate
    signed = {"qa": _ev("qa", "succeeded", sign_offs=["bob"])}
    assert missing(rules, "live", DIGEST, signed, deferred=("pilot",)) == []
    assert missing(rules, "live", DIGEST, signed) != []
    piloted = {**signed, "live": _ev("live", "backed-out", pilot=True)}
    assert missing(rules, "live", DIGEST, piloted) == []


def test_the_requester_may_not_sign_off_and_nobody_signs_off_what_never_ran():
    ev = _ev("qa", "succeeded", requesters=["alice"])
    assert "separation of duties" in sign_off_refusals("alice", "qa", ev)[0]
    assert sign_off_refusals("bob", "qa", ev) == []
    assert "has not succeeded in qa" in sign_off_refusals("bob", "qa", None)[0]
    assert sign_off_refusals("bob", "qa", _ev("qa", "backed-out")) != []


def test_one_failed_acceptance_test_on_one_host_fails_the_verdict():
    ok = [AcceptanceResult(h, "smoke", "functional", True, "exit 0", 0.1) for h in ("h1", "h2")]
    assert acceptance_verdict(3, ok).passed
    assert acceptance_verdict(3, []).passed
    bad = [*ok, AcceptanceResult("h2", "load", "performance", False, "load: exit 1 slow", 0.2)]
    verdict = acceptance_verdict(3, bad)
    assert not verdict.passed and verdict.failed == ("h2",) and verdict.wave == 3
    assert "acceptance tests failed: load" in verdict.reason and "slow" in verdict.reason


T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def test_an_escaped_defect_is_a_backout_after_acceptance_passed_in_an_earlier_environment():
    other = "sha256:" + "cd" * 32
    deployments = [
        DeploymentFact(1, "shop@1", DIGEST, "qa", "succeeded", _at(1)),
        DeploymentFact(2, "shop@1", DIGEST, "live", "backed-out", _at(5)),
        DeploymentFact(3, "shop@2", other, "qa", "succeeded", _at(6)),
        DeploymentFact(4, "shop@2", other, "live", "succeeded", _at(8)),
        DeploymentFact(5, "shop@3", "sha256:ee", "qa", "backed-out", _at(9)),  # caught in qa
    ]
    results = [
        AcceptanceFact(1, "shop@1", DIGEST, "qa", "smoke", "functional", True, _at(1)),
        AcceptanceFact(3, "shop@2", other, "qa", "smoke", "functional", True, _at(6)),
        AcceptanceFact(5, "shop@3", "sha256:ee", "qa", "smoke", "functional", False, _at(9)),
    ]
    found = escaped_defects(deployments, results)
    assert [(d.deployment_id, d.environment, d.passed_in) for d in found] == [(2, "live", ("qa",))]
    # the same backout *before* the acceptance passed elsewhere did not escape it
    early = [DeploymentFact(2, "shop@1", DIGEST, "live", "backed-out", _at(0))]
    assert escaped_defects(early, results) == []
    # a partly failed acceptance run is no pass
    partly = [
        *results,
        AcceptanceFact(1, "shop@1", DIGEST, "qa", "load", "performance", False, _at(1)),
    ]
    assert escaped_defects(deployments, partly) == []


def test_pass_rate_per_test_type():
    results = [
        AcceptanceFact(1, "a@1", DIGEST, "qa", "smoke", "functional", True, T0),
        AcceptanceFact(1, "a@1", DIGEST, "qa", "api", "functional", False, T0),
        AcceptanceFact(2, "a@1", DIGEST, "qa", "smoke", "functional", True, T0),
        AcceptanceFact(2, "a@1", DIGEST, "qa", "tls", "security", True, T0),
    ]
    rates = pass_rates(results)
    assert (rates["functional"].passed, rates["functional"].total) == (2, 3)
    assert rates["functional"].rate == pytest.approx(2 / 3)
    assert rates["security"].rate == 1.0
    assert rates["performance"].total == 0 and rates["performance"].rate is None
    assert set(rates) >= {"functional", "performance", "security", "operational", "user-acceptance"}


def _plan(**fields):
    from orchestrator.plan import DeployPlan

    return DeployPlan.model_validate({"environment": "live", **fields})


def test_a_pilot_group_is_wave_one_and_the_plan_waves_continue_with_the_rest():
    from orchestrator.planner import split_waves

    names = ["h1", "h2", "h3", "h4", "h5"]
    groups = {"canary": ["h1", "h4"], "web": names}
    big = _plan(strategy="big-bang", pilot="canary")
    assert split_waves(big, names, groups)[0] == [["h1", "h4"], ["h2", "h3", "h5"]]
    phased = _plan(strategy="phased", waves=[3, "100%"], pilot="canary")
    assert split_waves(phased, names, groups)[0] == [["h1", "h4"], ["h2"], ["h3", "h5"]]


@pytest.mark.parametrize(
    ("pilot", "words"),
    [("nope", "is not a group of the inventory"), ("empty", "has no host among the targets"),
     ("web", "holds every target")],
)  # fmt: skip
def test_a_pilot_that_is_no_part_of_the_targets_is_a_plan_error(pilot, words):
    from orchestrator.errors import PlanError
    from orchestrator.planner import split_waves

    groups = {"web": ["h1", "h2"], "empty": ["h9"]}
    with pytest.raises(PlanError, match=words):
        split_waves(_plan(strategy="big-bang", pilot=pilot), ["h1", "h2"], groups)


def test_acceptance_tests_are_typed_named_once_and_of_one_kind():
    from pydantic import ValidationError

    ok = {"name": "smoke", "type": "functional", "tcp": 80}
    assert _plan(strategy="big-bang", acceptance=[ok]).acceptance[0].type == "functional"
    for bad, words in [
        ({**ok, "type": "vibes"}, "functional"),
        ({"type": "security", "tcp": 80}, "name"),
        ({**ok, "command": "true"}, "exactly one of"),
    ]:
        with pytest.raises(ValidationError, match=words):
            _plan(strategy="big-bang", acceptance=[bad])
    with pytest.raises(ValidationError, match="smoke used twice"):
        _plan(strategy="big-bang", acceptance=[ok, ok])
