"""Property-based fuzzing (hypothesis, bounded) of every user-file parser and of the CLI's
argument parsing: any input is accepted, or refused as BadInput (exit 2) with one line
naming the file; never another exception, never a record.

Inputs are drawn two ways: documents built from each format's own keys with values of every
YAML type (so they get past the syntax and into the models' validators), and raw text (so
the YAML/TOML readers see broken syntax, odd bytes, deep nesting, duplicate keys)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dml.spec import load_spec
from orchestrator.change.config import load_calendar, load_change_models
from orchestrator.errors import BadInput, ExitCode, FerryError
from orchestrator.inventory import load_inventory
from orchestrator.plan import load_plan

BUDGET = settings(
    max_examples=int(os.environ.get("FERRY_FUZZ_EXAMPLES", "50")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

KEYS = {
    "plan": [
        "environment", "inventory", "targets", "strategy", "waves", "method", "deploy_root",
        "concurrency", "hooks", "config", "vars", "milestone", "timeouts", "retention",
        "readback", "install", "step", "connect", "soak", "deadline", "max_failed", "checks",
        "command", "http", "tcp", "status", "timeout", "src", "dest",
    ],
    "inventory": [
        "ssh", "hosts", "deploy_root", "user", "identity_file", "known_hosts", "port",
        "connect_timeout", "bulk", "agent", "proxy_jump", "become", "kex", "address", "groups",
        "h1", "h2", "all",
    ],
    "spec": ["name", "version", "units", "description", "app", "source", "git", "ref", "path",
             "include", "exclude", "outside_spec_dir"],
    "models": ["roles", "models", "standard", "normal", "emergency", "templates", "approvals",
               "count", "low", "medium", "high", "lead_time_hours", "risk", "name", "release",
               "environments", "max_risk", "stages", "review_within_days", "bob"],
    "calendar": ["environments", "dev", "prod", "criticality", "windows", "blackouts", "name",
                 "start", "end", "tz", "freeze"],
}  # fmt: skip

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(
        ["0s", "99999999999h", "1.5h", "-1s", "10%", "100%", "/", "/srv/app", "rel", "..",
         "Mon-Fri 08:00-18:00 UTC", "2030-01-01T00:00", "Europe/Berlin", "all", "phased",
         "big-bang", "push", "{{ x }}", "{% for %}", "a;id", "web@1.0", "1.10", "*"]
    ),
)  # fmt: skip


def documents(kind: str) -> st.SearchStrategy[Any]:
    keys = st.sampled_from(KEYS[kind])
    return st.recursive(
        SCALARS,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)
        ),
        max_leaves=20,
    ).filter(lambda d: isinstance(d, dict))


RAW = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.sampled_from(
        ["a: 1\na: 2\n", "[" * 200, "{a: " * 120, "!!python/object:os.system x", "- *x",
         "a: &x [*x]", "? [a, b]\n: c\n", "\x00", "a: b: c", "<<: {a: 1}\n", "a: !!binary QQ=="]
    ),
)  # fmt: skip


def _one_line_refusal(exc: BaseException, path: Path) -> None:
    assert isinstance(exc, BadInput), f"{type(exc).__name__}: {exc}"
    assert exc.exit_code == ExitCode.BAD_INPUT
    assert "\n" not in exc.message, exc.message
    assert str(path) in exc.message or path.name in exc.message, exc.message


LOADERS = {
    "plan": load_plan,
    "inventory": load_inventory,
    "spec": lambda p: load_spec(p),
    "models": load_change_models,
    "calendar": load_calendar,
}


def _try(kind: str, text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{kind}.yaml"
        (Path(tmp) / "src").mkdir()
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            LOADERS[kind](path)
        except FerryError as exc:
            _one_line_refusal(exc, path)


@pytest.mark.parametrize("kind", sorted(LOADERS))
@BUDGET
@given(data=st.data())
def test_any_document_is_loaded_or_refused_in_one_line(kind: str, data) -> None:
    doc = data.draw(documents(kind))
    try:
        text = yaml.safe_dump(doc, allow_unicode=True)
    except (yaml.YAMLError, UnicodeEncodeError):
        return
    _try(kind, text)


@pytest.mark.parametrize("kind", sorted(LOADERS))
@BUDGET
@given(text=RAW)
def test_any_text_is_loaded_or_refused_in_one_line(kind: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return
    _try(kind, text)


TOML = st.one_of(
    st.text(max_size=120),
    st.dictionaries(
        st.sampled_from(["home", "database_url", "retention", "ssh_timeout", "user",
                         "inventory", "command_timeout", "calendar", "bogus"]),
        st.one_of(st.integers(-5, 5), st.text(max_size=10), st.booleans(), st.floats()),
        max_size=4,
    ).map(lambda d: "\n".join(f"{k} = {_toml(v)}" for k, v in d.items())),
)  # fmt: skip


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value).replace("inf", "inf").replace("nan", "nan")


@BUDGET
@given(text=TOML)
@example(text='home="~0"')  # found by this test in CI: `~name` of no user was a traceback
def test_any_ferry_toml_is_loaded_or_refused_in_one_line(text: str, ferry_home, monkeypatch):
    from orchestrator.settings import get_settings, reset_settings

    try:
        (ferry_home / "ferry.toml").write_text(text)
    except UnicodeEncodeError:
        return
    reset_settings()
    try:
        get_settings()
    except FerryError as exc:
        _one_line_refusal(exc, Path("ferry.toml"))
    finally:
        (ferry_home / "ferry.toml").unlink()
        reset_settings()


WORDS = st.sampled_from(
    ["deploy", "remediate", "recover", "backout", "drift", "release", "build", "checkin",
     "show", "rfc", "cms", "verify-audit", "--anchor", "--rfc", "--release", "-r",
     "--wait-lock", "--dry-run", "-o", "json", "text", "--inventory", "--plan", "--force",
     "status", "--limit", "7", "RFC-x", "0", "-1", "#3", "shop@1.0", "plan.yaml", "10m", "0s",
     "99999999999h", "--", "--help-me", "", " ", "../x", "/"]
)  # fmt: skip


@BUDGET
@given(args=st.lists(st.one_of(WORDS, st.text(max_size=12)), min_size=1, max_size=6))
def test_any_command_line_is_run_or_refused_never_an_internal_error(
    args: list[str], ferry_home, capsys
) -> None:
    """Random words to the commands that only read or refuse (never `lab`, whose accepted
    input builds network namespaces): exit 0, 2 or 3, a one-line error, no traceback."""
    from orchestrator.cli.main import main
    from orchestrator.settings import reset_settings

    if args[0] in ("lab", "prefect", "demo"):
        return
    reset_settings()
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    assert code in (0, 2, 3, 5, 6), (args, code, out.err)
    assert "Traceback" not in out.err and "internal error" not in out.err, (args, out.err)
    assert not (ferry_home / ".ferry" / "logs").exists() or not list(
        (ferry_home / ".ferry" / "logs").iterdir()
    ), args
