"""One writer of deployment records: only orchestrator/cms/deployments.py writes the
deployment, wave, host-step, baseline and host-CI tables. Every other module may read them
(select, session.get) but a constructor call, a session add/merge/delete, a bulk
insert/update/delete or an attribute assignment in a module that imports those models
fails this test, naming the module and line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WRITER = "orchestrator/cms/deployments.py"
TABLES = {"Deployment", "Wave", "HostStep", "HostBaseline", "EnvironmentBaseline", "Host"}
EXEMPT = {WRITER, "orchestrator/cms/models.py"}


def violations(source: str, name: str = "<module>") -> list[str]:
    tree = ast.parse(source)
    imported: dict[str, str] = {}  # local name → model class
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "orchestrator.cms.models":
            for alias in node.names:
                if alias.name in TABLES:
                    imported[alias.asname or alias.name] = alias.name
    if not imported:
        return []

    def mentions_table(expr: ast.AST) -> bool:
        return any(isinstance(n, ast.Name) and n.id in imported for n in ast.walk(expr))

    # names bound to rows of those tables: `dep = s.get(Deployment, i)`, `for w in …Wave…`
    rows: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and mentions_table(node.value):
            rows.update(n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name))
        if isinstance(node, ast.For | ast.comprehension) and mentions_table(node.iter):
            rows.update(n.id for n in ast.walk(node.target) if isinstance(n, ast.Name))
    found = []
    for node in ast.walk(tree):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call):
            fn = node.func
            if isinstance(fn, ast.Name) and fn.id in imported:
                found.append(f"{where}: constructs {imported[fn.id]}")
            if isinstance(fn, ast.Name) and fn.id in ("insert", "update", "delete"):
                if any(isinstance(a, ast.Name) and a.id in imported for a in node.args):
                    found.append(f"{where}: bulk {fn.id}() of a deployment table")
            if isinstance(fn, ast.Attribute) and fn.attr in ("add", "add_all", "merge", "delete"):
                found.append(f"{where}: session.{fn.attr}() in a module reading deployment tables")
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        for t in targets:
            for sub in ast.walk(t):
                if (
                    isinstance(sub, ast.Attribute)
                    and isinstance(sub.ctx, ast.Store)
                    and isinstance(sub.value, ast.Name)
                    and sub.value.id in rows
                ):
                    found.append(
                        f"{where}: assigns {sub.value.id}.{sub.attr} (write it through {WRITER})"
                    )
    return found


def product_modules() -> list[str]:
    out = []
    for top in ("orchestrator", "dml", "remediation"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel not in EXEMPT and "/migrations/" not in rel:
                out.append(rel)
    return out


def test_the_checker_catches_every_kind_of_write():
    bad = (
        "from orchestrator.cms.models import Deployment, HostBaseline\n"
        "def f(s, i):\n"
        "    dep = s.get(Deployment, i)\n"
        "    s.add(Deployment(status='x'))\n"
        "    dep.status = 'running'\n"
        "    s.merge(HostBaseline(host='h'))\n"
        "    s.execute(update(Deployment).values(status='x'))\n"
    )
    kinds = violations(bad)
    assert any("constructs Deployment" in v for v in kinds)
    assert any("assigns dep.status" in v for v in kinds)
    assert any("session.merge()" in v for v in kinds)
    assert any("bulk update()" in v for v in kinds)
    reader = (
        "from orchestrator.cms.models import Deployment\n"
        "def f(s):\n"
        "    rfc = s.get(RFC, 1)\n"
        "    rfc.status = 'implemented'\n"
        "    return s.scalars(select(Deployment).where(Deployment.id == 1))\n"
    )
    assert violations(reader) == []


@pytest.mark.parametrize("module", product_modules())
def test_only_the_deployment_record_writes_deployment_tables(module):
    assert violations((ROOT / module).read_text(), module) == []
