"""The layers of docs/architecture.md, enforced by reading each module's imports with `ast`.

1. The DML is a library the orchestrator uses, never the reverse. A module under `dml/` may
   take from `orchestrator` only its error tree, its YAML reader and its settings
   (`DML_MAY_USE`), and those three import nothing of the orchestrator but the error tree.
   The CMS, the change authority and everything else are refused: what joins the DML to
   them (the release catalog) lives in `orchestrator/catalog.py`.
2. A Decide module does no I/O. It imports only from an allow-list: stdlib modules that do
   no I/O, pydantic, and the project's other Decide and Model modules (`DECIDE_MAY_USE`);
   and it calls none of the builtins that reach a file or a terminal. Anything else (os,
   pathlib, subprocess, socket, sqlalchemy, paramiko, prefect, the CMS, the transports,
   the executor, the DML store, even `orchestrator.change.gate`) fails, naming module,
   line and import. Imports inside functions and under `if TYPE_CHECKING:` count too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# orchestrator.home: how settings find the project (a leaf: it imports no orchestrator module)
DML_MAY_USE = (
    "orchestrator.errors",
    "orchestrator.yamlfile",
    "orchestrator.settings",
    "orchestrator.home",
)

DECIDE_MODULES = (
    "orchestrator/change/authorize.py",
    "orchestrator/change/calendar.py",
    "orchestrator/change/risk.py",
    "orchestrator/change/models.py",
    "orchestrator/milestone.py",
    "orchestrator/backout.py",
    "orchestrator/steps.py",
    "orchestrator/context.py",
    "orchestrator/rollout.py",
    "orchestrator/planner.py",
    "orchestrator/pullwindow.py",
    "orchestrator/pulldaemon.py",
    "orchestrator/lifecycle.py",
    "orchestrator/els.py",
    "remediation/decisions.py",
    "dml/ref.py",  # Model, but as pure as a Decide module: change/models.py uses it
)

PURE_STDLIB = (
    "__future__",
    "abc",
    "collections",
    "dataclasses",
    "datetime",
    "enum",
    "fnmatch",
    "fractions",
    "functools",
    "hashlib",
    "itertools",
    "json",  # text to values and back: no file, no socket
    "math",
    "re",
    "typing",
    "zoneinfo",  # reads the tz database, as the clock does: a fact, not an effect
)
PROJECT_PURE = (
    "orchestrator.errors",
    "orchestrator.plan",  # Model: Decide modules use its types; loading a plan stays outside
    "orchestrator.inventory",  # Model, likewise
    "orchestrator.planner",
    "orchestrator.pullwindow",
    "orchestrator.milestone",
    "orchestrator.backout",
    "orchestrator.steps",  # the per-host step vocabulary
    "orchestrator.change.authorize",
    "orchestrator.change.calendar",
    "orchestrator.change.models",
    "orchestrator.change.risk",
    "orchestrator.context",
    "orchestrator.rollout",
    "orchestrator.lifecycle",
    "dml.ref",
)
# jinja2's sandbox renders strings to strings; Ferry never gives it a loader
DECIDE_MAY_USE = (*PURE_STDLIB, "pydantic", "jinja2", *PROJECT_PURE)
IO_BUILTINS = {"open", "print", "input", "__import__"}


def _within(name: str, allowed: tuple[str, ...]) -> bool:
    return any(name == a or name.startswith(a + ".") for a in allowed)


def _package(relpath: str) -> str:
    return ".".join(Path(relpath).parent.parts)  # dml/x.py and dml/__init__.py: both `dml`


def _parse(relpath: str) -> ast.Module:
    path = ROOT / relpath
    assert path.is_file(), f"{relpath} is listed here but does not exist (renamed? update the list)"
    return ast.parse(path.read_text(), filename=relpath)


def imports(relpath: str) -> Iterator[tuple[int, str, str]]:
    """(line, dotted name, the statement) for every name a module imports, anywhere in it.

    `from a.b import c` yields `a.b.c`, so `from orchestrator import catalog` is seen as
    `orchestrator.catalog`, not as the harmless-looking `orchestrator`.
    """
    for node in ast.walk(_parse(relpath)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, f"import {alias.name}"
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolve against the module's own package
                base = _package(relpath).split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, module] if module else base)
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}", f"from {module} import {alias.name}"


def _dml_modules() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "dml").rglob("*.py"))


@pytest.mark.parametrize("module", _dml_modules())
def test_the_dml_takes_from_the_orchestrator_only_errors_yaml_reading_and_settings(module):
    bad = [
        f"{module}:{line}: `{stmt}`"
        for line, name, stmt in imports(module)
        if _within(name, ("orchestrator",)) and not _within(name, DML_MAY_USE)
    ]
    assert not bad, (
        "the DML must not depend on the orchestrator beyond "
        + ", ".join(DML_MAY_USE)
        + ":\n"
        + "\n".join(bad)
    )


@pytest.mark.parametrize("allowed", DML_MAY_USE)
def test_what_the_dml_may_use_of_the_orchestrator_leads_nowhere_else(allowed):
    """Otherwise DML_MAY_USE would be a back door to the CMS or the change authority."""
    module = allowed.replace(".", "/") + ".py"
    bad = [
        f"{module}:{line}: `{stmt}`"
        for line, name, stmt in imports(module)
        if _within(name, ("orchestrator",)) and not _within(name, DML_MAY_USE)
    ]
    assert not bad, "the DML reaches further into the orchestrator through:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", DECIDE_MODULES)
def test_decide_modules_import_nothing_that_does_io(module):
    bad = [
        f"{module}:{line}: `{stmt}`"
        for line, name, stmt in imports(module)
        if not _within(name, DECIDE_MAY_USE)
    ]
    assert not bad, (
        "a Decide module imports only pure stdlib, pydantic and other pure modules "
        "(tests/unit/test_layers.py: DECIDE_MAY_USE):\n" + "\n".join(bad)
    )


@pytest.mark.parametrize("module", DECIDE_MODULES)
def test_decide_modules_call_no_builtin_that_reads_or_writes(module):
    bad = [
        f"{module}:{node.lineno}: `{node.func.id}(...)`"
        for node in ast.walk(_parse(module))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in IO_BUILTINS
    ]
    assert not bad, "a Decide module returns data; it does not read or print:\n" + "\n".join(bad)


def test_the_guard_sees_every_kind_of_import(tmp_path, monkeypatch):
    """The guard itself: lazy, aliased, from-package and relative imports all count."""
    pkg = tmp_path / "dml"
    pkg.mkdir()
    (pkg / "probe.py").write_text(
        "import sqlalchemy.orm as orm\n"
        "from orchestrator import catalog\n"
        "from .store import DML\n"
        "def f():\n"
        "    from orchestrator.change import gate\n"
    )
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    names = {name for _, name, _ in imports("dml/probe.py")}
    assert names == {
        "sqlalchemy.orm",
        "orchestrator.catalog",
        "dml.store.DML",
        "orchestrator.change.gate",
    }
    assert not any(_within(n, DECIDE_MAY_USE) for n in names)
    assert not any(_within(n, DML_MAY_USE) for n in names)
