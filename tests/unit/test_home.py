"""Finding the project like git, settings errors as file + field, --version, completion."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator import home
from tests.conftest import FERRY_BIN


@pytest.fixture
def project(ferry_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project directory with no FERRY_HOME: Ferry must find its home by itself."""
    monkeypatch.delenv("FERRY_HOME")
    return ferry_home


def test_discovery_finds_the_nearest_ferry_toml_or_home_upwards(tmp_path):
    top = tmp_path / "repo"
    (top / "deploy_plans" / "deep").mkdir(parents=True)
    (top / "ferry.toml").write_text('home = "state"\n')
    found = home.discover(top / "deploy_plans" / "deep")
    assert (found.root, found.config, found.found_by) == (top, top / "ferry.toml", "ferry.toml")
    assert home.home_of(found) == top / "state"
    (top / "deploy_plans" / ".ferry").mkdir()
    assert home.discover(top / "deploy_plans" / "deep").root == top / "deploy_plans"
    assert home.discover(tmp_path).found_by == "cwd"


def test_a_command_in_a_subdirectory_uses_the_projects_cms(project, run_ferry):
    assert run_ferry("rfc", "new", "--release", "shop@1.0", "--env", "dev", "--model",
                     "normal").returncode == 0  # fmt: skip
    sub = project / "deploy_plans" / "shop"
    sub.mkdir(parents=True)
    os.chdir(sub)
    r = run_ferry("rfc", "list", "-o", "json")
    assert r.returncode == 0, r.stderr
    assert [x["id"] for x in r.json()["rfcs"]] == [1]
    assert not (sub / ".ferry").exists()  # no second, empty CMS


def test_relative_paths_of_ferry_toml_are_read_from_its_directory(project, run_ferry):
    (project / "ferry.toml").write_text('home = "state"\n')
    (project / "sub").mkdir()
    os.chdir(project / "sub")
    assert run_ferry("rfc", "list").returncode == 0
    assert (project / "state" / "cms.db").is_file() and not (project / "sub" / "state").exists()


def test_making_a_new_cms_below_a_project_that_has_one_says_so(project, run_ferry):
    assert run_ferry("rfc", "list").returncode == 0  # the project's CMS, made here
    inner = project / "other"
    inner.mkdir()
    (inner / "ferry.toml").write_text('user = "alice"\n')
    os.chdir(inner)
    r = run_ferry("rfc", "list")
    assert r.returncode == 0
    assert f"making a new CMS at {inner / '.ferry' / 'cms.db'}" in r.stderr
    assert str(project / ".ferry" / "cms.db") in r.stderr and "FERRY_HOME" in r.stderr
    again = run_ferry("rfc", "list")  # it exists now: said once, when it was made
    assert "warning" not in again.stderr


def test_ferry_home_overrides_discovery(project, run_ferry, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    r = run_ferry("rfc", "list", env={"FERRY_HOME": str(elsewhere)})
    assert r.returncode == 0 and (elsewhere / "cms.db").is_file()
    assert not (project / ".ferry").exists()


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('hme = "x"\n', "ferry.toml: hme: unknown setting (did you mean 'home'?)"),
        ("ssh_timeout = -1\n", "ferry.toml: ssh_timeout: Input should be greater than 0"),
        ("home = [\n", "ferry.toml: not valid TOML"),
    ],
)
def test_a_bad_ferry_toml_is_exit_2_naming_file_and_field(project, run_ferry, toml, expected):
    (project / "ferry.toml").write_text(toml)
    r = run_ferry("rfc", "list", "-o", "json")
    assert r.returncode == 2, r.stderr
    assert expected in r.stderr and str(project / "ferry.toml") in r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    assert r.json()["error"] == "SpecError"
    assert not (project / ".ferry").exists()  # nothing made


def test_a_bad_setting_from_the_environment_names_the_variable(project, run_ferry):
    r = run_ferry("rfc", "list", env={"FERRY_RETENTION": "zero"})
    assert r.returncode == 2 and "FERRY_RETENTION: retention:" in r.stderr


def test_version_and_shell_completion(run_ferry):
    r = run_ferry("--version")
    assert r.returncode == 0 and r.stdout.startswith("ferry 0.")
    done = run_ferry(env={"_FERRY_COMPLETE": "complete_bash", "COMP_WORDS": "ferry rfc wa",
                          "COMP_CWORD": "2"})  # fmt: skip
    assert done.returncode == 0 and done.stdout.split() == ["wait"]
    script = run_ferry("--show-completion", env={"SHELL": "/bin/bash"})
    assert script.returncode == 0 and "_FERRY_COMPLETE=complete_bash" in script.stdout


# runs `ferry --show-completion` in a grandchild whose parent has exited: adopted by init, it
# has no shell among its parents (as under make, a CI runner or a detached job)
ORPHAN = """\
import os, subprocess, sys
if os.fork():
    os._exit(0)
os.setsid()
r = subprocess.run(sys.argv[2:], capture_output=True, text=True)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{r.returncode}\\n{r.stdout}{r.stderr}")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
"""


def test_show_completion_with_no_shell_among_its_parents_uses_the_login_shell(tmp_path):
    out = tmp_path / "shown"
    argv = [sys.executable, "-c", ORPHAN, str(out), str(FERRY_BIN), "--show-completion"]
    subprocess.run(argv, env={**os.environ, "SHELL": "/bin/bash"}, cwd=tmp_path, check=True)
    deadline = time.monotonic() + 60
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    code, text = out.read_text().split("\n", 1)
    assert code == "0" and "_FERRY_COMPLETE=complete_bash" in text, text
