"""Every expected refusal of every command: its documented exit code, one clear line on
stderr (no traceback), and with `-o json` the error object on stdout.

One table, run in one Ferry home prepared once (a release in the DML, RFCs in each state),
so the whole table costs one set-up; each failing row is reported, not just the first.
Rows run through `orchestrator.cli.main.main` in this process (the entry point `ferry`
runs, minus a fresh interpreter per row: the table would take minutes), and a sample of
them again as the real `ferry` child process. Deployment refusals that need hosts are in
tests/deploy/test_everyday_deploy.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.change.conftest import change_files  # noqa: F401 - the organisation's change models
from tests.conftest import Result
from tests.deploy.helpers import build

PLAN_NO_STRATEGY = {"environment": "dev"}

# argv, exit code, a fragment of the one error line (None: click's usage error, no JSON)
TABLE: list[tuple[list[str], int, str | None]] = [
    # deploy: every bad input before anything is recorded
    (["deploy", "missing.yaml", "-r", "shop@1.0"], 2, "missing.yaml: file not found"),
    (["deploy", "bad-plan.yaml", "-r", "shop@1.0"], 2, "bad-plan.yaml: strategy: Field required"),
    (["deploy", "plan.yaml", "-r", "shop"], 2, "'shop' is not a release"),
    (["deploy", "plan.yaml", "-r", "shop@9.9"], 2, "release shop@9.9 is not in the DML"),
    (["deploy", "plan.yaml", "-r", "shop@1.0", "--rfc", "abc"], 2, "--rfc: 'abc' is not an RFC id"),
    (["deploy", "plan.yaml", "-r", "shop@1.0", "--rfc", "999"], 2, "--rfc: RFC-999 does not exist"),
    (["deploy", "plan.yaml", "-r", "shop@1.0", "--hosts", "nothere"], 2, "'nothere' names none"),
    (["deploy", "plan.yaml"], 2, None),
    # found by rendering or planning, still before anything is recorded; each names the plan
    (
        ["deploy", "plan-http.yaml", "-r", "shop@1.0"],
        2,
        "plan-http.yaml: milestone.checks[0].http: 'not a url' (host h1) is not an http(s) URL",
    ),
    (
        ["deploy", "plan-tcp.yaml", "-r", "shop@1.0"],
        2,
        "plan-tcp.yaml: acceptance[0].address: '!!bad!!' (host h1) is not a host name",
    ),
    (["deploy", "plan-status.yaml", "-r", "shop@1.0"], 2, "status: Input should be less than"),
    (["deploy", "plan-approve0.yaml", "-r", "shop@1.0"], 2, "0s leaves no time to decide"),
    (["deploy", "plan-huge.yaml", "-r", "shop@1.0"], 2, "is longer than a week"),
    (["deploy", "plan-tmpl.yaml", "-r", "shop@1.0"], 2, "plan-tmpl.yaml: config.0.src: "),
    (
        ["deploy", "plan-targets.yaml", "-r", "shop@1.0"],
        2,
        "plan-targets.yaml: targets: 'nosuch' is no group",
    ),
    (
        ["deploy", "plan-waves.yaml", "-r", "shop@1.0"],
        2,
        "plan-waves.yaml: waves: 'nogroup' is neither",
    ),
    # a bad plan is named before the RFC is looked up (and no CMS is made for it)
    (
        ["deploy", "bad-plan.yaml", "-r", "shop@1.0", "--rfc", "999"],
        2,
        "bad-plan.yaml: strategy: Field required",
    ),
    # status
    (["status", "--deployment", "999"], 2, "deployment 999 does not exist"),
    (["status", "--deployment", "abc"], 2, "'abc' is not a deployment id"),
    (["status", "--host", "nope"], 2, "host nope has no baseline"),
    # release
    (["release", "build", "missing.yaml"], 2, "missing.yaml: file not found"),
    (["release", "show", "shop@9.9"], 2, "release shop@9.9 is not registered"),
    (["release", "checkin", "shop@9.9", "--rfc", "1"], 2, "release shop@9.9 is not registered"),
    (["release", "checkin", "shop@1.0", "--rfc", "{draft}"], 3, "does not authorize checkin"),
    (["release", "withdraw", "shop@9.9", "--reason", "x"], 2, "release shop@9.9 is not registered"),
    # dml
    (["dml", "show", "shop@9.9"], 2, "release shop@9.9 is not in the DML"),
    (["dml", "key", "import", "missing.key"], 2, "missing.key does not exist"),
    (["dml", "key", "import", "plan.yaml"], 2, "plan.yaml is not a DML signing key"),
    (["dml", "key", "export", "plan.yaml"], 2, "plan.yaml: already exists"),
    # rfc
    (["rfc", "show", "999"], 2, "RFC-999 does not exist"),
    (["rfc", "show", "abc"], 2, "'abc' is not an RFC id"),
    (["rfc", "submit", "999"], 2, "RFC-999 does not exist"),
    (["rfc", "approve", "999"], 2, "RFC-999 does not exist"),
    (["rfc", "reject", "999"], 2, "RFC-999 does not exist"),
    (["rfc", "cancel", "999"], 2, "RFC-999 does not exist"),
    (["rfc", "close", "999"], 2, "RFC-999 does not exist"),
    (["rfc", "wait", "999", "--timeout", "0"], 2, "RFC-999 does not exist"),
    (["rfc", "new", "--release", "shop@1.0", "--env", "dev", "--model", "bogus"], 2, "--model"),
    (["rfc", "new", "--release", "shop", "--env", "dev", "--model", "normal"], 2, "--release"),
    # ',,' names no host: left as it is, it would mean the whole environment
    (
        [
            "rfc",
            "new",
            "--release",
            "shop@1.0",
            "--env",
            "dev",
            "--model",
            "normal",
            "--hosts",
            ",,",
        ],
        2,
        "--hosts: names no host",
    ),
    (["rfc", "list", "--status", "bogus"], 2, "--status: 'bogus' is not an RFC status"),
    (["rfc", "approve", "{assessed}"], 3, "separation of duties"),
    (["rfc", "approve", "{rejected}"], 3, "rejected"),
    (["rfc", "wait", "{rejected}", "--timeout", "0"], 3, "is rejected (rejected by bob"),
    (["rfc", "wait", "{draft}", "--timeout", "0"], 3, "is still draft after 0 s"),
    # calendar
    (["calendar", "--at", "not-a-date"], 2, "not-a-date"),
    # remediate
    (["remediate", "backout", "999", "--rfc", "1"], 2, "deployment 999 does not exist"),
    (["remediate", "recover", "999"], 2, "deployment 999 does not exist"),
    (["remediate", "drift", "--inventory", "missing.yaml"], 2, "missing.yaml: file not found"),
]


def _prepare(run_ferry, work: Path) -> dict[str, str]:
    build(work, "1.0")
    (work / "bad-plan.yaml").write_text(yaml.safe_dump(PLAN_NO_STRATEGY))
    inv = work / "inventory.yaml"
    for name in ("id_key", "known_hosts"):
        (work / name).write_text("")
    ssh = {"user": "ferry", "identity_file": str(work / "id_key"),
           "known_hosts": str(work / "known_hosts")}  # fmt: skip
    inv.write_text(yaml.safe_dump({"ssh": ssh, "hosts": {"h1": {"address": "198.18.0.1"}}}))
    plan = {"environment": "dev", "inventory": str(inv), "strategy": "big-bang"}
    (work / "plan.yaml").write_text(yaml.safe_dump(plan))
    (work / "tmpl-bad.j2").write_bytes(b"name = caf\xe9\n")  # Latin-1, not UTF-8
    bad_plans = {
        "http": {"milestone": {"checks": [{"http": "not a url"}]}},
        "tcp": {
            "acceptance": [{"name": "port", "type": "functional", "tcp": 80, "address": "!!bad!!"}]
        },  # fmt: skip
        "status": {"milestone": {"checks": [{"http": "http://127.0.0.1/", "status": 99999}]}},
        "approve0": {
            "strategy": "phased",
            "waves": [{"hosts": 1, "approve": True, "timeout": "0s"}, "100%"],
        },
        "huge": {"milestone": {"deadline": 10**400}},
        "tmpl": {"config": [{"src": "tmpl-bad.j2", "dest": "app.toml"}]},
        "targets": {"targets": "nosuch"},
        "waves": {"strategy": "phased", "waves": ["nogroup", "100%"]},
    }
    for name, fields in bad_plans.items():
        (work / f"plan-{name}.yaml").write_text(yaml.safe_dump({**plan, **fields}))
    ids = {}
    for state in ("draft", "assessed", "rejected"):
        r = run_ferry("rfc", "new", "--release", "shop@1.0", "--env", "dev", "--model", "normal",
                      "-o", "json")  # fmt: skip
        assert r.returncode == 0, r.stderr
        ids[state] = str(r.json()["id"])
        if state != "draft":
            assert run_ferry("rfc", "submit", ids[state]).returncode == 0
    bob = {"FERRY_USER": "bob"}
    assert run_ferry("rfc", "reject", ids["rejected"], "-m", "no", env=bob).returncode == 0
    return ids


def _in_process(capsys):
    from orchestrator.cli import main as cli
    from orchestrator.cli import output
    from orchestrator.settings import reset_settings

    def run(*argv: str, env: dict[str, str] | None = None) -> Result:
        assert env is None
        reset_settings()
        output.use(output.Format.text)
        capsys.readouterr()
        try:
            cli.main(list(argv))
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        got = capsys.readouterr()
        return Result(code, got.out, got.err)

    return run


@pytest.mark.usefixtures("change_files")
def test_every_expected_refusal_has_its_exit_code_one_line_and_no_traceback(
    run_ferry, ferry_home, capsys
):
    ids = _prepare(run_ferry, ferry_home)
    wrong = _check(_in_process(capsys), TABLE, ids)
    # the real child process, for a sample of the rows (one per command group)
    seen: set[str] = set()
    sample = [row for row in TABLE if row[0][0] not in seen and not seen.add(row[0][0])]
    wrong += _check(run_ferry, sample, ids)
    # nothing a refusal touched: no deployment was recorded by any of them
    shown = run_ferry("status", "-o", "json").json()
    assert shown["deployments"] == []
    assert not wrong, "\n".join(wrong)


def _check(run, table, ids: dict[str, str]) -> list[str]:
    wrong = []
    for argv, code, fragment in table:
        args = [a.format(**ids) for a in argv]
        r = run(*args, "-o", "json")
        problems = []
        if r.returncode != code:
            problems.append(f"exit {r.returncode}, not {code}")
        if "Traceback" in r.stderr or "internal error" in r.stderr:
            problems.append("a traceback / internal error on stderr")
        if fragment is not None:
            errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
            if len(errors) != 1 or fragment not in errors[0]:
                problems.append(f"error lines {errors!r} lack {fragment!r}")
            try:
                obj = json.loads(r.stdout)
                if obj.get("exit_code") != code or fragment not in obj.get("message", ""):
                    problems.append(f"JSON object {obj!r} is not this error")
            except ValueError:
                problems.append(f"stdout is not one JSON object: {r.stdout[:200]!r}")
        elif "Usage:" not in r.stderr:
            problems.append("no usage line")
        if problems:
            wrong.append(f"ferry {' '.join(args)}: " + "; ".join(problems) + f"\n{r.stderr[-600:]}")
    return wrong


def test_an_empty_cms_url_is_the_default_cms(run_ferry):
    """`FERRY_DATABASE_URL: ${{ secrets.CMS_URL }}` with no such secret sets it empty."""
    r = run_ferry("status", env={"FERRY_DATABASE_URL": ""})
    assert r.returncode == 0 and "error" not in r.stderr, r.stderr


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("garbage", "FERRY_DATABASE_URL: database_url: 'garbage…' is not a CMS URL"),
        ("mysql://u@h/db", "'mysql…' is not a CMS URL"),
        ("postgresql://u:secret@no-such-host.invalid/db", "postgresql://u:***@no-such-host"),
        ("sqlite:////proc/no/such/cms.db", "the CMS at sqlite:////proc/no/such/cms.db cannot"),
        # as SQLAlchemy takes them: lower case, nothing before the scheme
        ("POSTGRESQL://u@h/db", "'POSTGRESQL…' is not a CMS URL"),
        (" sqlite:///x.db", "is not a CMS URL"),
        # a mistyped URL shows its scheme only: the rest may hold the password
        ("postgresql:/u:secret@h/db", "'postgresql…' is not a CMS URL"),
        ("postgresql://u@no-such-host.invalid/db?password=secret", "postgresql://u@no-such"),
    ],
)
def test_a_cms_url_that_cannot_be_a_cms_is_one_line_and_exit_2(run_ferry, url, fragment):
    r = run_ferry("status", env={"FERRY_DATABASE_URL": url})
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 2 and len(errors) == 1 and fragment in errors[0], r.stderr
    assert "secret" not in r.stderr and "internal error" not in r.stderr


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_reader_that_went_away_ends_ferry_quietly_as_sigpipe_would(ferry_home, fmt):
    """`ferry status | head -1`: the pipe's reader left before Ferry wrote. Not an error
    of Ferry's: no message, and 141 as a shell reports a command SIGPIPE ended (click and
    rich made it exit 1, the internal-error code)."""
    import os
    import subprocess

    from tests.conftest import FERRY_BIN

    read, write = os.pipe()
    os.close(read)  # every write now fails with EPIPE (Python ignores SIGPIPE)
    try:
        proc = subprocess.run(
            [str(FERRY_BIN), "status", "-o", fmt], stdout=write, stderr=subprocess.PIPE,
            text=True, timeout=120,
        )  # fmt: skip
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr) == (141, "")


def test_a_key_named_like_a_type_is_kept_in_the_field_path():
    """Union members are dropped from an error's location, not a mapping's keys that
    happen to be called `int` (nor the other keys of that mapping)."""
    from pydantic import BaseModel, ValidationError

    from orchestrator.yamlfile import validation_error

    class M(BaseModel):
        d: dict[str, int]
        w: list[int | str] = []

    try:
        M.model_validate({"d": {"int": "x", "web": "y"}})
    except ValidationError as exc:
        assert (
            validation_error("f.yaml", exc).message.startswith(
                "f.yaml: d.int: Input should be a valid integer"
            )
            and "(and 1 more problem)" in validation_error("f.yaml", exc).message
        )
    try:
        M.model_validate({"d": {}, "w": [[1]]})
    except ValidationError as exc:  # a union's members: one field, no "more problems"
        message = validation_error("f.yaml", exc).message
        assert message.startswith("f.yaml: w.0: ") and "more problem" not in message, message
