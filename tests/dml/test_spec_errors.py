"""A bad spec gets one clear error naming file, field and fix, and leaves the DML empty."""

from __future__ import annotations

from pathlib import Path

import pytest

from dml.globs import GlobError, compile_glob
from orchestrator.settings import get_settings
from tests.dml.conftest import dml_files, make_tree

BAD_SPECS = {
    "unknown field": (
        "name: shop\nversion: 1.0.0\ncolour: blue\nunits:\n  app: {source: app}\n",
        "colour",
        "remove it, or check its spelling",
    ),
    "unknown unit field": (
        "name: shop\nversion: 1.0.0\nunits:\n  app: {source: app, exclud: ['*.pyc']}\n",
        "units.app.exclud",
        "remove it",
    ),
    "missing directory": (
        "name: shop\nversion: 1.0.0\nunits:\n  app: {source: build/app}\n",
        "units.app.source",
        "does not exist",
    ),
    "invalid glob": (
        "name: shop\nversion: 1.0.0\nunits:\n  app: {source: app, include: ['[abc']}\n",
        "units.app.include",
        "never closed",
    ),
    "duplicate unit": (
        "name: shop\nversion: 1.0.0\nunits:\n  app: {source: app}\n  app: {source: config}\n",
        "units.app",
        "given twice (lines 4 and 5)",
    ),
    "no origin": (
        "name: shop\nversion: 1.0.0\nunits:\n  app: {include: ['*']}\n",
        "units.app",
        "exactly one of 'source'",
    ),
    "bad version": (
        "name: shop\nversion: ../../etc\nunits:\n  app: {source: app}\n",
        "version",
        "not a valid name: use letters, digits, '.', '_', '-', '+', '~'",
    ),
    "unit with no files": (
        "name: shop\nversion: 1.0.0\nunits:\n  app: {source: app, include: ['*.nothing']}\n",
        "units.app.include",
        "the unit has no files",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_is_one_clear_error_and_leaves_nothing(
    case: str, tmp_path: Path, run_ferry
) -> None:
    text, field, hint = BAD_SPECS[case]
    spec = make_tree(tmp_path / "src", text)
    res = run_ferry("release", "build", str(spec), "-o", "json")
    assert res.returncode == 2, res.stdout + res.stderr
    err = res.json()
    assert err["error"] == "SpecError"
    assert err["details"]["file"] == str(spec)
    assert err["details"]["field"] == field
    assert hint in err["message"]
    assert str(spec) in res.stderr and "Traceback" not in res.stderr
    assert dml_files(get_settings().dml_dir) == []


def test_unknown_without_unit_names_the_option_and_the_units(spec: Path, run_ferry) -> None:
    res = run_ferry("release", "build", str(spec), "--without", "cfg")
    assert res.returncode == 2
    assert "--without: no unit named 'cfg'" in res.stderr
    assert "use one of: app, config" in res.stderr
    assert dml_files(get_settings().dml_dir) == []


def test_symlink_in_a_source_is_refused(spec: Path, run_ferry) -> None:
    (spec.parent / "app" / "link").symlink_to("/etc/passwd")
    res = run_ferry("release", "build", str(spec))
    assert res.returncode == 2
    assert "units.app.source: link is a symlink" in res.stderr
    assert dml_files(get_settings().dml_dir) == []


def test_excluded_symlink_is_fine(tmp_path: Path, run_ferry) -> None:
    spec = make_tree(
        tmp_path / "src",
        "name: s\nversion: '1'\nunits:\n  app: {source: app, exclude: [link, '*.pyc']}\n",
    )
    (spec.parent / "app" / "link").symlink_to("/etc/passwd")
    assert run_ferry("release", "build", str(spec)).returncode == 0


@pytest.mark.parametrize("pattern", ["", "/abs", "../up", "a**b", "x[", "[/]"])
def test_invalid_globs_are_refused(pattern: str) -> None:
    with pytest.raises(GlobError):
        compile_glob(pattern)


@pytest.mark.parametrize(
    ("pattern", "path", "hit"),
    [
        ("*.pyc", "a/b/c.pyc", True),
        ("*.py", "a/b/c.pyc", False),
        ("config/*.toml", "config/a.toml", True),
        ("config/*.toml", "x/config/a.toml", False),
        ("**/*.j2", "t.j2", True),
        ("**/*.j2", "a/b/t.j2", True),
        ("static/**", "static/css/a.css", True),
        ("logs/", "logs/today", True),
        ("node_modules", "web/node_modules/x/y.js", True),
        ("[!ab].txt", "c.txt", True),
        ("[!ab].txt", "a.txt", False),
    ],
)
def test_glob_rules(pattern: str, path: str, hit: bool) -> None:
    assert compile_glob(pattern).matches(path) is hit
