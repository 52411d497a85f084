"""Golden cases as data: one YAML file per scenario, inputs in, decisions out.

    cases/planner/*.yaml      plan + hosts + baselines + release → Rollout.to_record()
    cases/backout/*.yaml      journal + priors → backout_actions' steps per host
    cases/remediation/*.yaml  journal + prior + what the host says now → plan_host's verdict

Each file is one pytest case (its id is the file's stem), found by a sorted glob; a
directory with fewer files than `MINIMUM` fails, so an empty glob cannot pass silently.
A file's `expect` is compared with `mismatches` (below): a subset of mappings, exact lists.
A file may carry `xfail: <reason>`: the expectation is what the module's docstring promises
and the code does otherwise today (strict: once the code is fixed, the case must pass).

Planner files:
    plan:       a DeployPlan mapping (validated with the case's directory as base_dir)
    hosts:      [{name, address, port?, groups?, deploy_root?}]  (inventory defaults:
                port 22, no groups, /srv/app); groups are read from the hosts, `all` is all
    baselines:  {host: {release, digest}}  (a host missing has no prior)
    release, digest
    templates:  {file: text} written beside the plan, so `config: [{src: file, dest}]`
                validates; passed to the planner as the deploy does: {dest: text of src}
    expect:     {error: {type, contains}} or a subset of Rollout.to_record()
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.backout import backout_actions
from orchestrator.errors import TransportError
from orchestrator.inventory import Host
from orchestrator.plan import DeployPlan
from orchestrator.planner import Baseline, plan_rollout
from remediation.decisions import plan_host

CASES = Path(__file__).parent / "cases"
MINIMUM = {"planner": 8, "backout": 8, "remediation": 6}
KEYS = {  # (required, optional) top-level keys of a case file: a misspelt key is an error
    "planner": (
        {"plan", "hosts", "release", "digest", "expect"},
        {"baselines", "templates", "xfail"},
    ),
    "backout": ({"journal", "priors", "expect"}, {"xfail"}),
    "remediation": (
        {"journal", "prior", "current", "release_id", "expect"},
        {"host", "keep_data", "xfail"},
    ),
}
HOST_KEYS = {"name", "address", "port", "groups", "deploy_root"}
ABSENT = "<absent>"


# -- the comparison --------------------------------------------------------------------------
def mismatches(expected: Any, actual: Any, where: str = "expect") -> list[str]:
    """Where `actual` departs from `expected` ([]: it matches).

    - A mapping is a subset: every key it gives must be in `actual` with a matching value;
      keys it does not give are not compared. The value "<absent>" says the key must NOT be
      there. An empty mapping `{}` matches only an empty mapping (it would match anything
      otherwise).
    - A list must equal the actual list exactly: same length, same order, every item exact
      (a mapping inside a list must have exactly the same keys, nothing is left out).
    - A scalar must be equal and of the same kind: true is not 1, "1" is not 1, null is
      only null; numbers compare by value (10 matches 10.0).
    """
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{where}: expected a mapping, got {actual!r}"]
        if not expected and actual:
            return [f"{where}: expected an empty mapping, got keys {sorted(actual)}"]
        out = []
        for key, value in expected.items():
            here = f"{where}.{key}"
            if value == ABSENT:
                if key in actual:
                    out.append(f"{here}: expected absent, got {actual[key]!r}")
            elif key not in actual:
                out.append(f"{here}: missing (keys: {sorted(actual)})")
            else:
                out += mismatches(value, actual[key], here)
        return out
    if not _exact(expected, actual):
        return [f"{where}: expected {expected!r}, got {actual!r}"]
    return []


def _exact(expected: Any, actual: Any) -> bool:
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and set(expected) == set(actual)
            and all(_exact(v, actual[k]) for k, v in expected.items())
        )
    if isinstance(expected, list | tuple):
        return (
            isinstance(actual, list | tuple)
            and len(expected) == len(actual)
            and all(_exact(e, a) for e, a in zip(expected, actual, strict=True))
        )
    if _number(expected) and _number(actual):
        return expected == actual
    return type(expected) is type(actual) and expected == actual


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# -- loading ---------------------------------------------------------------------------------
def case_files(area: str) -> list[Path]:
    return sorted((CASES / area).glob("*.yaml"))


def params(area: str) -> list[Any]:
    out = []
    for path in case_files(area):
        case = yaml.safe_load(path.read_text())
        reason = case.get("xfail") if isinstance(case, dict) else None
        marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
        out.append(pytest.param(path, id=path.stem, marks=marks))
    return out


def load(area: str, path: Path) -> dict[str, Any]:
    case = yaml.safe_load(path.read_text())
    assert isinstance(case, dict), f"{path.name}: a case is a mapping"
    required, optional = KEYS[area]
    assert not required - set(case), f"{path.name}: missing {sorted(required - set(case))}"
    unknown = set(case) - required - optional
    assert not unknown, f"{path.name}: unknown keys {sorted(unknown)}"
    assert case["expect"], f"{path.name}: an empty expect would pass on any output"
    return case


def check(case: dict[str, Any], run: Callable[[], Any]) -> None:
    """Run and compare: either the error expected, or the output's subset."""
    expect = case["expect"]
    if "error" in expect:
        assert set(expect) == {"error"}, "an error case expects nothing else"
        try:
            output = run()
        except Exception as exc:  # the type is compared by name, as the case spells it
            raised = exc
        else:
            pytest.fail(f"expected {expect['error']}, got no error but {output!r:.300}")
        error = expect["error"]
        assert type(raised).__name__ == error["type"], repr(raised)
        contains = [error["contains"]] if isinstance(error["contains"], str) else error["contains"]
        assert contains and all(contains), "an error case names what its message must say"
        for text in contains:
            assert text in str(raised), f"{text!r} not in {str(raised)!r}"
        return
    problems = mismatches(expect, run())
    assert not problems, "\n".join(problems)


def baseline(data: dict[str, str] | None) -> Baseline | None:
    return None if data is None else Baseline(data["release"], data["digest"])


# -- the cases -------------------------------------------------------------------------------
@pytest.mark.parametrize("area", sorted(MINIMUM))
def test_each_case_directory_holds_enough_cases(area: str) -> None:
    assert len(case_files(area)) >= MINIMUM[area], f"cases/{area}/ holds too few files"


@pytest.mark.parametrize("path", params("planner"))
def test_planner(path: Path, tmp_path: Path) -> None:
    case = load("planner", path)

    def run() -> dict[str, Any]:
        for name, text in (case.get("templates") or {}).items():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(text)
        plan = DeployPlan.model_validate(case["plan"], context={"base_dir": tmp_path})
        hosts = []
        for h in case["hosts"]:
            assert set(h) <= HOST_KEYS, f"host keys {sorted(set(h) - HOST_KEYS)}"
            hosts.append(Host(**{"port": 22, "groups": (), "deploy_root": "/srv/app", **h}))
        groups: dict[str, list[str]] = {"all": [h.name for h in hosts]}
        for h in hosts:
            for g in h.groups:
                groups.setdefault(g, []).append(h.name)
        baselines = {h: baseline(b) for h, b in (case.get("baselines") or {}).items()}
        templates = {t.dest: t.src.read_text() for t in plan.config}  # as the deploy reads them
        rollout = plan_rollout(
            plan,
            hosts,
            groups,
            baselines,
            case["release"],
            case["digest"],
            templates=templates,
            plan_file="deploy.yaml",
        )
        return rollout.to_record()

    check(case, run)


@pytest.mark.parametrize("path", params("backout"))
def test_backout(path: Path) -> None:
    case = load("backout", path)
    priors = {h: baseline(b) for h, b in case["priors"].items()}

    def run() -> dict[str, list[str]]:
        actions = backout_actions(case["journal"], priors)
        for a in actions:  # each host returns to ITS prior
            assert a.prior == priors.get(a.host), a
        actual = {a.host: list(a.steps) for a in actions}
        # every host is expected: the whole mapping is compared, not a subset of it
        assert set(actual) == set(case["expect"]), f"hosts {sorted(actual)}"
        return actual

    check(case, run)


@pytest.mark.parametrize("path", params("remediation"))
def test_remediation(path: Path) -> None:
    case = load("remediation", path)
    host = case.get("host", "h1")
    current = case["current"]
    if isinstance(current, dict):  # {unreachable: message}: the host did not answer
        current = TransportError(host, current["unreachable"])

    def run() -> dict[str, Any]:
        p = plan_host(
            host,
            case["journal"],
            baseline(case["prior"]),
            current,
            case["release_id"],
            keep_data=case.get("keep_data", False),
        )
        return {
            "verdict": p.verdict,
            "steps": list(p.steps),
            "current": p.current,
            "prior_id": p.prior_id,
            "note": p.note,
        }

    check(case, run)


# -- the comparison can fail -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("expected", "actual", "ok"),
    [
        ({"a": 1}, {"a": 1, "b": 2}, True),  # a subset
        ({"a": 1}, {"a": 2}, False),
        ({"a": 1}, {"b": 1}, False),  # a key missing
        ({"a": ABSENT}, {"b": 1}, True),
        ({"a": ABSENT}, {"a": None}, False),
        ({}, {}, True),
        ({}, {"a": 1}, False),  # {} is not "anything"
        ({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}, True),  # nested subset
        ({"a": [1, 2]}, {"a": [1, 2, 3]}, False),  # lists are exact
        ({"a": [1, 2]}, {"a": [2, 1]}, False),
        ({"a": [{"b": 1}]}, {"a": [{"b": 1, "c": 2}]}, False),  # mappings in lists too
        ({"a": [{"b": 1}]}, {"a": [{"b": 1}]}, True),
        ({"a": None}, {"a": "x"}, False),
        ({"a": "x"}, {"a": None}, False),
        ({"a": 1}, {"a": True}, False),
        ({"a": "1"}, {"a": 1}, False),
        ({"a": 10}, {"a": 10.0}, True),
        ({"a": [1]}, {"a": "1"}, False),
        ({"a": {"b": 1}}, {"a": [1]}, False),
    ],
)
def test_the_comparison_fails_on_what_it_must(expected: Any, actual: Any, ok: bool) -> None:
    assert (mismatches(expected, actual) == []) is ok
